"""Return the test servers to empty between tests, so each test starts from nothing and ids start at 1."""

from __future__ import annotations

import psycopg
import redis

from ..errors import ConfigurationError


def empty_tables(dsn: str) -> None:
    """Empty every table the library writes (the migrations' own table kept), so a test starts from nothing."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
                "WHERE schemaname = 'biz' AND tablename <> 'tiered_cache_migrations'"
            )
        ]
        if not tables:
            raise ConfigurationError(
                f"empty_tables: no tiered_cache tables in database {conn.info.dbname!r}; run migrate() first")
        # As a replica: the truncate must not itself record a change for the relay.
        conn.execute("SET session_replication_role = replica")
        conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")


def flush_redis(url: str) -> None:
    """FLUSHALL a test-owned Redis (never point this at a shared one)."""
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()
