"""The cache on a real Redis Cluster (3 primaries, 3 replicas) and behind Sentinel, both APIs.

What a cluster changes: keys of one cache key share a slot, multi-key reads go out per slot in one
pipeline per node, a namespace drop runs on every primary, and URLs name the deployment.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio.connection as aconnection
import redis.connection as sconnection

from _apis import connect_cache, target
from tiered_cache._sync.client import redis_client
from tiered_cache.errors import ConfigurationError
from tiered_cache.tiers._redis_cluster import parse

CT, SITE = "app3_clue", 12


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[tuple[str, int]]]:
    """Round trips per server: every send of a command or a whole pipeline, counted by the node it went to."""
    counted: Counter[tuple[str, int]] = Counter()
    sync_send = sconnection.AbstractConnection.send_packed_command
    async_send = aconnection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> Any:
        counted[(self.host, int(self.port))] += 1
        return sync_send(self, command, check_health)

    async def acounting(self: Any, command: Any, check_health: bool = True) -> Any:
        counted[(self.host, int(self.port))] += 1
        return await async_send(self, command, check_health)

    monkeypatch.setattr(sconnection.AbstractConnection, "send_packed_command", counting)
    monkeypatch.setattr(aconnection.AbstractConnection, "send_packed_command", acounting)
    yield counted


def test_get_many_of_50_hits_costs_one_round_trip_per_primary(api: str, clean_cluster: Any, dsn: str,
                                                              sends: Counter[tuple[str, int]]) -> None:
    # No write probe comes due during the counted call (it would add a round trip to one node).
    cache = connect_cache(api, dsn, clean_cluster.url, probe_interval=3600.0)
    try:
        targets = [f"board-{i}" for i in range(50)]
        for t in targets:
            cache.write_cache(CT, SITE, t, {"t": t})
        first = cache.get_many(CT, SITE, targets)  # write-through put every entry in Redis already
        client = target(cache.redis).client
        slots = {client.keyslot(cache.keys.entry(CT, SITE, t)) for t in targets}
        primaries = {(n.host, int(n.port)) for n in client.get_primaries()}
        sends.clear()
        hits_before = target(cache.redis).stats.hits
        again = cache.get_many(CT, SITE, targets)
        assert again == first and all(again[t]["result_json"] == {"t": t} for t in targets)
        assert target(cache.redis).stats.hits - hits_before == 50, "every key answered by Redis"
        assert len(slots) > 3 and set(sends) <= primaries
        assert len(sends) == 3 and max(sends.values()) == 1, f"round trips per node: {dict(sends)}"
    finally:
        cache.close()


def test_keys_of_one_cache_key_share_a_slot_and_scripts_stay_within_it(api: str, clean_cluster: Any,
                                                                       dsn: str) -> None:
    cache = connect_cache(api, dsn, clean_cluster.url)
    try:
        client = target(cache.redis).client
        ks = cache.keys.keyset(CT, SITE, "one")
        assert len({client.keyslot(k) for k in ks.all}) == 1
        cache.write_cache(CT, SITE, "one", {"v": 1})
        assert cache.get_history(CT, SITE, "one")[0]["result_json"] == {"v": 1}
        cache.set_generating(CT, SITE, "one")
        cache.invalidate(CT, SITE, "one")
        assert cache.get_latest(CT, SITE, "one") is None
    finally:
        cache.close()


def test_flush_namespace_empties_every_primary(api: str, clean_cluster: Any, dsn: str) -> None:
    cache = connect_cache(api, dsn, clean_cluster.url)
    try:
        for i in range(60):
            cache.write_cache(CT, SITE, f"f-{i}", {"i": i})
        client = target(cache.redis).client
        holding = [n for n in client.get_primaries()
                   if redis.Redis(host=n.host, port=n.port).dbsize() > 0]
        assert len(holding) == 3
        assert cache.redis.flush_namespace() >= 60
        assert all(redis.Redis(host=n.host, port=n.port).dbsize() == 0 for n in client.get_primaries())
        assert cache.get_latest(CT, SITE, "f-1")["result_json"] == {"i": 1}  # PostgreSQL keeps them
    finally:
        cache.close()


def test_invalidate_site_and_a_second_process_view_on_a_cluster(api: str, clean_cluster: Any, dsn: str) -> None:
    one = connect_cache(api, dsn, clean_cluster.url, near_max_entries=1000)
    two = connect_cache(api, dsn, clean_cluster.url)
    try:
        for i in range(10):
            one.write_cache(CT, SITE, f"s-{i}", {"i": i})
        assert all(two.get_latest(CT, SITE, f"s-{i}")["result_json"] == {"i": i} for i in range(10))
        assert all(one.get_latest(CT, SITE, f"s-{i}") is not None for i in range(10))
        two.invalidate_site(SITE, CT)
        assert [one.get_latest(CT, SITE, f"s-{i}") for i in range(10)] == [None] * 10
        assert [two.get_latest(CT, SITE, f"s-{i}") for i in range(10)] == [None] * 10
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize(("url", "expected"), [
    ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001", ("cluster", [("10.0.0.1", 7000), ("10.0.0.2", 7001)], "", 0)),
    ("redis+cluster://u:p%40ss@h:1", ("cluster", [("h", 1)], "", 0)),
    ("redis+sentinel://h1:26379,h2:26380/mymaster", ("sentinel", [("h1", 26379), ("h2", 26380)], "mymaster", 0)),
    ("redis+sentinel://h1:26379/mymaster/3", ("sentinel", [("h1", 26379)], "mymaster", 3)),
])
def test_deployment_urls(url: str, expected: tuple[Any, ...]) -> None:
    topology = parse(url)
    assert topology is not None and (topology.kind, topology.nodes, topology.service, topology.db) == expected
    if "u:p" in url:
        assert topology.options == {"username": "u", "password": "p@ss"}


@pytest.mark.parametrize("url", ["redis+cluster://h", "redis+cluster://h:0", "redis+cluster://h:1/2",
                                 "redis+sentinel://h:1", "redis+sentinel://h:1/m/x", "redis+cluster://h:1?db=3"])
def test_bad_deployment_urls_name_the_problem(url: str) -> None:
    with pytest.raises(ConfigurationError, match="redis url"):
        parse(url)


def test_plain_urls_are_not_deployments() -> None:
    assert parse("redis://localhost:6379/0") is None and parse("unix:///tmp/r.sock") is None


def test_the_relay_kills_what_etl_changed_on_every_shard(api: str, clean_cluster: Any, dsn: str) -> None:
    import psycopg
    from psycopg.types.json import Jsonb

    from _util import wait_until

    cache = connect_cache(api, dsn, clean_cluster.url, relay=True)
    try:
        targets = [f"etl-{i}" for i in range(30)]
        for t in targets:
            cache.write_cache(CT, SITE, t, {"v": 1})
        assert all(cache.get_latest(CT, SITE, t)["result_json"] == {"v": 1} for t in targets)
        client = redis_client(clean_cluster.url, timeout=1.0)  # a sync look at the cluster, whatever the API
        shards = {client.get_node_from_key(cache.keys.entry(CT, SITE, t)).port for t in targets}
        assert len(shards) == 3
        with psycopg.connect(dsn, autocommit=True) as conn:  # an ETL job, straight into the table
            conn.execute("UPDATE biz.ai_cache SET result_json = %s WHERE site_id = %s", (Jsonb({"v": 2}), SITE))
        wait_until(lambda: all(client.get(cache.keys.entry(CT, SITE, t)) is None for t in targets), 10, 0.01,
                   "the relay killed every entry")
        assert all(cache.get_latest(CT, SITE, t)["result_json"] == {"v": 2} for t in targets)
        client.close()
    finally:
        cache.close()


def test_the_cluster_bench_runs_on_a_given_cluster(clean_cluster: Any, tmp_path: Any,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from bench.cluster import main

    assert main(["--rounds", "2", "--batch", "10", "--redis-url", clean_cluster.url, "--out", str(tmp_path)]) == 0
    table = (tmp_path / "cluster.md").read_text()
    assert "get_many(50) (Redis hits)" in table and "given" in table
    assert "get_many(50)" in capsys.readouterr().out


def test_with_every_sentinel_down_reads_and_writes_go_to_postgres(api: str, dsn: str) -> None:
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])  # closed again: nothing listens there
    url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/mymaster"
    cache = connect_cache(api, dsn, url)
    try:
        row_id = cache.write_cache(CT, SITE, "no-sentinel", {"v": 1})
        got = cache.get_latest(CT, SITE, "no-sentinel")
        assert got is not None and got["id"] == row_id
        assert cache.get_many(CT, SITE, ["no-sentinel", "none"])["none"] is None
        assert target(cache.redis).stats.errors > 0
    finally:
        cache.close()
