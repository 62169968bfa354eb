"""Near tier: an in-process cache of get_latest and get_history answers, bounded in count, bytes and age.

Entries are stored encoded and decoded on every hit, so a caller that mutates a returned dict never
changes what the next read returns (decoding is also cheaper than a deep copy); a JSON read gets the
stored bytes themselves (immutable: nothing to copy). Every entry dies at
the row's expires_at and at most `max_age` after it was stored: the hard bound on staleness if every
invalidation message were lost. The coherence listener evicts keys as changes are announced.
A process has one tier per Redis server and namespace, shared by its caches (see _near_registry).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from ..contracts import MISS
from ..errors import ConfigurationError
from .admission import TinyLFU
from ..policy.entries import decode

_STRIPES = 64  # evictions guard puts per stripe of keys, so one change does not cancel every read in flight
_POLL_EVERY = 0.001  # seconds: how stale a hit may be against an announcement already on the socket


@dataclass
class NearStats:
    """Counters of the near tier (plain increments: approximate under threads)."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    puts_skipped: int = 0
    puts_rejected: int = 0
    evictions: int = 0
    flushes: int = 0
    invalidations: int = 0


def history_key(entry: str, limit: int) -> str:
    """The near key of a get_history answer; entry keys end in '}', so this never names an entry."""
    return f"{entry}#h{limit}"


class _LRU(LRUCache):  # type: ignore[type-arg]
    """cachetools' LRU, and a look at the entry it would evict next (what a newcomer must out-rank)."""

    def victim(self) -> str | None:
        order = getattr(self, "_LRUCache__order", None)  # cachetools' own order; None if it ever moves
        return next(iter(order), None) if order else None

    def peek(self, key: str) -> Any:
        """An entry without touching its recency (None if absent)."""
        data = getattr(self, "_Cache__data", None)  # cachetools' own store; a plain get if it ever moves
        return data.get(key) if data is not None else self.get(key)


def check_bounds(max_entries: int, max_bytes: int, max_age: float) -> None:
    """Refuse bounds no near tier can have (before a shared tier is looked up, so it is never silent)."""
    if max_entries < 1 or max_bytes < 1 or not max_age > 0:
        raise ConfigurationError("near tier: max_entries and max_bytes must be >= 1 and max_age > 0")


class NearTier:
    """A thread-safe LRU of (deadline, encoded answer), usable only while its coherence listener is subscribed.

    A plain LRU with the deadline checked on read costs less per put than cachetools' TLRU heap, which
    profiling showed dominating get_many once the working set outgrew the tier.
    """

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 64 << 20,
        max_age: float = 2.0,
        timer: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        admission: bool = True,
    ) -> None:
        check_bounds(max_entries, max_bytes, max_age)
        self.max_age = max_age
        self.timer = timer
        self.wall_clock = wall_clock
        # One size unit per byte, but never less than an equal share (rounded up), in a budget of exactly
        # max_entries shares: at most max_entries entries, and max_bytes (+ under max_entries) bytes.
        floor = self._floor = max(1, -(-max_bytes // max_entries))
        self._cache: _LRU = _LRU(maxsize=floor * max_entries, getsizeof=lambda item: max(len(item[1]), floor))
        #: Once full, a new key displaces the LRU entry only if TinyLFU rates it more often asked for, so a
        #: working set larger than the tier does not pay a put and an eviction of a hot key on every miss.
        self._lfu = TinyLFU(max_entries) if admission else None
        self._lock = threading.Lock()
        self._limits: set[int] = set()  # history limits ever stored, so an eviction can find their keys
        self.stats = NearStats()
        #: Bumped by every eviction or flush; a read notes it first and may store only if its stripe
        #: has not been bumped since.
        self.epoch = 0
        self._bumped = [0] * _STRIPES
        #: False until the listener is subscribed (and after it loses its connection): no puts, no hits.
        self.active = False
        #: Set by the coherence listener: applies announcements already received, from the reading thread.
        self.poll_announcements: Callable[[], None] | None = None
        self._next_poll = 0.0

    def polled_within(self, seconds: float) -> bool:
        """Whether a read polled the announcements in the last `seconds` (it will again within a millisecond)."""
        return self.timer() - (self._next_poll - _POLL_EVERY) < seconds

    def get(self, key: str) -> Any:
        """The cached answer (freshly decoded), None for a cached 'no row', or MISS."""
        raw = self.get_raw(key)
        return raw if raw is MISS else decode(raw)

    def _serving_at(self) -> float | None:
        """The timer's now while the tier may serve (its listener subscribed); None while it may not."""
        return self.timer() if self.active else None

    def _polled(self, now: float) -> bool:
        """Before serving a hit: apply announcements already received (at most once a _POLL_EVERY); False if the
        tier may no longer serve. A miss skips this: Redis, asked next, already holds every announced change."""
        if now >= self._next_poll and self.poll_announcements is not None:
            self._next_poll = now + _POLL_EVERY
            self.poll_announcements()
            return self.active
        return True

    def get_raws(self, keys: list[str]) -> list[Any]:
        """get_raw of each key (a page): one poll, one lock and one pass over the sketch for all of them."""
        now = self._serving_at()
        if now is None:
            return [MISS] * len(keys)
        out: list[Any] = [MISS] * len(keys)
        with self._lock:
            if self._lfu is not None:
                self._lfu.record_many(keys)
            self._lookup(keys, out, now)
        hits = len(keys) - out.count(MISS)
        if hits and now >= self._next_poll and self.poll_announcements is not None:
            if not self._polled(now):
                out = [MISS] * len(keys)
            else:  # the poll may have evicted some of them: look again (recency and sketch already counted)
                with self._lock:
                    self._lookup(keys, out, now, again=True)
            hits = len(keys) - out.count(MISS)
        self.stats.hits += hits
        self.stats.misses += len(keys) - hits
        return out

    def _lookup(self, keys: list[str], out: list[Any], now: float, again: bool = False) -> None:
        """Fill out[i] with each unexpired key's answer (under the lock); `again`: only recheck the hits."""
        cache = self._cache
        for i, key in enumerate(keys):
            if again and out[i] is MISS:
                continue
            item = cache.get(key)
            if item is not None and item[0] > now:
                out[i] = item[1]
            else:
                out[i] = MISS
                if item is not None:
                    del cache[key]

    def note(self, key: str) -> None:
        """Count an ask whose lookup was skipped (a closed KeyGate's warm read), so its put competes for admission.

        Without it a closed gate's puts carry no frequency of their own and lose every tie to the LRU victim:
        a tier left full of unexpired one-off entries (a prewarm, a batch job) never took the hot set back.
        """
        if self._lfu is not None:
            with self._lock:
                self._lfu.record(key)

    def get_raw(self, key: str) -> Any:
        """The cached answer as stored (encoded; NEGATIVE for a cached 'no row'), or MISS."""
        now = self._serving_at()
        if now is None:
            return MISS
        with self._lock:
            if self._lfu is not None:
                self._lfu.record(key)
            item = self._cache.get(key)
            if item is not None and item[0] <= now:
                del self._cache[key]
                item = None
        if item is not None and now >= self._next_poll and self.poll_announcements is not None:
            if not self._polled(now):
                item = None
            else:
                with self._lock:  # the poll may have evicted it
                    item = self._cache.get(key)
        if item is None:
            self.stats.misses += 1
            return MISS
        self.stats.hits += 1
        return item[1]

    def put(
        self, key: str, raw: bytes, at: int | None, epoch: int, *, base: str | None = None,
        started: float | None = None,
    ) -> None:
        """Store an answer read when the epoch was `epoch`, unless its key (or `base` entry) was evicted since.

        `at` is the row's expiry in Unix milliseconds (policy.entries.expires_at_ms), None for none.
        `started` (this tier's timer when the read began) starts the max_age clock, so a slow read cannot
        stretch the staleness bound.
        """
        if not self.active:
            return
        now = self.timer()
        deadline = (now if started is None else started) + self.max_age
        if at is not None:
            deadline = min(deadline, now + (at / 1000.0 - self.wall_clock()))
        if deadline <= now:
            return
        stripe = hash(base or key) % _STRIPES
        with self._lock:
            if self._bumped[stripe] > epoch:
                self.stats.puts_skipped += 1
                return
            cache = self._cache
            if self._lfu is not None and key not in cache \
                    and cache.currsize + max(len(raw), self._floor) > cache.maxsize:
                victim = cache.victim()
                if victim is not None and not self._lfu.admit(key, victim):
                    held = cache.peek(victim)
                    if held is not None and held[0] > now:  # an expired victim is no loss, however often asked
                        self.stats.puts_rejected += 1
                        return
            try:
                self._cache[key] = (deadline, raw)
            except ValueError:  # value too large for the whole cache
                return
        self.stats.puts += 1

    def put_history(self, entry: str, limit: int, raw: bytes, epoch: int, started: float | None = None) -> None:
        """Store a get_history answer; it is evicted with its entry."""
        if limit not in self._limits:
            with self._lock:
                self._limits.add(limit)
        self.put(history_key(entry, limit), raw, None, epoch, base=entry, started=started)

    def evict(self, key: str) -> None:
        """Drop one entry and its history answers (a change was announced or made here)."""
        with self._lock:
            self.epoch += 1
            self._bumped[hash(key) % _STRIPES] = self.epoch
            if self._cache.pop(key, None) is not None:
                self.stats.evictions += 1
            for limit in self._limits:
                self._cache.pop(history_key(key, limit), None)
        self.stats.invalidations += 1

    def flush(self) -> None:
        """Drop everything (a gap, a lost connection, a restarted Redis)."""
        with self._lock:
            self.epoch += 1
            self._bumped = [self.epoch] * _STRIPES
            self._cache.clear()
        self.stats.flushes += 1

    def tighten(self, max_age: float) -> None:
        """Lower the staleness bound (a sharer asked for less); entries stored under the old one go."""
        if max_age < self.max_age:
            self.max_age = max_age
            self.flush()

    def _after_fork_in_child(self) -> None:
        """In a forked child: no listener vouches for these entries, and the lock may be held by a lost thread."""
        self._lock = threading.Lock()
        self.active = False
        self.flush()

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def size_bytes(self) -> int:
        """Bytes accounted for by the cache: each entry counts its size, but at least max_bytes / max_entries."""
        return int(self._cache.currsize)
