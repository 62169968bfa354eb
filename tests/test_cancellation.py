"""AsyncTieredCache writes cancelled (task.cancel() or asyncio.timeout) at each await: never a stale read after.

Each write is stopped at one point, deterministically (an asyncio.Event it waits on, then the cancellation):
in its PostgreSQL call before the statement (nothing committed) or after it (committed, the call not yet
returned), at the start of its Redis kill, or inside it (the command not sent). Meanwhile every kill to
Redis is held, so the write's own kill cannot land and the owed kill is all that stands between a reader
and the old entry: this cache must not read Redis until it landed; another cache must read the new state
once the drainer (or, with the writer's kills stuck for good, the relay) applied it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from tiered_cache import AsyncPostgresStore, AsyncTieredCache, async_redis_client
from tiered_cache._async import lua as alua
from tiered_cache._async import redis_writes as aredis_writes
from tiered_cache.tiers.lua_scripts import KILL_SCRIPT, WRITE_THROUGH_SCRIPT

CT, SITE = "app3_clue", 61
WAIT = 10.0  # seconds any step may take before the test calls it hung


async def until(pred: Callable[[], Any], what: str, timeout: float = WAIT) -> None:
    """Bounded polling inside the loop (the drainer and the relay run meanwhile)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout:.1f} s")
        await asyncio.sleep(0.005)


class Gate:
    """Where the write under test stops: `reached` is set when it gets there; it then waits until cancelled."""

    def __init__(self) -> None:
        self.armed = False
        self.reached = asyncio.Event()

    async def stop_here(self) -> None:
        if self.armed:
            self.armed = False
            self.reached.set()
            await asyncio.Event().wait()  # until cancelled


class GatedStore(AsyncPostgresStore):
    """An AsyncPostgresStore whose write statements stop at `gate` (before or after them) when armed."""

    gate: Gate
    where = ""  # "before" or "after" the statement, for the method named `method`
    method = ""

    async def _gated(self, name: str, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        if name == self.method and self.where == "before":
            await self.gate.stop_here()
        out = await call(*args, **kwargs)
        if name == self.method and self.where == "after":
            await self.gate.stop_here()  # committed: the facade has not seen the outcome
        return out

    async def write(self, params: dict[str, Any]) -> Any:
        return await self._gated("write", super().write, params)

    async def insert_generating(self, params: dict[str, Any]) -> Any:
        return await self._gated("insert_generating", super().insert_generating, params)

    async def finalize(self, params: dict[str, Any]) -> Any:
        return await self._gated("finalize", super().finalize, params)

    async def invalidate_outcome(self, params: dict[str, Any]) -> Any:
        return await self._gated("invalidate_outcome", super().invalidate_outcome, params)

    async def invalidate_site_keys(self, site_id: object, cache_type: object = None, **kwargs: Any) -> Any:
        return await self._gated("invalidate_site_keys", super().invalidate_site_keys, site_id, cache_type, **kwargs)


class KillHold:
    """Every kill and write-through sent to Redis by the async tier waits while the hold is on (the first one,
    when `gate` is armed, stops there for good): the write's kill, and the drainer's, cannot land meanwhile."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gate: Gate) -> None:
        self.gate = gate
        self.open = asyncio.Event()
        evalsha, send = aredis_writes.evalsha, alua.send

        async def held_evalsha(client: Any, script: Any, *args: Any) -> Any:
            if script is WRITE_THROUGH_SCRIPT:
                await self._hold()
            return await evalsha(client, script, *args)

        async def held_send(client: Any, commands: list[Any]) -> Any:
            if any(command is KILL_SCRIPT for command, _ in commands):
                await self._hold()
            return await send(client, commands)

        monkeypatch.setattr(aredis_writes, "evalsha", held_evalsha)
        monkeypatch.setattr(alua, "send", held_send)

    async def _hold(self) -> None:
        await self.gate.stop_here()
        await self.open.wait()


@dataclass(frozen=True)
class Op:
    """A write under test: its store method and tier method (the stop points), and the read whose answer it changes."""

    store_method: str
    tier_method: str
    run: Callable[[AsyncTieredCache, dict[str, int]], Awaitable[Any]]
    read: Callable[[Any], Awaitable[Any]]  # a cache or a store


def latest(c: Any) -> Awaitable[Any]:
    return c.get_latest(CT, SITE, "k")


def history(c: Any) -> Awaitable[Any]:
    return c.get_history(CT, SITE, "k", 3)


OPS = {
    "write_cache": Op("write", "write_through", lambda c, ids: c.write_cache(CT, SITE, "k", {"v": 2}), latest),
    "set_generating": Op("insert_generating", "kill", lambda c, ids: c.set_generating(CT, SITE, "k"), history),
    "finalize_cache": Op("finalize", "write_through", lambda c, ids: c.finalize_cache(ids["gen"], {"v": "final"}),
                         latest),
    "invalidate": Op("invalidate_outcome", "write_through", lambda c, ids: c.invalidate(CT, SITE, "k"), latest),
    "invalidate_site": Op("invalidate_site_keys", "kill", lambda c, ids: c.invalidate_site(SITE), latest),
}
# Where the write stops, and whether PostgreSQL has its change by then.
POINTS = {"before-commit": False, "after-commit": True, "kill-entry": True, "inside-kill": True}


async def stopped(call: Callable[[], Awaitable[Any]], gate: Gate, how: str) -> None:
    """Run the call as a task until it reaches the gate, then cancel it there or let its asyncio.timeout expire."""
    timer: list[asyncio.Timeout] = []

    async def timed() -> Any:
        async with asyncio.timeout(None) as cm:
            timer.append(cm)
            return await call()

    task = asyncio.create_task(call() if how == "cancel" else timed())
    await asyncio.wait_for(gate.reached.wait(), WAIT)
    if how == "cancel":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        timer[0].reschedule(asyncio.get_running_loop().time())  # the deadline is now: it expires at the gate
        with pytest.raises(TimeoutError):
            await task


async def seeded(dsn: str, redis_url: str, op: Op, *, relay: bool = False) -> tuple[Any, ...]:
    """The cache under test (over a GatedStore), another cache (another process, for this key), an admin store;
    the key has a valid row and a placeholder in PostgreSQL, and the other cache has filled its answer in Redis."""
    store = await GatedStore.connect(dsn)
    cache = AsyncTieredCache(store, async_redis_client(redis_url, timeout=2.0), owns_clients=True)
    other = await AsyncTieredCache.connect(dsn, redis_url, redis_timeout=2.0, relay=relay)
    admin = await AsyncPostgresStore.connect(dsn)
    ids = {"v1": await admin.write_cache(CT, SITE, "k", {"v": 1})}
    ids["gen"] = await admin.set_generating(CT, SITE, "k")
    await op.read(other)  # fills Redis with what is served now
    return cache, other, admin, ids


def stored(r: redis.Redis, cache: AsyncTieredCache, op: Op) -> Any:
    ks = cache.keyset(CT, SITE, "k")
    return r.get(ks.entry) if op.read is latest else r.hget(ks.history, "3")


@pytest.mark.parametrize("how", ["cancel", "timeout"])
@pytest.mark.parametrize("point", sorted(POINTS))
@pytest.mark.parametrize("name", sorted(OPS))
def test_a_write_stopped_at_any_await_leaves_no_stale_read(name: str, point: str, how: str, dsn: str, redis_url: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped at `point`: PostgreSQL has the change iff the point is past the statement; the kill is owed; this
    cache reads the truth at once (its kill still held); another cache reads it once the drainer applied it."""
    op = OPS[name]
    r = redis.Redis.from_url(redis_url)

    async def main() -> None:
        cache, other, admin, ids = await seeded(dsn, redis_url, op)
        hold: KillHold | None = None
        try:
            old = await op.read(admin)
            assert stored(r, cache, op) is not None, "the other cache filled the old answer"
            gate = Gate()
            hold = KillHold(monkeypatch, gate)
            if point in ("before-commit", "after-commit"):
                cache.store.gate, cache.store.method = gate, op.store_method  # type: ignore[attr-defined]
                cache.store.where = point.split("-")[0]  # type: ignore[attr-defined]
            elif point == "kill-entry":
                original = getattr(cache.redis, op.tier_method)

                async def entered(*args: Any, **kwargs: Any) -> Any:
                    await gate.stop_here()
                    return await original(*args, **kwargs)

                setattr(cache.redis, op.tier_method, entered)
            gate.armed = True
            await stopped(lambda: op.run(cache, ids), gate, how)

            truth = await op.read(admin)
            assert (truth != old) is POINTS[point], f"committed: {truth != old}, expected {POINTS[point]}"
            assert stored(r, cache, op) is not None, "a kill landed while every kill was held"
            if POINTS[point]:  # (before its commit, invalidate_site has no keys yet and owes nothing)
                assert cache.redis.pending >= 1, "the stopped write's kill was not owed"
            assert await op.read(cache) == truth, "this cache read Redis before its owed kill landed"

            hold.open.set()
            await until(lambda: cache.redis.pending == 0, "the owed kill landing")
            if POINTS[point]:
                assert stored(r, cache, op) is None, "the drainer did not reach Redis"
            assert await op.read(other) == truth, "another cache served the old answer after the kill landed"
            assert await op.read(cache) == truth
            assert await op.read(admin) == truth
        finally:
            if hold is not None:
                hold.open.set()  # let the stuck kills go before the caches close
            monkeypatch.undo()
            for c in (cache, other):
                await c.close()
            await admin.close()

    try:
        asyncio.run(main())
    finally:
        r.close()


@pytest.mark.parametrize("name", sorted(OPS))
def test_the_relay_lands_what_a_stopped_write_owed_when_its_drainer_cannot(name: str, dsn: str, redis_url: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A write cancelled after its commit whose kills never reach Redis (this process's drainer stuck, as if the
    process had died): another process's relay applies the change from the outbox, and it reads the new state."""
    op = OPS[name]
    r = redis.Redis.from_url(redis_url)

    async def main() -> None:
        cache, other, admin, ids = await seeded(dsn, redis_url, op, relay=True)
        hold: KillHold | None = None
        try:
            await until(lambda: other.relay.stats.changes >= 2, "the relay applying the seed")  # type: ignore[union-attr]
            await op.read(other)  # the relay's kills of the seed may have dropped the fill: fill again
            assert stored(r, cache, op) is not None
            old = await op.read(admin)
            gate = Gate()
            hold = KillHold(monkeypatch, gate)  # not opened before the end: this cache's kills stay owed
            cache.store.gate, cache.store.method, cache.store.where = gate, op.store_method, "after"  # type: ignore[attr-defined]
            gate.armed = True
            await stopped(lambda: op.run(cache, ids), gate, "cancel")
            truth = await op.read(admin)
            assert truth != old, "the stopped write committed"
            assert cache.redis.pending >= 1
            assert await op.read(cache) == truth

            async def served() -> Any:
                return await op.read(other)

            deadline = time.monotonic() + WAIT
            while (got := await served()) != truth:
                assert time.monotonic() < deadline, f"another process still served {got!r}, PostgreSQL has {truth!r}"
                await asyncio.sleep(0.01)
            assert cache.redis.pending >= 1, "the relay did it, not this process's drainer"
        finally:
            if hold is not None:
                hold.open.set()  # let the stuck kills go before the caches close
            monkeypatch.undo()
            for c in (cache, other):
                await c.close()
            await admin.close()

    try:
        asyncio.run(main())
    finally:
        r.close()


def test_close_finishes_when_a_redis_socket_is_slow_to_close(dsn: str, redis_url: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A busy machine made the pool's disconnect time out (0.05 s) and close() raised; it now logs and completes."""
    from redis.exceptions import TimeoutError as RedisTimeout

    async def main() -> None:
        cache = await AsyncTieredCache.connect(dsn, redis_url)
        await cache.write_cache(CT, SITE, "slow-close", {"v": 1})
        pool = cache._redis_client.connection_pool
        real = pool.disconnect

        async def slow(*args: Any, **kwargs: Any) -> None:
            await real(*args, **kwargs)
            raise RedisTimeout("Timed out closing connection after 0.05")

        pool.disconnect = slow
        with caplog.at_level("INFO", logger="tiered_cache._async.client"):
            await cache.close()
        assert "Timed out closing connection" in caplog.text
        with pytest.raises(Exception, match="closed"):
            await cache.get_latest(CT, SITE, "slow-close")

    asyncio.run(main())
