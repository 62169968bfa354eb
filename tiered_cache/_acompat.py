"""The few primitives that differ between the async source and its generated sync twin, side by side.

The async code (tiered_cache/_async/) uses the A-names; tools/async_to_sync.py renames them to the plain
names, so the sync twin uses threads where the async code uses tasks, and blocking sleeps for awaits.
"""

from __future__ import annotations

import asyncio
import inspect
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


def callback(obj: Any) -> Any:
    """A callback a library calls synchronously (redis-py's redis_connect_func): as it is."""
    return obj


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


def run_blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a blocking function (joining a thread) here and now: the sync API may block."""
    return fn(*args)


# -- async -----------------------------------------------------------------------------------------

asleep = asyncio.sleep
AEvent = asyncio.Event
ALock = asyncio.Lock


def aopen_pool(pool: Any) -> bool:
    """False: an AsyncConnectionPool opens only by an await in a running loop, which a constructor cannot make."""
    return False


def acallback(obj: Any) -> Any:
    """An object with an `async def __call__`, marked so asyncio.iscoroutinefunction() sees it and its caller
    awaits it (redis.asyncio awaits redis_connect_func only then; a plain instance would be called, not awaited)."""
    obj._is_coroutine = getattr(asyncio.coroutines, "_is_coroutine", None)  # asyncio.iscoroutinefunction
    if hasattr(inspect, "markcoroutinefunction"):  # Python 3.12+: inspect.iscoroutinefunction too
        inspect.markcoroutinefunction(obj)
    return obj


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


async def arun_blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a blocking function (joining a thread) in a worker thread, so the event loop keeps running."""
    return await asyncio.to_thread(fn, *args)
