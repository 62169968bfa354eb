"""Wakes callers waiting for another process's generation: one subscription per Redis and channel per process.

get_or_generate's waiters re-check when the key they wait for is announced (the winner's finalize, or its
failure, publishes on the change channel), not by polling alone; a lost message or a Redis outage only
delays them to their next poll, since the truth they re-check is PostgreSQL's. Threads serve both APIs:
an async waiter is woken through its loop's call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any


from . import _fork
from ._deployment import identity
from ._feed import ChangeFeed
from .policy.failures import REDIS_FAILURES

logger = logging.getLogger(__name__)


class Waiter:
    """One caller's wait for one entry key: set by the bus thread, waited on by a thread or a coroutine."""

    __slots__ = ("entry", "_event", "_loops", "_guard")

    def __init__(self, entry: str) -> None:
        self.entry = entry
        self._event = threading.Event()
        self._loops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._guard = threading.Lock()

    def set(self) -> None:
        with self._guard:
            self._event.set()
            loops, self._loops = self._loops, []
        for loop, event in loops:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    def clear(self) -> None:
        self._event.clear()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    async def await_wait(self, timeout: float) -> bool:
        event = asyncio.Event()
        with self._guard:
            if self._event.is_set():
                return True
            self._loops.append((asyncio.get_running_loop(), event))
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


class WakeBus:
    """A daemon thread subscribed to one change channel, waking the waiters of each announced entry key."""

    def __init__(self, client: Any, channel: str) -> None:
        # It only listens: no restart watch (that one belongs to the cache whose client it came from, and it
        # would flush and report on that cache's behalf for as long as this bus lives).
        self._source = client
        self.channel = channel
        self._waiters: dict[str, set[Waiter]] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()
        #: Set while subscribed: announcements made from now on reach this process's waiters.
        self.subscribed = threading.Event()
        self._running = False  # a thread is subscribed (or subscribing) while anyone waits, and only then

    def register(self, entry: str) -> Waiter:
        waiter = Waiter(entry)
        with self._guard:
            self._waiters.setdefault(entry, set()).add(waiter)
            if not self._running and not self._stop.is_set():
                self._running = True
                threading.Thread(target=self._run, name="tiered_cache-wakeups", daemon=True).start()
        return waiter

    def _idle(self) -> bool:
        """Nobody waits: the thread ends (and unsubscribes); the next register() starts another."""
        with self._guard:
            if self._waiters and not self._stop.is_set():
                return False
            self._running = False
            self.subscribed.clear()
            return True

    def unregister(self, waiter: Waiter) -> None:
        with self._guard:
            group = self._waiters.get(waiter.entry)
            if group is not None:
                group.discard(waiter)
                if not group:
                    del self._waiters[waiter.entry]

    def _wake(self, entry: str | None) -> None:
        """Wake the waiters of one entry key, or (None: a flush, or the link was lost) every waiter."""
        with self._guard:
            if entry is None:
                woken = [w for group in self._waiters.values() for w in group]
            else:
                woken = list(self._waiters.get(entry, ()))
        for waiter in woken:
            waiter.set()

    def _run(self) -> None:
        backoff = 0.05
        while not self._idle():
            feed = ChangeFeed(self._source, self.channel, timeout=2.0)
            try:
                feed.open(self._stop, 5.0)  # a cluster connects here, and subscribes on every shard
                self.subscribed.set()
                backoff = 0.05
                while self._waiters and not self._stop.is_set():  # a hint; _idle() decides under the lock
                    found = feed.drain(time.monotonic()) if feed.fds else feed.read_waiting(0.2)
                    for data in found:
                        key = (data.decode() if isinstance(data, bytes) else data).split(":", 2)[-1]
                        if key:
                            self._wake(None if key == "*" else key)
                    if feed.fds and not found:
                        feed.wait(0.2)
            except (*REDIS_FAILURES, OSError, ValueError) as exc:
                logger.debug("wakeups: %s: %s; waiters fall back to polling", type(exc).__name__, exc)
                self.subscribed.clear()
                self._wake(None)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                feed.shutdown()

    def _after_fork_in_child(self) -> None:
        """A forked child has no thread: it starts its own bus on first use (see bus_for)."""
        self._stop.set()


_buses: dict[tuple[Any, ...], WakeBus] = {}
_buses_guard = threading.Lock()


def bus_for(client: Any, channel: str) -> WakeBus | None:
    """The process's bus for this Redis and channel (started on first use); None when nothing is announced."""
    if not channel:
        return None
    try:
        key = (*identity(client), channel)
    except (AttributeError, TypeError, ValueError):  # a client without a plain pool (fakeredis): poll only
        return None
    with _buses_guard:
        bus = _buses.get(key)
        if bus is None or bus._stop.is_set():
            bus = _buses[key] = WakeBus(client, channel)  # its thread starts with the first waiter
            _fork.register(bus)
        return bus


def _reset_in_child() -> None:
    global _buses_guard
    _buses_guard = threading.Lock()
    _buses.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
