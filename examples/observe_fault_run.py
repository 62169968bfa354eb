"""A seeded read/write workload on throwaway servers, Redis killed and restarted midway, metrics on 127.0.0.1:PORT.

    .venv/bin/python examples/observe_fault_run.py --port 9464 --timeline run.json

Phases (seconds from the start of the workload): warm up, then Redis is SIGKILLed at --fault-at and
started again --fault-for seconds later (a new run: the cache must notice and drop what it held).
While Redis is down an "ETL job" writes rows with raw SQL, around the cache, so the relay's outbox
backlog grows until Redis is back. The phase times (wall clock, as Prometheus stores them) go to
--timeline as JSON, for check_dashboard.py to mark the fault window.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import threading
import time
from typing import Any

import psycopg
from prometheus_client import start_http_server

from tiered_cache import TieredCache, migrate
from tiered_cache.health import health
from tiered_cache.metrics import cache_metrics
from tiered_cache.testing import PostgresServer, RedisServer

CT = "app3_clue"
SITES = (101, 202, 303, 404)
TARGETS = [f"m-{n:04d}" for n in range(250)]
KEYS = [(site, target) for site in SITES for target in TARGETS]
# Zipf-like popularity: a board page reads a few members far more often than the rest.
WEIGHTS = list(itertools.accumulate(1 / (rank + 1) ** 0.9 for rank in range(len(KEYS))))

_ETL = """
INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, triggered_by, status)
SELECT %(ct)s, k.site, k.target, jsonb_build_object('etl', %(batch)s), 'etl-job', 'valid'
FROM unnest(%(sites)s::bigint[], %(targets)s::text[]) AS k(site, target)
"""


def etl_burst(dsn: str, rng: random.Random, n: int, batch: int) -> None:
    """Raw-SQL writes around the cache: only the relay (from the outbox) can tell Redis about them."""
    picked = rng.sample(KEYS, n)
    with psycopg.connect(dsn, autocommit=True) as conn:
        sites, targets = [s for s, _ in picked], [t for _, t in picked]
        conn.execute(_ETL, {"ct": CT, "batch": batch, "sites": sites, "targets": targets})


def workload(cache: TieredCache, rng: random.Random, rate: float, stop: threading.Event, ops: dict[str, int]) -> None:
    """Paced calls: 80 % single reads, 10 % board pages, 3 % history, 7 % writes or invalidations."""
    start = time.monotonic()
    for i in itertools.count():
        if stop.is_set():
            return
        site, target = rng.choices(KEYS, cum_weights=WEIGHTS)[0]
        roll = rng.random()
        if roll < 0.80:
            op = "get_latest"
            cache.get_latest(CT, site, target)
        elif roll < 0.90:
            op = "get_many"
            cache.get_many(CT, site, rng.sample(TARGETS, 20))
        elif roll < 0.93:
            op = "get_history"
            cache.get_history(CT, site, target, limit=2)
        elif roll < 0.99:
            op = "write_cache"
            cache.write_cache(CT, site, target, {"n": i, "tags": ["weekend"]}, triggered_by="fault-run", score=i % 100)
        else:
            op = "invalidate"
            cache.invalidate(CT, site, target)
        ops[op] = ops.get(op, 0) + 1
        delay = start + (i + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def main() -> None:
    """Start the servers, serve metrics, run the workload through the scripted fault, write the timeline."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=9464, help="metrics port on 127.0.0.1")
    ap.add_argument("--seconds", type=float, default=75.0, help="workload length")
    ap.add_argument("--fault-at", type=float, default=25.0, help="seconds into the workload when Redis is killed")
    ap.add_argument("--fault-for", type=float, default=20.0, help="seconds Redis stays down")
    ap.add_argument("--rate", type=float, default=200.0, help="calls per second")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--timeline", help="write the phase times (unix seconds) here as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tiered_cache.relay").setLevel(logging.ERROR)  # one retry line per backoff while Redis is down
    for name in ("fault_run", "tiered_cache.events"):  # our phases, and the library's event records
        logging.getLogger(name).setLevel(logging.INFO)
    rng = random.Random(args.seed)
    say = logging.getLogger("fault_run").info

    with PostgresServer() as pg, RedisServer() as rs:
        migrate(pg.dsn)
        etl_burst(pg.dsn, rng, len(KEYS), 0)  # every key has a row before the first read
        with TieredCache.connect(pg.dsn, rs.url, near_max_entries=300, relay=True) as cache:
            metrics = cache_metrics(cache)
            metrics.watch(cache, lag=True, lag_warning=5.0)  # also measure the outbox backlog at each scrape
            started = start_http_server(args.port, addr="127.0.0.1")
            server = started[0] if isinstance(started, tuple) else None  # prometheus-client < 0.20 returns None
            say("metrics on http://127.0.0.1:%d/metrics; PostgreSQL %s, Redis %s", args.port, pg.version, rs.version)
            stop, ops = threading.Event(), {}
            worker = threading.Thread(target=workload, args=(cache, random.Random(args.seed + 1), args.rate, stop, ops))
            t0 = time.time()
            timeline: dict[str, Any] = {"start": t0, "seed": args.seed, "rate": args.rate}
            worker.start()

            def at(offset: float) -> None:
                """Sleep until `offset` seconds after the workload started."""
                time.sleep(max(0.0, t0 + offset - time.time()))

            for n in range(1, 6):  # small ETL writes before the fault: the relay keeps up
                at(n * args.fault_at / 6)
                etl_burst(pg.dsn, rng, 20, n)
            at(args.fault_at)
            say("health before the fault: %s", health(cache).status)
            timeline["fault_start"] = time.time()
            rs.kill()
            say("FAULT: Redis killed")
            at(args.fault_at + args.fault_for / 4)
            etl_burst(pg.dsn, rng, 400, 100)
            say("ETL burst of 400 raw-SQL writes while Redis is down; health: %s", health(cache).status)
            at(args.fault_at + args.fault_for)
            rs.start()
            timeline["fault_end"] = time.time()
            say("Redis started again (a new run, empty)")
            at(args.seconds)
            stop.set()
            worker.join()
            timeline["end"] = time.time()
            say("health after the run: %s; calls: %s", health(cache).status, ops)
            say("stats: %s", json.dumps(cache.stats()))
            timeline["ops"] = ops
            time.sleep(3)  # a last few scrapes of the final state
            if server is not None:
                server.shutdown()
                server.server_close()
            metrics.close()
    if args.timeline:
        with open(args.timeline, "w") as f:
            json.dump(timeline, f, indent=1)


if __name__ == "__main__":
    main()
