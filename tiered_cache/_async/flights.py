"""Fresh single flight: concurrent callers of one cache object asking the same question share one request, but
only a request sent after they began, so a write that returned before a call began is never missed.

Hand-written async source (tools/async_to_sync.py generates the sync twin). Per question at most one request is
in the air and one queued behind it: a caller that finds the one in the air older than itself joins the queued
one (made by the first such caller, who sends it as soon as the one in the air is answered). A caller so waits
for two requests at most, and a burst of N callers costs two requests, not N. An error answers everyone who
shared the request; a request whose sender was cancelled before it was answered is asked again. No lock: two
threads racing for one slot only cost one request more, and nobody ever takes an answer sent before it began.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from .. import _fork
from .._acompat import AEvent

T = TypeVar("T")

_monotonic = time.monotonic


class _Flight:
    """One request: when it was sent (None while queued), the one queued behind it, and its answer once done."""

    __slots__ = ("done", "sent", "next", "answered", "value", "error")

    def __init__(self) -> None:
        self.done = AEvent()
        self.sent: float | None = None
        self.next: _Flight | None = None
        self.answered = False  # False once done: its sender was cancelled, nobody got an answer
        self.value: Any = None
        self.error: Exception | None = None


class AsyncFlights:
    """The requests in flight per question (a key), shared by the callers of one object."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight] = {}
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        """Requests in the air at fork time belong to threads the child does not have: nobody would answer them."""
        self._flights = {}

    def __len__(self) -> int:
        return len(self._flights)

    async def ask(self, key: Hashable, after: float, request: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """request()'s answer, from a request sent after `after` (a time.monotonic() reading of when the caller
        began): (answer, True) if this caller sent it, (answer, False) if it shared another caller's."""
        flights = self._flights
        while True:
            flight = flights.get(key)
            if flight is None:  # nobody is asking: ask now
                flight = flights[key] = _Flight()
                break
            if flight.sent is None or flight.sent > after:
                shared = flight
            elif flight.next is not None:
                shared = flight.next
            else:  # in the air since before we began: queue the next request, and send it once this one is answered
                queued = flight.next = _Flight()
                try:
                    await flight.done.wait()
                except BaseException:
                    self._abandon(key, flight, queued)
                    raise
                flight = queued
                break
            await shared.done.wait()
            if shared.answered:
                if shared.error is not None:
                    raise shared.error
                return shared.value, False
            # Its sender was cancelled: ask again.
        return await self._send(key, flight, request), True

    async def _send(self, key: Hashable, flight: _Flight, request: Callable[[], Awaitable[T]]) -> T:
        flight.sent = _monotonic()
        try:
            flight.value = value = await request()
            flight.answered = True
            return value
        except Exception as exc:
            flight.error = exc
            flight.answered = True
            raise
        finally:
            flights = self._flights
            if flights.get(key) is flight:
                if flight.next is not None:
                    flights[key] = flight.next  # queued callers are waiting for its sender to send it
                else:
                    del flights[key]
            flight.done.set()

    def _abandon(self, key: Hashable, ahead: _Flight, queued: _Flight) -> None:
        """The sender of a queued request was cancelled before sending it: whoever joined it asks again."""
        if ahead.next is queued:
            ahead.next = None
        if self._flights.get(key) is queued:
            del self._flights[key]
        queued.done.set()
