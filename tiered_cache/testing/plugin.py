"""pytest fixtures for testing code that uses tiered_cache, on throwaway real servers or on fakeredis.

The `pytest11` entry point loads this module wherever tiered_cache is installed. It only adds
fixtures and the `tiered_cache` marker: no server starts, and nothing else in a session changes,
until a test asks for one of the fixtures. `pytest -p no:tiered_cache` leaves it out entirely.

    tiered_cache_postgres   session: DSN of a migrated database on a throwaway PostgreSQL
    tiered_cache_redis      session: URL of a throwaway redis-server
    tiered_cache            per test: a TieredCache on both, tables emptied and Redis flushed first
    tiered_cache_fake       per test: a TieredCache whose Redis is fakeredis (in memory, empty each test);
                            PostgreSQL stays real, it is the system of record

    @pytest.mark.tiered_cache(near_max_entries=1000)   TieredCache options for the two cache fixtures
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tiered_cache import TieredCache

MARKER = "tiered_cache"

#: The fixture's Redis calls wait up to 1 s (the library's 50 ms suits production): a loaded CI machine
#: would otherwise open the breaker now and then and make a user's test about hit counts flaky.
TEST_REDIS_TIMEOUT = 1.0

_LISTENER_READY = 30.0  # seconds for the near tier's listener to subscribe, generous for a busy machine
_LISTENER_FAILURES = 3  # failed subscribe attempts in a row that end the wait early

#: Why a near tier may not start on fakeredis (it has no INFO command, which the listener asks first).
FAKE_NEAR_HINT = " (on fakeredis)"


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, so suites run with --strict-markers accept it."""
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**options): TieredCache options for the tiered_cache and tiered_cache_fake fixtures, "
        "e.g. near_max_entries=1000 to turn the near tier on",
    )


@pytest.fixture(scope="session")
def tiered_cache_postgres() -> Iterator[str]:
    """DSN of a migrated database on a throwaway PostgreSQL, started on first use and removed at session end."""
    from tiered_cache import migrate

    from .postgres import PostgresServer

    with PostgresServer() as server:
        dsn = server.create_database("tiered_cache")
        migrate(dsn)
        yield dsn


@pytest.fixture(scope="session")
def tiered_cache_redis() -> Iterator[str]:
    """URL of a throwaway redis-server, started on first use and removed at session end."""
    from .redis import RedisServer

    with RedisServer() as server:
        yield server.url


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The keyword options of the closest tiered_cache marker (test, class, module), or none."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        return {}
    if marker.args:
        pytest.fail(f"@pytest.mark.{MARKER} takes keyword options only, got {marker.args!r}", pytrace=False)
    return dict(marker.kwargs)


def _ready(cache: TieredCache, hint: str = "") -> TieredCache:
    """With a near tier, wait until its listener subscribed (the near tier is off before); fail fast if it cannot."""
    listener = cache.listener
    deadline = time.monotonic() + _LISTENER_READY
    while listener is not None and not listener.subscribed.wait(0.05):
        failed = listener.stats.reconnects
        if failed >= _LISTENER_FAILURES or time.monotonic() > deadline:
            cache.close()
            raise RuntimeError(f"tiered_cache fixture: the near tier's listener did not subscribe "
                               f"({failed} failed attempts, see the tiered_cache.coherence log){hint}")
    return cache


@pytest.fixture
def tiered_cache(
    request: pytest.FixtureRequest, tiered_cache_postgres: str, tiered_cache_redis: str
) -> Iterator[TieredCache]:
    """A TieredCache on the session's throwaway servers, emptied before the test and closed after it."""
    from tiered_cache import TieredCache

    from .reset import empty_tables, flush_redis

    empty_tables(tiered_cache_postgres)
    flush_redis(tiered_cache_redis)
    options = {"redis_timeout": TEST_REDIS_TIMEOUT, **_options(request)}
    with _ready(TieredCache.connect(tiered_cache_postgres, tiered_cache_redis, **options)) as cache:
        yield cache


@pytest.fixture
def tiered_cache_fake(request: pytest.FixtureRequest) -> Iterator[TieredCache]:
    """A TieredCache whose Redis is fakeredis (a new, empty one per test) over the real, emptied PostgreSQL."""
    from tiered_cache import PostgresStore, TieredCache

    from .fake import fake_redis_client
    from .reset import empty_tables

    client = fake_redis_client()  # first: a missing fakeredis or lupa fails before PostgreSQL is started
    dsn: str = request.getfixturevalue("tiered_cache_postgres")
    empty_tables(dsn)
    options = _options(request)
    options.pop("redis_timeout", None)  # a socket option of connect(); fakeredis has no socket
    store_names = {n for n, p in inspect.signature(PostgresStore).parameters.items() if p.kind is p.KEYWORD_ONLY}
    store = PostgresStore(dsn, **{k: options.pop(k) for k in list(options) if k in store_names})
    try:
        cache = TieredCache(store, client, owns_clients=True, **options)
    except BaseException:
        store.close()
        client.close()
        raise
    with _ready(cache, FAKE_NEAR_HINT):
        yield cache
