"""PostgresStore writes: one round trip each, and across an outage maybe_committed tells the truth.

A write is sent at once on a pooled session whose socket heard nothing since its last answer; one that did
(a restart, a terminated session, a reset) is first proven alive. The tests end idle sessions in each of
those ways and check that the next write runs exactly once (on a fresh session) or fails saying "not
committed" with nothing written; and that a session lost after the write was sent says "maybe committed"
and is not sent again. Round trips are counted in libpq's own protocol trace of the pooled session.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import pq

from tiered_cache import StoreUnavailable
from tiered_cache.testing import PostgresServer

from _apis import loop_thread
from _util import wait_until
from faultproxy import FaultProxy

CT, SITE = "app3_clue", 1


def q(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """One autocommit statement with psycopg directly; rows if any."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def rows_with(dsn: str, v: str) -> int:
    """How many rows hold result_json {"v": v}."""
    return q(dsn, "SELECT count(*) FROM biz.ai_cache WHERE result_json->>'v' = %s", (v,))[0][0]


def on_each_session(store: Any, action: Callable[[Any], Any], sessions: int) -> list[Any]:
    """action(conn) on `sessions` pooled connections held at once (the async pool's on the test loop)."""
    target = getattr(store, "_target", None)
    if target is None:
        conns = [store._pool.getconn() for _ in range(sessions)]
        try:
            return [action(c) for c in conns]
        finally:
            for c in conns:
                store._pool.putconn(c)

    async def run() -> list[Any]:
        conns = [await target._pool.getconn() for _ in range(sessions)]
        try:
            return [action(c) for c in conns]
        finally:
            for c in conns:
                await target._pool.putconn(c)

    return loop_thread().run(run())


def frontend_messages(trace: str) -> list[str]:
    """The message types the client sent, in order, from a libpq trace ('F <length> <type> ...' lines)."""
    return [line.split("\t")[2] for line in trace.splitlines() if line.startswith("F\t")]


def round_trips(messages: list[str]) -> int:
    """Each Sync (extended protocol) or Query (simple protocol) waits for one ReadyForQuery."""
    return sum(m in ("Sync", "Query") for m in messages)


def with_port(dsn: str, port: int) -> str:
    """The DSN with another port (a proxy in front of the server)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    return psycopg.conninfo.make_conninfo(**{**info, "port": str(port)})  # type: ignore[arg-type]


# ============================================================================ steady state


def test_a_write_is_one_round_trip_on_a_healthy_pooled_session(make_store: Any, dsn: str) -> None:
    """write_cache, set_generating, finalize and invalidate send one Sync each: no liveness probe before them."""
    s = make_store(dsn, min_size=1, max_size=1)
    gid = s.set_generating(CT, SITE, "g")  # every statement prepared on the one session
    s.finalize_cache(gid, {"v": "warm"})
    s.write_cache(CT, SITE, "t", {"v": "warm"})
    s.invalidate(CT, SITE, "t")
    with tempfile.NamedTemporaryFile("w+") as out:

        def trace(conn: Any) -> None:
            conn.pgconn.trace(os.dup(out.fileno()))  # libpq owns (and never closes) the duplicate
            conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)

        on_each_session(s, trace, 1)
        ids = [s.write_cache(CT, SITE, "t", {"v": i}) for i in range(5)]
        gid = s.set_generating(CT, SITE, "g")
        assert s.finalize_cache(gid, {"v": "done"})  # a read (key_of) and a write
        assert s.invalidate(CT, SITE, "t") == 5  # the five rows just written
        on_each_session(s, lambda conn: conn.pgconn.untrace(), 1)
        with open(out.name) as written:  # the duplicate shares (and moved) out's offset
            sent = frontend_messages(written.read())
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert "Query" not in sent, f"a simple-protocol statement (the old empty probe) was sent: {sent}"
    assert "Parse" not in sent  # all prepared: the figure is the steady state
    assert round_trips(sent) == 5 + 1 + 2 + 1, sent


# ============================================================================ idle sessions ended by the server


ENDINGS = {
    # every session of the store, ended by the server while it sits idle in the pool
    "terminated": lambda pg, dsn, pids: q(dsn, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (pids,)),
    "restarted": lambda pg, dsn, pids: (pg.stop("fast"), pg.start()),
    "crashed": lambda pg, dsn, pids: (pg.kill(), pg.start()),
}


@pytest.mark.fault
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_the_first_write_after_idle_sessions_died_runs_once_on_a_fresh_session(
    make_store: Any, dsn: str, pg_server: PostgresServer, ending: str
) -> None:
    """The pool still holds the dead sessions: the write sees it before sending, and runs once on a new one."""
    s = make_store(dsn, min_size=2, max_size=2, pool_timeout=30)
    first = s.write_cache(CT, SITE, "t", {"v": "before"})
    pids = on_each_session(s, lambda conn: conn.info.backend_pid, 2)
    ENDINGS[ending](pg_server, dsn, pids)
    wait_until(lambda: not set(pids) & {r[0] for r in q(dsn, "SELECT pid FROM pg_stat_activity")}, 30,
               what="the old sessions are gone")
    new = s.write_cache(CT, SITE, "t", {"v": "after"})
    assert new > first
    assert rows_with(dsn, "after") == 1 and rows_with(dsn, "before") == 1
    assert s.get_latest(CT, SITE, "t")["id"] == new  # type: ignore[index]
    assert not set(pids) & set(on_each_session(s, lambda conn: conn.info.backend_pid, 2))


@pytest.mark.fault
def test_a_write_while_postgres_is_down_is_not_committed_and_writes_nothing(
    make_store: Any, dsn: str, pg_server: PostgresServer
) -> None:
    """Idle sessions of a stopped server: StoreUnavailable with maybe_committed=False; no row once it is back."""
    s = make_store(dsn, min_size=2, max_size=2, pool_timeout=1, connect_timeout=1)
    s.write_cache(CT, SITE, "t", {"v": "before"})
    pg_server.stop("fast")
    try:
        with pytest.raises(StoreUnavailable) as info:
            s.write_cache(CT, SITE, "t", {"v": "during"})
        assert info.value.maybe_committed is False, info.value
    finally:
        pg_server.start()
    assert rows_with(dsn, "during") == 0 and rows_with(dsn, "before") == 1
    s.write_cache(CT, SITE, "t", {"v": "after"})  # the same store recovers
    assert rows_with(dsn, "after") == 1


def test_sessions_reset_on_the_way_are_not_committed_and_writes_nothing(make_store: Any, dsn: str,
                                                                       pg_server: PostgresServer) -> None:
    """A firewall resets every idle session and refuses new ones: maybe_committed=False, nothing written."""
    with FaultProxy(pg_server.port) as proxy:
        via = with_port(dsn, proxy.port)
        s = make_store(via, min_size=2, max_size=2, pool_timeout=1, connect_timeout=1)
        s.write_cache(CT, SITE, "t", {"v": "before"})
        proxy.reset()
        with pytest.raises(StoreUnavailable) as info:
            s.write_cache(CT, SITE, "t", {"v": "during"})
        assert info.value.maybe_committed is False, info.value
        proxy.heal()
        assert rows_with(dsn, "during") == 0
        s.write_cache(CT, SITE, "t", {"v": "after"})
        assert rows_with(dsn, "after") == 1


# ============================================================================ lost after sending


def test_a_session_lost_after_the_write_was_sent_is_maybe_committed_and_not_sent_again(
    make_store: Any, dsn: str, pg_server: PostgresServer
) -> None:
    """The write commits, its answer is lost with the session: maybe_committed=True, and exactly one row."""
    with FaultProxy(pg_server.port) as proxy:
        s = make_store(with_port(dsn, proxy.port), min_size=1, max_size=1, pool_timeout=10)
        s.write_cache(CT, SITE, "t", {"v": "before"})
        outcome: list[BaseException | int] = []

        def writer() -> None:
            try:
                outcome.append(s.write_cache(CT, SITE, "t", {"v": "lost answer"}))
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                outcome.append(exc)

        with psycopg.connect(dsn) as locker:  # holds the table so the write waits on the server
            locker.execute("LOCK TABLE biz.ai_cache IN SHARE MODE")
            t = threading.Thread(target=writer)
            t.start()
            wait_until(lambda: q(dsn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                      " AND query LIKE '%%INSERT INTO biz.ai_cache%%'")[0][0] == 1,
                       30, what="the write waits for the lock on the server")
            proxy.blackhole()  # from now on the server's answer is dropped on the way
        wait_until(lambda: rows_with(dsn, "lost answer") == 1, 30, what="the write commits")
        proxy.reset()
        proxy.heal()  # a resend would now go through: it must not happen
        t.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], StoreUnavailable), outcome
        assert outcome[0].maybe_committed is True
        assert rows_with(dsn, "lost answer") == 1
        assert s.write_cache(CT, SITE, "t", {"v": "after"}) > 0
        assert rows_with(dsn, "lost answer") == 1
