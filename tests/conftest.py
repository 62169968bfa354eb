"""Test servers owned by the session: real PostgreSQL and Redis, so tests may stop, restart and flush them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import psycopg
import pytest
import redis

from tiered_cache import PostgresStore, TieredCache, migrate
from tiered_cache.testing import PostgresServer, RedisServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL for the session; tests that stop it start it again."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One throwaway redis-server for the session."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def migrated_dsn(pg_server: PostgresServer) -> str:
    """A database with the schema applied once for the session."""
    dsn = pg_server.create_database("tiered_cache_test")
    migrate(dsn)
    return dsn


def _reset_tables(dsn: str) -> None:
    """Empty every table the library writes, so each test starts from nothing."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
                "WHERE schemaname = 'biz' AND tablename <> 'tiered_cache_migrations'"
            )
        ]
        # As a replica: the truncate must not itself record a change for the relay.
        conn.execute("SET session_replication_role = replica")
        conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")


@pytest.fixture
def dsn(pg_server: PostgresServer, migrated_dsn: str) -> str:
    """The session database, emptied, with the server running."""
    if not pg_server.running:
        pg_server.start()
    _reset_tables(migrated_dsn)
    return migrated_dsn


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session redis-server, running and flushed."""
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.script_flush()
    client.close()
    return redis_server.url


@pytest.fixture
def store(dsn: str) -> Iterator[PostgresStore]:
    """A PostgresStore on the emptied test database."""
    with PostgresStore(dsn) as s:
        yield s


@pytest.fixture
def figure(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print a measured figure: on the terminal (capsys.disabled) and in the captured output (-rA)."""

    def emit(line: str) -> None:
        print(line)
        if request.config.getoption("capture") != "no":
            with capsys.disabled():
                print(line)

    return emit


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which server binaries the run uses, as psycopg's suite does."""
    import subprocess

    from tiered_cache import testing

    lines = []
    try:
        pg = testing.find_postgres_bin_dir() / "postgres"
        rd = testing.find_redis_server()
        for label, binary in (("postgresql", pg), ("redis", rd)):
            version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
            lines.append(f"{label}: {version.strip()} ({binary})")
    except Exception as exc:  # the header must never stop the run; the fixtures report the real error
        lines.append(f"servers: {exc}")
    if os.environ.get("TIERED_CACHE_EMBEDDED_ONLY"):
        lines.append("servers: embedded wheels only (TIERED_CACHE_EMBEDDED_ONLY)")
    return lines


@pytest.fixture
def cache(dsn: str, redis_url: str) -> Iterator[TieredCache]:
    """A TieredCache over the emptied database and the flushed redis-server."""
    with TieredCache.connect(dsn, redis_url) as c:
        yield c
