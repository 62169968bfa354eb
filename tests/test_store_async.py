"""AsyncPostgresStore used as an async service uses it: on one event loop, with gather, cancel and asyncio.timeout.

Each test is a coroutine run by asyncio.run inside a plain test (no pytest-asyncio). A write is held in
the server deterministically by a table lock another session takes; the tests wait for it with bounded polling.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from tiered_cache import AsyncPostgresStore, PostgresStore, StoreUnavailable

WAIT = 30.0  # generous bound for anything the tests wait on (a busy machine)


def with_app(dsn: str, app: str) -> str:
    """The session DSN (a postgresql:// URI) naming its sessions `app` in pg_stat_activity."""
    return dsn + ("&" if "?" in dsn else "?") + f"application_name={quote(app, safe='')}"


async def q(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """One autocommit statement on a connection of its own; rows if any."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall() if cur.description else []


async def until(what: str, check: Any) -> None:
    """Poll the coroutine function check() until it is true, for at most WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting: {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def table_locked(dsn: str) -> AsyncIterator[None]:
    """Another session holds biz.ai_cache in EXCLUSIVE mode: every write waits in the server until it ends."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("LOCK TABLE biz.ai_cache IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            await conn.rollback()


async def waiting_on_lock(dsn: str, app: str) -> bool:
    """True once a session of `app` is waiting in the server for a lock (its statement is running)."""
    rows = await q(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                        " AND wait_event_type = 'Lock'", (app,))
    return rows[0][0] > 0


async def states(dsn: str, app: str) -> list[str]:
    """The state of every session of `app` ('idle', 'active', ...)."""
    return [r[0] for r in await q(dsn, "SELECT state FROM pg_stat_activity WHERE application_name = %s", (app,))]


async def assert_pool_sound(store: AsyncPostgresStore, dsn: str, app: str) -> None:
    """No connection leaked or left running a statement: the pool's one connection serves a write and a read."""
    rid = await asyncio.wait_for(store.write_cache("app3_clue", 1, "after", {"v": "after"}), WAIT)
    got = await asyncio.wait_for(store.get_latest("app3_clue", 1, "after"), WAIT)
    assert got is not None and got["id"] == rid
    stats = store._pool.get_stats()
    assert stats["connections_num"] <= 1 and stats.get("requests_waiting", 0) == 0, stats
    await until("the store's sessions are idle", lambda: _all_idle(dsn, app))


async def _all_idle(dsn: str, app: str) -> bool:
    found = await states(dsn, app)
    return bool(found) and all(s == "idle" for s in found)


def test_connect_opens_the_pool_in_the_loop_and_the_shared_classes_are_the_sync_ones(dsn: str) -> None:
    """connect() returns an open store; async with closes it; results are the very classes the sync store returns."""
    from tiered_cache.tiers import postgres

    async def main() -> None:
        async with await AsyncPostgresStore.connect(dsn, min_size=1) as store:
            await store._pool.wait(timeout=WAIT)  # opened by connect(): its connection is there
            outcome = await store.write(store.prepare_write("app3_clue", 1, "t", {"v": 1}))
            assert type(outcome) is postgres.WriteOutcome
            assert type(await store.sweep()) is postgres.SweepReport
        assert store.closed

    asyncio.run(main())
    assert PostgresStore.__module__ == "tiered_cache._sync.store"


def test_fifty_concurrent_get_many_on_one_store(dsn: str, figure: Any) -> None:
    """50 get_many(50) gathered on one store of 4 connections: every one answers in full, the pool stays bounded."""

    async def main() -> None:
        async with await AsyncPostgresStore.connect(dsn, min_size=1, max_size=4, pool_timeout=WAIT) as store:
            ids = [f"t{i}" for i in range(50)]
            written = {t: await store.write_cache("app3_clue", 1, t, {"t": t}) for t in ids}
            t0 = time.perf_counter()
            pages = await asyncio.gather(*(store.get_many("app3_clue", 1, ids) for _ in range(50)))
            elapsed = time.perf_counter() - t0
            for page in pages:
                assert list(page) == ids
                assert {t: row["id"] for t, row in page.items()} == written  # type: ignore[index]
                assert all(row["result_json"] == {"t": t} for t, row in page.items())  # type: ignore[index]
            stats = store._pool.get_stats()
            assert stats["connections_num"] <= 4 and stats["requests_num"] >= 50, stats
            figure(f"50 concurrent get_many(50) on one AsyncPostgresStore (max_size=4): {elapsed * 1000:.1f} ms, "
                   f"{stats.get('requests_waiting', 0)} left waiting")

    asyncio.run(main())


def test_a_write_cancelled_while_its_statement_runs(dsn: str) -> None:
    """Cancelled while the INSERT waits in the server: CancelledError, the statement is cancelled there, nothing
    is written, and the pool's only connection serves the next calls."""
    app = f"tc-cancel-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with await AsyncPostgresStore.connect(with_app(dsn, app), min_size=1, max_size=1,
                                                    pool_timeout=WAIT) as store:
            await store.ping()
            async with table_locked(dsn):
                task = asyncio.create_task(store.write_cache("app3_clue", 1, "t", {"v": "cancelled"}))
                await until("the write waits for the table lock", lambda: waiting_on_lock(dsn, app))
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                # psycopg cancelled the statement in the server before the task ended: it no longer waits
                assert not await waiting_on_lock(dsn, app)
            assert await q(dsn, "SELECT count(*) FROM biz.ai_cache WHERE target_id = 't'") == [(0,)]
            await assert_pool_sound(store, dsn, app)

    asyncio.run(main())


def test_asyncio_timeout_around_a_write_and_a_read(dsn: str) -> None:
    """asyncio.timeout expiring while a write waits in the server: TimeoutError (not StoreUnavailable), nothing
    written, the store usable; a read inside a generous timeout is unaffected."""
    app = f"tc-timeout-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with await AsyncPostgresStore.connect(with_app(dsn, app), min_size=1, max_size=1,
                                                    pool_timeout=WAIT) as store:
            await store.ping()
            async with table_locked(dsn):
                with pytest.raises(TimeoutError) as info:
                    async with asyncio.timeout(0.5):
                        await store.write_cache("app3_clue", 1, "t", {"v": "timed out"})
                assert not isinstance(info.value, StoreUnavailable)
            assert await q(dsn, "SELECT count(*) FROM biz.ai_cache WHERE target_id = 't'") == [(0,)]
            await assert_pool_sound(store, dsn, app)
            async with asyncio.timeout(WAIT):
                assert (await store.get_many("app3_clue", 1, ["after"]))["after"] is not None

    asyncio.run(main())


def test_a_call_cancelled_while_it_waits_for_a_connection_leaves_no_waiter(dsn: str) -> None:
    """Cancelled while queued for the pool's only connection: it leaves the queue; the pool serves later calls."""
    app = f"tc-queue-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with await AsyncPostgresStore.connect(with_app(dsn, app), min_size=1, max_size=1,
                                                    pool_timeout=WAIT) as store:
            await store.ping()
            held = await store._pool.getconn()
            try:
                task = asyncio.create_task(store.get_latest("app3_clue", 1, "t"))

                async def queued() -> bool:
                    return store._pool.get_stats().get("requests_waiting", 0) >= 1

                await until("the read waits for a connection", queued)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            finally:
                await store._pool.putconn(held)
            await assert_pool_sound(store, dsn, app)

    asyncio.run(main())
