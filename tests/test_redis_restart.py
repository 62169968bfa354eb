"""A Redis that restarts from a snapshot must not bring back entries a kill had removed."""

from __future__ import annotations

import pytest
import redis

from tiered_cache import TieredCache
from tiered_cache.testing import RedisServer

CT, SITE = "app3_clue", 77


@pytest.mark.fault
def test_restart_from_an_old_snapshot_serves_no_stale_entry(dsn: str) -> None:
    """v1 cached and snapshotted, v2 written (its kill and entry not in the snapshot), Redis killed and restarted
    from the snapshot: the first new connection sees a new run id and drops the namespace, so v2 is served."""
    with RedisServer() as server, TieredCache.connect(dsn, server.url, redis_timeout=1.0) as cache:
        admin = redis.Redis.from_url(server.url)
        v1 = cache.write_cache(CT, SITE, "k", {"v": 1})
        assert cache.get_latest(CT, SITE, "k")["id"] == v1
        entry = cache.keyset(CT, SITE, "k").entry
        assert admin.save()  # the snapshot (in the server's kept data dir) holds v1's entry
        v2 = cache.write_cache(CT, SITE, "k", {"v": 2})
        assert cache.get_latest(CT, SITE, "k")["id"] == v2
        admin.close()
        server.kill()
        server.start()
        admin = redis.Redis.from_url(server.url)
        assert b'"v":1' in admin.get(entry), "the restarted Redis reloaded the old entry (this test's premise)"
        reads = [cache.get_latest(CT, SITE, "k") for _ in range(3)]
        assert [row["id"] for row in reads] == [v2, v2, v2]
        assert b'"v":1' not in (admin.get(entry) or b"")
        watch = cache.redis.client.connection_pool.connection_kwargs["redis_connect_func"]
        assert watch.restarts == 1
        admin.close()


def test_a_plain_reconnect_to_the_same_run_keeps_the_cache(dsn: str, redis_url: str) -> None:
    """A dropped connection to the same Redis run reconnects without dropping anything."""
    with TieredCache.connect(dsn, redis_url) as cache:
        v1 = cache.write_cache(CT, SITE, "same", {"v": 1})
        assert cache.get_latest(CT, SITE, "same")["id"] == v1
        cache.redis.client.connection_pool.disconnect()
        admin = redis.Redis.from_url(redis_url)
        assert admin.exists(cache.keyset(CT, SITE, "same").entry)
        assert cache.get_latest(CT, SITE, "same")["id"] == v1
        assert admin.exists(cache.keyset(CT, SITE, "same").entry)
        assert cache.redis.client.connection_pool.connection_kwargs["redis_connect_func"].restarts == 0
        admin.close()
