"""One test source for both APIs: a blocking view of the async objects, driven on a loop in its own thread.

A test written against the sync API gets `TieredCache`/`PostgresStore` or, parametrized, the async ones
behind `Blocking`: every coroutine a call returns is run to completion on the session's event loop thread,
and objects of the async package (or of redis.asyncio) come back wrapped too. The async code runs on a real
event loop, as a FastAPI app runs it; only the test's own thread blocks.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Coroutine
from typing import Any

_WRAPPED_MODULES = ("tiered_cache._async", "tiered_cache._lean", "redis.asyncio", "psycopg_pool.pool_async")


class LoopThread:
    """An event loop running forever in a daemon thread; run() blocks the caller until a coroutine is done."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-event-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


_loop: LoopThread | None = None
_loop_guard = threading.Lock()


def loop_thread() -> LoopThread:
    """The process's test loop (made on first use; a forked child makes its own)."""
    global _loop
    with _loop_guard:
        if _loop is None or not _loop._thread.is_alive():
            _loop = LoopThread()
        return _loop


def _wants_wrapping(value: Any) -> bool:
    module = type(value).__module__ or ""
    return module.startswith(_WRAPPED_MODULES)


def _unwrap(value: Any) -> Any:
    return value._target if isinstance(value, Blocking) else value


class Blocking:
    """A sync view of an async object: calls that return awaitables are awaited on the loop thread."""

    __slots__ = ("_target",)

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if callable(value) and not isinstance(value, type):
            return _blocking_call(value)
        return Blocking(value) if _wants_wrapping(value) else value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, _unwrap(value))

    def __enter__(self) -> Blocking:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Blocking({self._target!r})"

    def __len__(self) -> int:
        return len(self._target)


def _blocking_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_unwrap(a) for a in args)
        kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
        if threading.current_thread() is loop_thread()._thread:
            # Called from the library itself (a test patched a method with a plain function calling the
            # original): hand back what the original returns, a coroutine its caller awaits.
            return fn(*args, **kwargs)
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__func__", None)):
            result = loop_thread().run(fn(*args, **kwargs))
        else:
            # Plain methods may still need the loop (redis.asyncio builds pipelines, pools bind to it):
            # call on the loop thread, then await whatever came back.
            async def on_loop() -> Any:
                out = fn(*args, **kwargs)
                return (await out) if inspect.isawaitable(out) else out

            result = loop_thread().run(on_loop())
        return Blocking(result) if _wants_wrapping(result) else result

    return call


def blocking(factory: Callable[..., Any]) -> Callable[..., Any]:
    """A sync constructor for an async class or async classmethod: built on the loop, handed back wrapped."""
    return _blocking_call(factory)


# -- building either API's objects from parts ------------------------------------------------------


def open_store(api: str, cls: type, dsn: str, **options: Any) -> Any:
    """A store of class `cls` (a PostgresStore or, for api 'async', an AsyncPostgresStore subclass) with its pool open."""
    return cls(dsn, **options) if api == "sync" else blocking(cls.connect)(dsn, **options)


def new_redis_client(api: str, url: str, **options: Any) -> Any:
    """The library's bounded Redis client of that API (redis_client or async_redis_client)."""
    if api == "sync":
        from tiered_cache import redis_client

        return redis_client(url, **options)
    from tiered_cache import async_redis_client

    return blocking(async_redis_client)(url, **options)


def connect_cache(api: str, dsn: str, redis_url: str, **options: Any) -> Any:
    """TieredCache.connect, or AsyncTieredCache.connect behind Blocking (in a spawned child too: it makes its own loop)."""
    from tiered_cache import AsyncTieredCache, TieredCache

    if api == "sync":
        return TieredCache.connect(dsn, redis_url, **options)
    return blocking(AsyncTieredCache.connect)(dsn, redis_url, **options)


def target(obj: Any) -> Any:
    """The object behind a Blocking view (itself for a sync one): for a test that patches an instance attribute."""
    return _unwrap(obj)


def new_cache(api: str, store: Any, client: Any, **options: Any) -> Any:
    """A TieredCache (or AsyncTieredCache behind Blocking) over a store and client built above."""
    from tiered_cache import AsyncTieredCache, TieredCache

    return TieredCache(store, client, **options) if api == "sync" else blocking(AsyncTieredCache)(store, client, **options)


Hook = Callable[..., Any]


def with_hooks(base: type, hooks: dict[str, tuple[Hook | None, Hook | None]], name: str,
               mixins: tuple[type, ...] = ()) -> type:
    """A subclass of `base` whose named methods call plain-function hooks before and after them: one test
    source for both stores. `before(store, args)` returns a mark; `after(store, args, outcome, mark)`.

    A hook may block (wait for a test's threading.Event, read PostgreSQL through a sync store): on an async
    base it runs in a worker thread (asyncio.to_thread), so the event loop keeps serving every other task,
    as a real pause at an await would.
    """
    asynchronous = inspect.iscoroutinefunction(base.write)
    namespace: dict[str, Any] = {}
    for method, (before, after) in hooks.items():
        original = getattr(base, method)
        namespace[method] = (_async_hooked if asynchronous else _sync_hooked)(original, before, after)
    return type(name, (*mixins, base), namespace)


def _sync_hooked(original: Callable[..., Any], before: Hook | None, after: Hook | None) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        mark = before(self, args) if before is not None else None
        out = original(self, *args, **kwargs)
        if after is not None:
            after(self, args, out, mark)
        return out

    return method


def _async_hooked(original: Callable[..., Any], before: Hook | None, after: Hook | None) -> Callable[..., Any]:
    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        mark = await asyncio.to_thread(before, self, args) if before is not None else None
        out = await original(self, *args, **kwargs)
        if after is not None:
            await asyncio.to_thread(after, self, args, out, mark)
        return out

    return method
