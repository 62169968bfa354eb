"""Failover behind Sentinel (1 primary, 1 replica, 3 sentinels): no stale read after a write returned.

As on a cluster (tests/test_cluster_failover.py): a replica cut off before a kill is promoted with the
killed entry, and the restart watch (a new run id on the first connection to the new primary) drops it
before anything is served; then a SIGKILL of the primary under 4 writers and 8 readers. Both APIs.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
import redis

from _apis import connect_cache, target
from _util import wait_until
from _failover import reads_until_redis_answers, run_with_fault
from tiered_cache._deployment import watch_of

CT, SITE = "app3_clue", 13

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def _promoted(sentinel: Any, old: tuple[str, int]) -> tuple[str, int] | None:
    try:
        now = sentinel.primary()
        if int(now[1]) != int(old[1]) and redis.Redis(host=now[0], port=now[1], socket_timeout=0.5).info("replication")["role"] == "master":
            return now
    except redis.RedisError:
        pass
    return None


def test_a_promoted_replica_that_missed_a_kill_serves_nothing_stale(api: str, clean_sentinel: Any, dsn: str) -> None:
    cache = connect_cache(api, dsn, clean_sentinel.url)
    try:
        cache.write_cache(CT, SITE, "fo", {"v": 1})
        assert cache.get_latest(CT, SITE, "fo")["result_json"] == {"v": 1}
        entry = cache.keys.entry(CT, SITE, "fo")
        old = clean_sentinel.primary()
        primary = redis.Redis(port=int(old[1]), socket_timeout=2)
        replica_port = int(primary.info("replication")["slave0"]["port"])
        replica = redis.Redis(port=replica_port, socket_timeout=2)
        wait_until(lambda: replica.get(entry) is not None, 10, 0.01, "the entry reached the replica")
        before = replica.get(entry)
        replica_pid = replica.info("server")["process_id"]
        os.kill(replica_pid, signal.SIGSTOP)  # it cannot reconnect while stopped...
        primary.client_kill_filter(_type="replica")  # ...and gets nothing more
        try:
            cache.invalidate(CT, SITE, "fo")  # its kill lands on the primary only
            assert cache.get_latest(CT, SITE, "fo") is None
            os.kill(primary.info("server")["process_id"], signal.SIGKILL)
        finally:
            os.kill(replica_pid, signal.SIGCONT)
        wait_until(lambda: (_promoted(clean_sentinel, old) or ("", 0))[1] == replica_port, 60, 0.05,
                   "the sentinels promoted the replica")
        assert replica.get(entry) == before  # the new primary has the entry the invalidate killed on the old one
        reads = reads_until_redis_answers(cache, SITE, "fo")
        assert reads == [None] * len(reads), f"a promoted replica served an invalidated row: {reads[:3]}"
        assert watch_of(target(cache.redis).client).restarts >= 1
    finally:
        cache.close()


def test_a_primary_killed_under_4_writers_and_8_readers(api: str, clean_sentinel: Any, dsn: str,
                                                        figure: Callable[[str], None]) -> None:
    keys = [f"fo-{i}" for i in range(24)]
    failover, line = run_with_fault(api, dsn, clean_sentinel.url, keys, 4, lambda cache: clean_sentinel.kill_primary(),
                                    seconds=10.0)
    figure(f"\nSentinel primary SIGKILLed under 4 writers + 8 readers ({api}): failover window "
           f"{failover.window * 1000:.0f} ms; {line}")
