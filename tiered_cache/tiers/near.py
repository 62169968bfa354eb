"""Near tier: an in-process cache of get_latest answers, bounded in count, bytes and age.

Entries are stored encoded and decoded on every hit, so a caller that mutates a returned dict never
changes what the next read returns (decoding is also cheaper than a deep copy). Every entry dies at
the row's expires_at and at most `max_age` after it was stored: the hard bound on staleness if every
invalidation message were lost. The coherence listener evicts keys as changes are announced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachetools import TLRUCache

from ..contracts import MISS
from ..policy.entries import decode, expires_at_ms


@dataclass
class NearStats:
    """Counters of the near tier (plain increments: approximate under threads)."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    puts_skipped: int = 0
    evictions: int = 0
    flushes: int = 0
    invalidations: int = 0


class NearTier:
    """A thread-safe TLRU cache of encoded rows, usable only while its coherence listener is subscribed."""

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 64 << 20,
        max_age: float = 2.0,
        timer: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or not max_age > 0:
            raise ValueError("max_entries and max_bytes must be >= 1 and max_age > 0")
        self.max_age = max_age
        self.timer = timer
        self.wall_clock = wall_clock
        # One size unit per byte, but never less than an equal share (rounded up), in a budget of exactly
        # max_entries shares: at most max_entries entries, and max_bytes (+ under max_entries) bytes.
        floor = max(1, -(-max_bytes // max_entries))
        self._cache: TLRUCache[str, bytes] = TLRUCache(
            maxsize=floor * max_entries, ttu=self._ttu, timer=timer, getsizeof=lambda raw: max(len(raw), floor)
        )
        self._lock = threading.Lock()
        self._deadline: dict[str, float] = {}
        self.stats = NearStats()
        #: Bumped by every eviction or flush: a read that saw it move must not store what it read.
        self.epoch = 0
        #: False until the listener is subscribed (and after it loses its connection): no puts, no hits.
        self.active = False

    def _ttu(self, key: str, raw: bytes, now: float) -> float:
        """Time to use: the deadline computed at put time."""
        return self._deadline.pop(key, now + self.max_age)

    def get(self, key: str) -> Any:
        """The cached row (a fresh dict), None for a cached 'no row', or MISS."""
        if not self.active:
            return MISS
        with self._lock:
            raw = self._cache.get(key)
        if raw is None:
            self.stats.misses += 1
            return MISS
        self.stats.hits += 1
        return decode(raw)

    def put(self, key: str, raw: bytes, row: dict[str, Any] | None, epoch: int) -> None:
        """Store an answer read when the epoch was `epoch`, unless something was evicted since."""
        if not self.active:
            return
        now = self.timer()
        deadline = now + self.max_age
        at = expires_at_ms(row)
        if at is not None:
            deadline = min(deadline, now + (at / 1000.0 - self.wall_clock()))
            if deadline <= now:
                return
        with self._lock:
            if epoch != self.epoch:
                self.stats.puts_skipped += 1
                return
            self._deadline[key] = deadline
            try:
                self._cache[key] = raw
            except ValueError:  # value too large for the whole cache
                self._deadline.pop(key, None)
                return
        self.stats.puts += 1

    def evict(self, key: str) -> None:
        """Drop one key (a change was announced or made here)."""
        with self._lock:
            self.epoch += 1
            if self._cache.pop(key, None) is not None:
                self.stats.evictions += 1
        self.stats.invalidations += 1

    def flush(self) -> None:
        """Drop everything (a gap, a lost connection, a restarted Redis)."""
        with self._lock:
            self.epoch += 1
            self._cache.clear()
            self._deadline.clear()
        self.stats.flushes += 1

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def size_bytes(self) -> int:
        """Bytes accounted for by the cache: each entry counts its size, but at least max_bytes / max_entries."""
        return int(self._cache.currsize)
