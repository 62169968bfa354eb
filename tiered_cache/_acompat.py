"""The few primitives that differ between the async source and its generated sync twin, side by side.

The async code (tiered_cache/_async/) uses the A-names; tools/async_to_sync.py renames them to the plain
names, so the sync twin uses threads where the async code uses tasks, and blocking sleeps for awaits.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

# -- sync ------------------------------------------------------------------------------------------

sleep = time.sleep
Event = threading.Event
Lock = threading.Lock


def open_pool(pool: Any) -> bool:
    """Open a psycopg ConnectionPool now, without waiting for its connections; True: it is open."""
    pool.open(wait=False)
    return True


class Worker:
    """A background loop in a daemon thread (the sync twin of AWorker)."""

    def __init__(self, target: Callable[[], Any], name: str) -> None:
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


def wait_event(event: threading.Event, timeout: float) -> bool:
    """Wait for an event up to timeout seconds; True if it was set."""
    return event.wait(timeout)


# -- async -----------------------------------------------------------------------------------------

asleep = asyncio.sleep
AEvent = asyncio.Event
ALock = asyncio.Lock


def aopen_pool(pool: Any) -> bool:
    """False: an AsyncConnectionPool opens only by an await in a running loop, which a constructor cannot make."""
    return False


class AWorker:
    """A background loop as an asyncio task of the running loop, kept referenced so it is not collected."""

    def __init__(self, target: Callable[[], Coroutine[Any, Any, Any]], name: str) -> None:
        self._task = asyncio.get_running_loop().create_task(target(), name=name)

    def is_alive(self) -> bool:
        return not self._task.done()

    async def join(self, timeout: float | None = None) -> None:
        if self._task is asyncio.current_task():
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._task.cancel()


async def await_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for an event up to timeout seconds; True if it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True
