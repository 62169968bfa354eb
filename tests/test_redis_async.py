"""The async Redis tier in its own event loop (asyncio.run inside plain tests, no plugin): many tasks on one
client, a write cancelled at its await, the owed-kill drainer as a task, the restart watch on redis.asyncio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from faultproxy import FaultProxy
from tiered_cache._async import lua as alua
from tiered_cache._async import redis_writes as aredis_writes
from tiered_cache._async.client import async_redis_client
from tiered_cache._async.redis_tier import AsyncRedisTier
from tiered_cache._async.runwatch import AsyncRunWatch
from tiered_cache.contracts import DOWN, MISS
from tiered_cache.policy.entries import encode_entry
from tiered_cache.policy.keys import KeySpace
from tiered_cache.testing import RedisServer

CT, SITE = "app3_clue", 41
ROW = {"id": 7, "expires_at": None, "result_json": {"v": 7}}


async def until(pred: Callable[[], Any], timeout: float, what: str) -> None:
    """Bounded polling inside the loop (other tasks run meanwhile)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout:.1f} s")
        await asyncio.sleep(0.005)


def drainers() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "tiered_cache-kills" and not t.done()]


def test_many_tasks_share_one_client_and_each_gets_its_own_answer(redis_url: str, figure: Callable[[str], None]) -> None:
    """200 concurrent get_raw and 50 get_raws tasks on one client with 16 pooled connections: every task gets the
    bytes of its own keys (no answer crosses tasks), the pool is never exceeded, nothing counts as an error."""
    admin = redis.Redis.from_url(redis_url)
    keys = KeySpace("many")
    entries = [keys.entry(CT, SITE, f"t{i}") for i in range(200)]
    admin.mset({e: f"value-{i}".encode() for i, e in enumerate(entries)})

    async def main() -> tuple[list[Any], list[Any], float, Any]:
        client = async_redis_client(redis_url, timeout=5.0, max_connections=16)
        tier = AsyncRedisTier(client, keys)
        try:
            t0 = time.perf_counter()
            singles = [asyncio.create_task(tier.get_raw(e)) for e in entries]
            batches = [asyncio.create_task(tier.get_raws([entries[(i + j) % 200] for j in range(10)] + ["many:nope"]))
                       for i in range(50)]
            got = await asyncio.gather(*singles), await asyncio.gather(*batches)
            took = time.perf_counter() - t0
            pool = client.connection_pool
            return got[0], got[1], took, (len(pool._in_use_connections) + len(pool._available_connections), tier.stats)
        finally:
            await tier.close()
            await client.aclose()

    singles, batches, took, (connections, stats) = asyncio.run(main())
    admin.close()
    assert singles == [f"value-{i}".encode() for i in range(200)]
    assert batches == [[f"value-{(i + j) % 200}".encode() for j in range(10)] + [MISS] for i in range(50)]
    assert connections <= 16
    assert (stats.errors, stats.saturated, stats.skipped) == (0, 0, 0)
    assert (stats.hits, stats.misses) == (200 + 500, 50)
    figure(f"async tier: 250 concurrent reads (700 keys) on one client, 16 connections: {took * 1000:.1f} ms")


def _hang(entered: asyncio.Event, original: Callable[..., Any]) -> Callable[..., Any]:
    """The first call never answers (the task is cancelled there, at the await of its kill); later ones go through."""

    async def hang(*args: Any, **kwargs: Any) -> Any:
        if entered.is_set():
            return await original(*args, **kwargs)
        entered.set()
        await asyncio.Event().wait()

    return hang


@pytest.mark.parametrize("how", ["cancel", "timeout"])
@pytest.mark.parametrize("path", ["write_through", "kill"])
def test_a_write_cancelled_at_its_kill_leaves_the_kill_owed_and_it_lands(redis_url: str, monkeypatch: pytest.MonkeyPatch,
                                                                         path: str, how: str) -> None:
    """write_through (EVALSHA) or kill (pipeline) interrupted at its await, by task.cancel() or asyncio.timeout:
    the kill is owed before the CancelledError goes on, this tier reads no stale entry, and the drainer lands it."""
    admin = redis.Redis.from_url(redis_url)
    keys = KeySpace("cancel")
    ks = keys.keyset(CT, SITE, "k")

    async def main() -> None:
        client = async_redis_client(redis_url, timeout=2.0)
        tier = AsyncRedisTier(client, keys)
        try:
            token = await tier.lease_for_write(ks)
            assert isinstance(token, str)
            admin.set(ks.entry, b"stale")  # what another process filled before our commit
            entered = asyncio.Event()
            if path == "write_through":
                monkeypatch.setattr(aredis_writes, "evalsha", _hang(entered, aredis_writes.evalsha))
                call = tier.write_through(ks, token, ROW, "1")
            else:
                monkeypatch.setattr(alua, "send", _hang(entered, alua.send))
                call = tier.kill([ks])
            if how == "cancel":
                task = asyncio.create_task(call)
                await asyncio.wait_for(entered.wait(), 10)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await call
                assert entered.is_set()
            assert tier.pending == 1, "the interrupted kill was not owed"
            assert admin.get(ks.entry) == b"stale"
            await until(lambda: tier.pending == 0, 10, "the owed kill landing")
            assert admin.get(ks.entry) is None, "the owed kill did not reach Redis"
            assert await tier.get_raw(ks.entry) is MISS
        finally:
            monkeypatch.undo()
            await tier.close()
            await client.aclose()

    try:
        asyncio.run(main())
    finally:
        admin.close()


def test_owe_records_kills_with_no_io_and_the_drainer_lands_them(redis_url: str) -> None:
    """owe() (the facade's call when a write is cancelled between its commit and its kill) is synchronous: the
    kills are owed at once, reads answer DOWN until they landed, then read Redis again."""
    admin = redis.Redis.from_url(redis_url)
    keys = KeySpace("owe")
    kss = [keys.keyset(CT, SITE, f"k{i}") for i in range(3)]
    for ks in kss:
        admin.set(ks.entry, b"stale")

    async def main() -> None:
        client = async_redis_client(redis_url, timeout=2.0)
        tier = AsyncRedisTier(client, keys)
        try:
            assert tier.owe(kss) is None and tier.pending == 3  # not a coroutine: no await, no I/O
            await until(lambda: tier.pending == 0, 10, "owed kills landing")
            assert admin.exists(*(ks.entry for ks in kss)) == 0
            assert await tier.get_raw(kss[0].entry) is MISS
        finally:
            await tier.close()
            await client.aclose()

    try:
        asyncio.run(main())
    finally:
        admin.close()


@pytest.mark.fault
def test_the_drainer_is_a_task_that_lands_owed_kills_and_stops_on_close(redis_url: str) -> None:
    """With Redis unreachable a kill is owed and one drainer task retries it; healed, the kill lands and the task
    ends; owed again and closed while Redis is still down, the task stops with close()."""
    proxy = FaultProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0])).start()
    admin = redis.Redis.from_url(redis_url)
    keys = KeySpace("drainer")
    a, b = keys.keyset(CT, SITE, "a"), keys.keyset(CT, SITE, "b")
    admin.set(a.entry, b"stale")

    async def main() -> None:
        client = async_redis_client(f"redis://127.0.0.1:{proxy.port}/0", timeout=0.2)
        tier = AsyncRedisTier(client, keys)
        try:
            assert await tier.get_raw(a.entry) == b"stale"
            proxy.reset()
            await tier.kill([a])
            assert tier.pending == 1 and len(drainers()) == 1, "no drainer task runs for the owed kill"
            assert await tier.get_raw(a.entry) is DOWN
            await asyncio.sleep(0.3)
            assert len(drainers()) == 1 and tier.pending == 1
            proxy.heal()
            await until(lambda: tier.pending == 0, 15, "the drainer landing the owed kill")
            assert admin.get(a.entry) is None
            await until(lambda: not drainers(), 5, "the drainer task ending once nothing is owed")
            proxy.reset()
            await tier.kill([b])
            assert tier.pending == 1 and len(drainers()) == 1
            await tier.close()
            assert not drainers(), "the drainer task outlived close()"
            assert not tier._owed.draining
        finally:
            await tier.close()
            await client.aclose()

    try:
        asyncio.run(main())
    finally:
        admin.close()
        proxy.close()


@pytest.mark.fault
def test_the_run_watch_on_an_async_client_drops_the_namespace_after_a_restart() -> None:
    """redis.asyncio awaits the restart watch on every new connection: after a restart from a snapshot holding an
    old entry, the first new connection drops the namespace (and only it) before any read is served."""
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        keys = KeySpace("rw")
        ks = keys.keyset(CT, SITE, "k")

        async def main() -> None:
            client = async_redis_client(server.url, timeout=1.0)
            watch = client.connection_pool.connection_kwargs["redis_connect_func"]
            assert isinstance(watch, AsyncRunWatch)
            tier = AsyncRedisTier(client, keys)
            try:
                admin.set(ks.entry, encode_entry(ROW))
                admin.set("other:key", b"kept")
                assert await tier.get_raw(ks.entry) == encode_entry(ROW)
                assert watch.run_id is not None and watch.restarts == 0
                assert admin.save()
                admin.delete(ks.entry)  # the kill the snapshot does not have
                server.kill()
                server.start()
                assert admin.get(ks.entry) == encode_entry(ROW), "the restarted Redis reloaded the old entry (premise)"
                deadline = time.monotonic() + 10
                got = DOWN
                while got is DOWN and time.monotonic() < deadline:  # the pooled connection died with the old run
                    got = await tier.get_raw(ks.entry)
                    await asyncio.sleep(0.05)
                assert got is MISS, got
                assert watch.restarts == 1
                assert admin.get(ks.entry) is None and admin.get("other:key") == b"kept"
            finally:
                await tier.close()
                await client.aclose()

        try:
            asyncio.run(main())
        finally:
            admin.close()
