"""What the cluster and Sentinel failover tests share: a workload with one fault in its middle, judged by
tests/test_faults.py's oracle, and reads that go on until Redis itself answers again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from _apis import connect_cache, target
from _util import wait_until
from test_faults import Plan, judge, lost_writes, run_threads

CT = "app3_clue"


def reads_until_redis_answers(cache: Any, site: int, key: str, answers: int = 20) -> list[Any]:
    """get_latest of one key until Redis itself answered `answers` reads (not PostgreSQL with the breaker open)."""
    tier = target(cache.redis)
    answered = tier.stats.hits + tier.stats.misses
    reads: list[Any] = []

    def redis_answers_again() -> bool:
        reads.append(cache.get_latest(CT, site, key))
        return tier.stats.hits + tier.stats.misses >= answered + answers

    wait_until(redis_answers_again, 30, 0.01, "reads served by Redis again")
    return reads


def run_with_fault(api: str, dsn: str, url: str, keys: list[str], seed: int,
                   fault: Callable[[Any], Any], seconds: float = 8.0) -> tuple[Any, str]:
    """4 writers, 8 readers and an invalidator on `keys` for `seconds`; fault(cache) runs 2 s in. Asserts no stale
    read after a write returned, no error, no lost write; returns fault's answer and a line of figures."""
    plan = Plan(dsn, url, keys, api, writers=4, readers=8, invalidators=1, seed=seed)
    cache = connect_cache(api, dsn, url)
    try:
        start = time.monotonic() + 0.2
        done: list[Any] = []

        def chaos() -> None:
            time.sleep(max(0.0, start + 2.0 - time.monotonic()))
            done.append(fault(cache))

        chaos_thread = threading.Thread(target=chaos, daemon=True)
        chaos_thread.start()
        log = run_threads(cache, plan, start, start + seconds)
        chaos_thread.join(60)
        assert done, "the fault did not happen"
        verdict = judge(dsn, [log])
        tier = target(cache.redis)
        line = (f"{len(log['writes'])} writes, {len(log['reads'])} reads, {len(verdict.stale)} stale, "
                f"{len(log['read_errors']) + len(log['write_errors'])} errors; redis errors {tier.stats.errors}, "
                f"breaker trips {tier.breaker.trips}")
        assert not verdict.stale, f"stale reads after a write returned: {verdict.stale[:3]}"
        assert not log["read_errors"] and not log["write_errors"], (log["read_errors"][:3], log["write_errors"][:3])
        assert lost_writes(dsn, [w[3] for w in log["writes"]]) == 0
        assert log["writes"] and log["reads"] and tier.stats.hits > 0
        return done[0], line
    finally:
        cache.close()
