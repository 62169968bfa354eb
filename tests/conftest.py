"""Test servers owned by the session: real PostgreSQL and Redis, so tests may stop, restart and flush them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tiered_cache import PostgresStore, TieredCache, migrate
from tiered_cache.testing import PostgresServer, RedisServer, empty_tables

pytest_plugins = ["_deployments"]  # the local Redis Cluster and Sentinel deployments (tests/_deployments.py)


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
    """Empty every table the library writes, so each test starts from nothing (the plugin's own reset)."""
    empty_tables(dsn)


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
def cache(dsn: str, redis_url: str, make_cache: Callable[..., TieredCache]) -> TieredCache:
    """A TieredCache (or, parametrized, an AsyncTieredCache behind a blocking view) over emptied servers."""
    return make_cache(dsn, redis_url)


# -- one test source, both APIs ---------------------------------------------------------------------
# `api` parametrizes a test over the sync classes and the async ones (behind tests/_apis.Blocking, run on
# a real event loop in a thread). Tests take `make_cache` / `make_store` instead of calling connect().

API_NAMES = ("sync", "async")


@pytest.fixture(params=API_NAMES)
def api(request: pytest.FixtureRequest) -> str:
    """Which API the test drives: 'sync' (TieredCache, PostgresStore) or 'async' (their Async twins)."""
    return request.param


@pytest.fixture
def make_store(api: str) -> Iterator[Callable[..., PostgresStore]]:
    """Build a PostgresStore (or a blocking view of an AsyncPostgresStore); every one is closed after the test."""
    made: list[Any] = []

    def build(dsn: str, **options: Any) -> Any:
        if api == "sync":
            store = PostgresStore(dsn, **options)
        else:
            from _apis import blocking

            from tiered_cache import AsyncPostgresStore

            store = blocking(AsyncPostgresStore.connect)(dsn, **options)
        made.append(store)
        return store

    yield build
    for store in made:
        store.close()


@pytest.fixture
def make_cache(api: str) -> Iterator[Callable[..., TieredCache]]:
    """TieredCache.connect (or AsyncTieredCache.connect behind a blocking view); every one is closed after."""
    made: list[Any] = []

    def build(dsn: str, redis_url: str, **options: Any) -> Any:
        from _apis import connect_cache

        cache = connect_cache(api, dsn, redis_url, **options)
        made.append(cache)
        return cache

    yield build
    for cache in made:
        cache.close()
