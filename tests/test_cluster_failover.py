"""Failover on a real Redis Cluster (3 primaries, 3 replicas): no stale read after a write returned.

A promoted replica may lack its old primary's last kills (replication is asynchronous). The first test
makes that certain (the replica is SIGSTOPped while a kill lands on its primary only) and shows the
per-node restart watch (runwatch.py) drops the promoted node's entries before it serves. The second
kills a primary with SIGKILL while 4 writers and 8 readers run, judged by tests/test_faults.py's oracle.
Both on both APIs.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from _apis import connect_cache, target
from _util import wait_until
from tiered_cache._deployment import watch_of
from _failover import reads_until_redis_answers, run_with_fault
from redis.crc import key_slot
from tiered_cache.policy.keys import KeySpace

CT, SITE = "app3_clue", 11

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def _node_info(port: int) -> dict[str, Any]:
    return redis.Redis(port=port, socket_timeout=2).info()


def _replica_of(port: int) -> int:
    """The port of a replica of the primary on `port`."""
    info = redis.Redis(port=port, socket_timeout=2).info("replication")
    return int(info["slave0"]["port"])


def _raw_get(port: int, key: str) -> bytes | None:
    """GET straight from one node, replica or not (READONLY on the same connection)."""
    r = redis.Redis(port=port, socket_timeout=2, single_connection_client=True)
    try:
        r.execute_command("READONLY")
        return r.get(key)
    finally:
        r.close()


def _promoted(replica: int, old: int) -> bool:
    try:
        r = redis.Redis(port=replica, socket_timeout=0.5)
        owners = {int(s[2][1]) for s in r.execute_command("CLUSTER", "SLOTS")}
        return r.info("replication")["role"] == "master" and old not in owners \
            and r.cluster("info")["cluster_state"] == "ok"
    except redis.RedisError:
        return False


def test_a_promoted_replica_that_missed_a_kill_serves_nothing_stale(api: str, clean_cluster: Any, dsn: str) -> None:
    cache = connect_cache(api, dsn, clean_cluster.url)
    try:
        cache.write_cache(CT, SITE, "fo", {"v": 1})
        assert cache.get_latest(CT, SITE, "fo")["result_json"] == {"v": 1}  # the entry is in Redis, replicated
        entry = cache.keys.entry(CT, SITE, "fo")
        primary = int(target(cache.redis).client.get_node_from_key(entry).port)
        replica = _replica_of(primary)
        wait_until(lambda: _raw_get(replica, entry) is not None, 10, 0.01, "the entry reached the replica")
        before = _raw_get(replica, entry)
        replica_pid = _node_info(replica)["process_id"]
        os.kill(replica_pid, signal.SIGSTOP)  # it cannot reconnect while stopped...
        redis.Redis(port=primary).client_kill_filter(_type="replica")  # ...and gets nothing more
        try:
            cache.invalidate(CT, SITE, "fo")  # its kill lands on the primary only
            assert cache.get_latest(CT, SITE, "fo") is None
            os.kill(_node_info(primary)["process_id"], signal.SIGKILL)
        finally:
            os.kill(replica_pid, signal.SIGCONT)
        wait_until(lambda: _promoted(replica, primary), 30, 0.05, "the replica was promoted")
        # The scenario holds: the new primary has the entry the invalidate killed on the old one.
        assert _raw_get(replica, entry) == before
        reads = reads_until_redis_answers(cache, SITE, "fo")
        assert reads == [None] * len(reads), f"a promoted replica served an invalidated row: {reads[:3]}"
        watch = watch_of(target(cache.redis).client)
        assert watch.failovers >= 1, (watch.nodes, watch.replids, watch.restarts)
    finally:
        cache.close()


def test_a_primary_killed_under_4_writers_and_8_readers(api: str, clean_cluster: Any, dsn: str,
                                                        figure: Callable[[str], None]) -> None:
    keys = [f"fo-{i}" for i in range(24)]  # spread over the three shards
    failover, line = run_with_fault(api, dsn, clean_cluster.url, keys, 3,
                                    lambda cache: clean_cluster.kill_primary(cache.keys.entry(CT, SITE, keys[0])))
    figure(f"\ncluster primary SIGKILLed under 4 writers + 8 readers ({api}): failover window "
           f"{failover.window * 1000:.0f} ms; {line}")


def test_a_slot_migrated_in_the_middle_of_a_run(api: str, clean_cluster: Any, dsn: str,
                                                figure: Callable[[str], None]) -> None:
    keys = [f"mv-{i}" for i in range(24)]
    entry = KeySpace().entry(CT, SITE, keys[0])
    slot = key_slot(entry.encode())
    source = clean_cluster.primary_for(entry)
    goal = next(n for n in clean_cluster.primaries() if n is not source)

    def migrate(cache: Any) -> float:
        t0 = time.monotonic()
        clean_cluster.migrate_slot(slot, goal, pause_hook=lambda moved: time.sleep(0.3), batch=1)
        return time.monotonic() - t0

    took, line = run_with_fault(api, dsn, clean_cluster.url, keys, 5, migrate)
    owners = {s0: int(s[2][1]) for s in redis.Redis(port=goal.port).execute_command("CLUSTER", "SLOTS")
              for s0 in range(s[0], s[1] + 1) if s0 == slot}
    assert owners == {slot: goal.port}, "the slot now lives on its new primary"
    figure(f"\nslot {slot} migrated {source.port} -> {goal.port} mid-run ({api}): took {took * 1000:.0f} ms; {line}")
