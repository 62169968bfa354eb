"""Dropping a whole namespace: after a restart from a snapshot (new run id) and after a TRUNCATE, whatever
characters the namespace holds (SCAN MATCH patterns are escaped: `tc[prod]`, `a*b`, `q?`, backslash)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import redis

from tiered_cache import TieredCache
from tiered_cache.policy.keys import KeySpace
from tiered_cache.testing import RedisServer
from _util import wait_until

CT, SITE = "app3_clue", 77

# A glob namespace, and a neighbour its *unescaped* pattern would match instead of itself.
GLOBS = {"tc[prod]": "tcp", "a*b": "a-x-b", "q?": "qz", "back\\slash": "backslash"}


@pytest.mark.fault
@pytest.mark.parametrize("namespace", ["tc", "tc[prod]"])
def test_restart_from_an_old_snapshot_serves_no_stale_entry(dsn: str, namespace: str) -> None:
    """v1 cached and snapshotted, v2 written (its kill and entry not in the snapshot), Redis killed and restarted
    from the snapshot: the first new connection sees a new run id and drops the namespace, so v2 is served."""
    with RedisServer() as server, \
            TieredCache.connect(dsn, server.url, redis_timeout=1.0, namespace=namespace) as cache:
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


def test_glob_namespace_patterns_match_exactly_their_own_keys(redis_url: str) -> None:
    """On a real Redis, SCAN MATCH with a namespace's pattern finds all of its keys and none of its neighbour's."""
    client = redis.Redis.from_url(redis_url)
    try:
        spaces = [KeySpace(ns) for pair in GLOBS.items() for ns in pair]
        for space in spaces:
            ks = space.keyset(CT, SITE, "t")
            client.set(ks.entry, b"x")
            client.set(ks.lease, b"x")
        for space in spaces:
            found = {k.decode() for k in client.scan_iter(match=space.pattern, count=1000)}
            ks = space.keyset(CT, SITE, "t")
            assert found == {ks.entry, ks.lease}, (space.namespace, found)
    finally:
        client.close()


@pytest.mark.fault
@pytest.mark.parametrize("namespace", sorted(GLOBS))
def test_truncate_flushes_a_glob_namespace_and_spares_its_neighbour(dsn: str, redis_url: str, namespace: str) -> None:
    """TRUNCATE reaches the relay, which drops the namespace: its entry goes (it did not before, the unescaped
    pattern matched nothing of it), the neighbour namespace its raw pattern would match keeps its own."""
    admin = redis.Redis.from_url(redis_url)
    with TieredCache.connect(dsn, redis_url, namespace=namespace, relay=True) as cache, \
            TieredCache.connect(dsn, redis_url, namespace=GLOBS[namespace]) as neighbour:
        try:
            cache.write_cache(CT, SITE, "k", {"v": 1})
            wait_until(lambda: _outbox(dsn) == 0, 10, what="outbox drained")
            assert cache.get_latest(CT, SITE, "k")["result_json"] == {"v": 1}
            assert neighbour.get_latest(CT, SITE, "k")["result_json"] == {"v": 1}
            mine, theirs = cache.keyset(CT, SITE, "k").entry, neighbour.keyset(CT, SITE, "k").entry
            assert admin.exists(mine) and admin.exists(theirs)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("TRUNCATE biz.ai_cache")
            wait_until(lambda: not admin.exists(mine), 10, what=f"namespace {namespace!r} flushed after TRUNCATE")
            assert cache.get_latest(CT, SITE, "k") is None
            assert admin.exists(theirs), "the flush reached another namespace"
        finally:
            admin.close()


def _outbox(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM biz.ai_cache_changes").fetchone()[0]  # type: ignore[index]


async def _async_tier_on(url: str, namespace: str) -> Any:
    """An AsyncRedisTier on the bounded redis.asyncio client, built inside the loop that drives it."""
    from tiered_cache._async.client import async_redis_client
    from tiered_cache._async.redis_tier import AsyncRedisTier

    return AsyncRedisTier(async_redis_client(url, timeout=1.0), KeySpace(namespace))


@pytest.mark.fault
@pytest.mark.parametrize("api", ["sync", "async"])
def test_the_tier_reads_nothing_of_the_old_run_after_a_restart(api: str) -> None:
    """The restart watch of either client (redis-py calls it, redis.asyncio awaits it): an entry the snapshot kept
    but a later kill removed is dropped, with the whole namespace and nothing else, before the first read is served."""
    from _apis import blocking

    from tiered_cache.contracts import DOWN, MISS
    from tiered_cache.facade import redis_client
    from tiered_cache.tiers.redis import RedisTier

    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        if api == "sync":
            tier: Any = RedisTier(redis_client(server.url, timeout=1.0), KeySpace("rs"))
        else:
            tier = blocking(_async_tier_on)(server.url, "rs")
        ks = tier.keys.keyset(CT, SITE, "k")
        try:
            admin.set(ks.entry, b"old")
            admin.set("neighbour:k", b"kept")
            assert tier.get_raw(ks.entry) == b"old"
            assert admin.save()
            tier.kill([ks])
            assert admin.exists(ks.entry) == 0
            admin.close()
            server.kill()
            server.start()
            admin = redis.Redis.from_url(server.url)
            assert admin.get(ks.entry) == b"old", "the restarted Redis reloaded the old entry (this test's premise)"
            got: list[Any] = []
            wait_until(lambda: got.append(tier.get_raw(ks.entry)) or got[-1] is not DOWN, 10,
                       what="a read on a new connection")
            assert got[-1] is MISS
            assert tier.client.connection_pool.connection_kwargs["redis_connect_func"].restarts == 1
            assert admin.get("neighbour:k") == b"kept"
        finally:
            tier.close()
            if api == "async":
                tier.client.aclose()
            admin.close()
