# Generated from tiered_cache/_async/owed.py by tools/async_to_sync.py: do not edit; edit the source and run it again.
"""Kills Redis did not get: kept (bounded) and retried by one background worker, so other processes stop seeing them soon too."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING


from .. import observe

from .._acompat import Event, Worker, wait_event
from ..policy.failures import classify
from ..policy.keys import KeySet
from ..tiers._redis_shared import ANSWERED_CADENCE, CHUNK, CLOSE_JOIN, NAMESPACE, OUTAGE_BACKOFF
from ..policy.failures import REDIS_FAILURES

if TYPE_CHECKING:
    from .redis_tier import RedisTier

logger = logging.getLogger(__name__)


class OwedKills:
    """Entry key -> KeySet of every kill owed; past `limit` keys, one namespace drop owed instead.

    The tier reads `keys` on its hit path (a dict: empty means nothing owed). A kill leaves it only after
    Redis confirmed it; the namespace drop clears it only if no kill was owed while the drop ran. Owing is
    synchronous (no I/O, no await), so a task cancelled at any await of a write can still record its kill.
    """

    def __init__(self, tier: RedisTier, limit: int) -> None:
        self.tier = tier
        self.limit = limit
        self.keys: dict[str, KeySet | None] = {}
        self.past_limit = 0  # kills owed since the overflow, all covered by the namespace drop
        self.outage = False  # the last drain failed for want of an answer
        self._fresh_primitives()

    def _fresh_primitives(self) -> None:
        self.lock = threading.Lock()  # held for a few statements, never across an await
        self.drain_lock = threading.Lock()  # held across awaits: only ever try-acquired
        self._drainer: Worker | None = None
        self._closed = Event()

    def _after_fork_in_child(self) -> None:
        """New locks (another thread may have held them at fork time); the parent's drainer is gone. Keep the kills."""
        closed = self._closed.is_set()
        self._fresh_primitives()
        if closed:
            self._closed.set()

    def __len__(self) -> int:
        """Kills owed (those past the limit counted too)."""
        return self.past_limit if NAMESPACE in self.keys else len(self.keys)

    def owe(self, ks: KeySet) -> None:
        """Remember a kill; past the limit forget the keys and owe the namespace drop."""
        with self.lock:
            if NAMESPACE in self.keys:
                self.past_limit += 1
            elif ks.entry in self.keys or len(self.keys) < self.limit:
                self.keys[ks.entry] = ks
            else:
                self.past_limit = len(self.keys) + 1
                self.keys.clear()
                self.keys[NAMESPACE] = None
                self.tier.stats.owed_overflows += 1
                logger.warning("redis tier: more than %d kills owed; the namespace %r will be dropped once Redis "
                               "answers", self.limit, self.tier.keys.namespace)
            owed = self.tier.stats.pending_kills = len(self)
        if self.tier._owing.begin(owed):
            observe.kills_owed(self.tier.keys.namespace, owed)
        self.start()

    def drain(self, max_chunks: int | None = None) -> bool:
        """Apply owed kills (or the namespace drop), one drainer at a time, in chunks; True when none is left.

        A caller that finds another drain under way does not wait for it: it answers False (this process
        keeps off Redis meanwhile). While Redis refuses writes one probe is sent, not a chunk of kills.
        """
        if not self.drain_lock.acquire(blocking=False):
            return not self.keys
        try:
            self.outage = False
            tier = self.tier
            if self.keys and tier.refusing and not tier.probe_writes():
                return False
            chunks = 0
            while max_chunks is None or chunks < max_chunks:
                chunks += 1
                with self.lock:
                    drop, seen = NAMESPACE in self.keys, self.past_limit
                    owed = [] if drop else [ks for ks in list(self.keys.values())[:CHUNK] if ks is not None]
                if not drop and not owed:
                    return True
                if not tier.breaker.allow():
                    self.outage = True
                    return False
                try:
                    if drop:
                        tier.flush_namespace()
                    else:
                        tier.kill_or_raise(owed)
                except REDIS_FAILURES as exc:
                    self.outage = classify(exc).outage
                    return False
                with self.lock:
                    if drop:
                        if self.past_limit == seen:  # else kills were owed during the drop: drop again
                            self.keys.clear()
                            self.past_limit = 0
                    else:
                        for ks in owed:
                            if self.keys.get(ks.entry) is ks:
                                del self.keys[ks.entry]
                    self.tier.stats.pending_kills = len(self)
                    drained = not self.keys
                if drained:
                    seconds = self.tier._owing.end()
                    if seconds is not None:
                        observe.kills_drained(self.tier.keys.namespace, self.tier._owing.peak, seconds)
            return not self.keys
        finally:
            self.drain_lock.release()

    def start(self) -> None:
        """Start the drainer unless it runs (after a fork it does not: started again on demand)."""
        with self.lock:
            if self._closed.is_set() or (self._drainer is not None and self._drainer.is_alive()):
                return
            self._drainer = Worker(self._loop, name="tiered_cache-kills")

    def _loop(self) -> None:
        """Answered refusals retry on a short fixed cadence; outages back off to 1 s."""
        delay = ANSWERED_CADENCE
        while not self._closed.is_set():
            if self.drain():
                return
            if self.outage:
                wait_event(self._closed, delay)
                delay = min(delay * 2, OUTAGE_BACKOFF)
            else:
                delay = ANSWERED_CADENCE
                wait_event(self._closed, delay)

    @property
    def draining(self) -> bool:
        """The background drainer is running."""
        return self._drainer is not None and self._drainer.is_alive()

    def close(self) -> None:
        """Try the owed kills once more, then stop the drainer (waiting CLOSE_JOIN at most)."""
        self.drain()
        self._closed.set()
        drainer = self._drainer
        if drainer is not None:
            drainer.join(CLOSE_JOIN)
