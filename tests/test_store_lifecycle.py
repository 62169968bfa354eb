"""PostgresStore's sessions: the DSN's own options kept, nothing sent after close(), a forked child on its own pool."""

from __future__ import annotations

import gc
import json
import logging
import os
import select
import signal
import threading
import time
import uuid
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from tiered_cache import AsyncPostgresStore, ConfigurationError, PostgresStore, StoreUnavailable
from tiered_cache.errors import Closed

from _apis import loop_thread
from _util import wait_until

OPTIONS = "-c statement_timeout=4321 -c search_path=biz,public"


def q(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """One autocommit statement with psycopg directly; rows if any."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def with_params(dsn: str, **params: str) -> str:
    """The session DSN (a postgresql:// URI) with query parameters added."""
    sep = "&" if "?" in dsn else "?"
    return dsn + sep + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


def keyword_form(dsn: str, **params: str) -> str:
    """The session DSN as key=value pairs, the other libpq spelling."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    return psycopg.conninfo.make_conninfo(**{**info, **params})  # type: ignore[arg-type]


def pooled(store: Any, *sqls: str, sessions: int = 1) -> list[Any]:
    """The first value of each statement, run on `sessions` pooled connections held at once (all on each).

    A blocking view of an async store runs them on its pool in the test loop (tests/_apis.py).
    """
    target = getattr(store, "_target", None)
    if target is None:
        conns = [store._pool.getconn() for _ in range(sessions)]
        try:
            return [c.execute(sql).fetchone()[0] for c in conns for sql in sqls]
        finally:
            for c in conns:
                store._pool.putconn(c)

    async def run() -> list[Any]:
        conns = [await target._pool.getconn() for _ in range(sessions)]
        try:
            return [(await (await c.execute(sql)).fetchone())[0] for c in conns for sql in sqls]
        finally:
            for c in conns:
                await target._pool.putconn(c)

    return loop_thread().run(run())


def show(store: PostgresStore, *settings: str) -> list[str]:
    """SHOW each setting on one of the store's pooled connections."""
    return pooled(store, *(f"SHOW {s}" for s in settings))


def sessions(dsn: str, app: str) -> set[int]:
    """Backend pids of the sessions that named themselves `app`."""
    return {r[0] for r in q(dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,))}


# ============================================================================ DSN options


@pytest.mark.parametrize("form", ["uri", "key=value"])
def test_the_dsns_own_options_survive_next_to_the_store_zone(make_store: Any, dsn: str, form: str) -> None:
    """A DSN's `options` (statement_timeout, search_path) reach every pooled session, as does TimeZone."""
    given = with_params(dsn, options=OPTIONS) if form == "uri" else keyword_form(dsn, options=OPTIONS)
    with make_store(given) as s:
        assert show(s, "statement_timeout", "search_path", "TimeZone") == ["4321ms", "biz,public", "Asia/Shanghai"]
        assert pooled(s, "SELECT count(*) FROM ai_cache") == [0]  # biz is on the path: its table resolves unqualified
        s.write_cache("app3_clue", 1, "t", {"v": 1})
        assert s.get_latest("app3_clue", 1, "t")["created_at"].endswith("+08:00")  # type: ignore[index]
        assert s.dsn == given  # the relay and tools get the DSN as the user wrote it


def test_pgoptions_from_the_environment_survive_when_the_dsn_has_none(make_store: Any, dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """libpq takes PGOPTIONS when the DSN names no options; the store's own options must not hide it."""
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=4321")
    with make_store(dsn) as s:
        assert show(s, "statement_timeout", "TimeZone") == ["4321ms", "Asia/Shanghai"]


def test_pgtz_and_pgdatestyle_in_the_environment_do_not_change_the_sessions(make_store: Any, 
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq sends PGTZ / PGDATESTYLE after `options`; the store still renders in its zone, ISO style."""
    monkeypatch.setenv("PGTZ", "UTC")
    monkeypatch.setenv("PGDATESTYLE", "German")
    with make_store(dsn) as s:
        assert show(s, "TimeZone", "DateStyle") == ["Asia/Shanghai", "ISO, DMY"]
        s.write_cache("app3_clue", 1, "t", {"v": 1})
        assert s.get_latest("app3_clue", 1, "t")["created_at"].endswith("+08:00")  # type: ignore[index]


def test_the_store_zone_wins_over_a_timezone_in_the_dsn(make_store: Any, dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """-c TimeZone=UTC in the DSN: the store still renders in its policy's zone, and says so in the log."""
    given = with_params(dsn, options="-c TimeZone=UTC -c statement_timeout=4321")
    with caplog.at_level(logging.WARNING, logger="tiered_cache"):
        with make_store(given) as s:
            assert show(s, "TimeZone", "statement_timeout", "DateStyle") == ["Asia/Shanghai", "4321ms", "ISO, MDY"]
            s.write_cache("app3_clue", 1, "t", {"v": 1})
            assert s.get_latest("app3_clue", 1, "t")["expires_at"].endswith("+08:00")  # type: ignore[index]
    assert any("TimeZone" in r.getMessage() and "Asia/Shanghai" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("cls", [PostgresStore, AsyncPostgresStore])
def test_a_dsn_libpq_cannot_parse_is_a_configuration_error(cls: Any) -> None:
    """Refused when the store is built, naming the dsn, instead of failing every call later."""
    with pytest.raises(ConfigurationError) as info:
        cls("host=127.0.0.1 port", open=False)
    assert str(info.value).startswith("dsn:")


# ============================================================================ after close()


def test_every_call_after_close_raises_closed_and_sends_nothing(make_store: Any, dsn: str) -> None:
    """After close(): Closed (not StoreUnavailable, so no maybe_committed), and no session is opened."""
    app = f"tc-closed-{uuid.uuid4().hex[:8]}"
    s = make_store(with_params(dsn, application_name=app), min_size=1, max_size=2)
    rid = s.write_cache("app3_clue", 1, "t", {"v": 1})
    gid = s.set_generating("app3_clue", 1, "g")
    assert sessions(dsn, app) and not s.closed
    s.close()
    s.close()  # idempotent
    assert s.closed
    wait_until(lambda: not sessions(dsn, app), timeout=30, what="the closed pool's sessions end")
    calls = {
        "write_cache": lambda: s.write_cache("app3_clue", 1, "t", {"v": 2}),
        "write": lambda: s.write(s.prepare_write("app3_clue", 1, "t", {"v": 2})),
        "get_latest": lambda: s.get_latest("app3_clue", 1, "t"),
        "get_history": lambda: s.get_history("app3_clue", 1, "t"),
        "get_many": lambda: s.get_many("app3_clue", 1, ["t"]),
        "set_generating": lambda: s.set_generating("app3_clue", 1, "t"),
        "finalize_cache": lambda: s.finalize_cache(gid, {"v": 3}),
        "invalidate": lambda: s.invalidate("app3_clue", 1, "t"),
        "invalidate_site": lambda: s.invalidate_site(1),
        "sweep": lambda: s.sweep(),
        "ping": lambda: s.ping(),
    }
    for name, call in calls.items():
        with pytest.raises(Closed) as info:
            call()
        assert not isinstance(info.value, StoreUnavailable), name
        assert "closed" in str(info.value) and "not sent" in str(info.value), f"{name}: {info.value}"
    assert not sessions(dsn, app)
    assert q(dsn, "SELECT id, status FROM biz.ai_cache ORDER BY id") == [(rid, "valid"), (gid, "generating")]


def test_a_store_closed_before_it_ever_connected_raises_closed_at_once(make_store: Any, ) -> None:
    """open=False then close(): nothing listens on port 1, yet no call even tries it (no pool_timeout wait)."""
    s = make_store("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", open=False, pool_timeout=30)
    s.close()
    t0 = time.monotonic()
    for call in (lambda: s.get_latest("app3_clue", 1, "t"), lambda: s.write_cache("app3_clue", 1, "t", {}),
                 s.sweep):
        with pytest.raises(Closed):
            call()
    assert time.monotonic() - t0 < 10  # a connection attempt would wait pool_timeout (30 s)


def test_a_call_waiting_for_a_connection_when_close_runs_gets_closed(make_store: Any, dsn: str) -> None:
    """A write queued for the pool's only connection when close() runs: Closed, never 'maybe committed'."""
    s = make_store(dsn, min_size=1, max_size=1, pool_timeout=30)
    s.ping()
    outcome: list[BaseException | int] = []

    def writer() -> None:
        try:
            outcome.append(s.write_cache("app3_clue", 1, "t", {"v": 1}))
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    held = s._pool.getconn()  # hold the only connection
    try:
        t = threading.Thread(target=writer)
        t.start()
        wait_until(lambda: s._pool.get_stats().get("requests_waiting", 0) >= 1, timeout=30, what="writer waits")
        s.close()
        t.join(30)
    finally:
        s._pool.putconn(held)
    assert len(outcome) == 1 and isinstance(outcome[0], Closed), outcome
    assert q(dsn, "SELECT count(*) FROM biz.ai_cache") == [(0,)]


# ============================================================================ fork


def _in_child(run: Any) -> dict[str, Any]:
    """Fork; the child runs run() and reports its result (or error) as JSON; the parent returns it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest, never run its exit handlers
        code = 0
        try:
            os.close(r)
            report: dict[str, Any] = {"ok": run()}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            report, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
        try:
            os.write(w, json.dumps(report).encode())
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 60)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the forked child did not report within 60 s")
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return json.loads(data or b'{"error": "the child reported nothing"}')


def test_a_forked_child_uses_its_own_pool_and_leaves_the_parents_sessions_alone(make_store: Any, dsn: str) -> None:
    """The child reads and writes on fresh sessions, closes its store; the parent's pooled sessions still work."""
    app = f"tc-fork-{uuid.uuid4().hex[:8]}"
    with make_store(with_params(dsn, application_name=app), min_size=2, max_size=2) as s:
        first = s.write_cache("app3_clue", 1, "t", {"by": "parent"})
        s._pool.wait(timeout=30)
        parent = sessions(dsn, app)
        assert len(parent) == 2

        def child() -> dict[str, Any]:
            seen = s.get_latest("app3_clue", 1, "t")
            pid = pooled(s, "SELECT pg_backend_pid()")[0]
            wrote = s.write_cache("app3_clue", 1, "t", {"by": "child"})
            s.close()  # must close the child's pool only: the inherited one is never touched
            gc.collect()
            return {"seen": seen["id"] if seen else None, "pid": pid, "wrote": wrote}

        report = _in_child(child)
        assert "error" not in report, report["error"]
        assert report["ok"]["seen"] == first
        assert report["ok"]["pid"] not in parent, "the child used a session of the parent's pool"
        # each of the parent's pooled sessions still answers on its own socket (no reconnect behind our back)
        used = set(pooled(s, "SELECT pg_backend_pid()", sessions=2))
        assert used == parent
        got = s.get_latest("app3_clue", 1, "t")
        assert got is not None and got["id"] == report["ok"]["wrote"] and got["result_json"] == {"by": "child"}
        assert s.write_cache("app3_clue", 1, "t", {"by": "parent again"}) > report["ok"]["wrote"]
        assert sessions(dsn, app) == parent


def test_a_child_forked_from_a_closed_store_stays_closed(make_store: Any, dsn: str) -> None:
    """close() in the parent holds in the child too: no fresh pool is opened there."""
    s = make_store(dsn)
    s.ping()
    s.close()

    def child() -> str:
        try:
            s.get_latest("app3_clue", 1, "t")
        except Closed as exc:
            return f"Closed: {exc}"
        return "served"

    report = _in_child(child)
    assert report.get("ok", "").startswith("Closed"), report
