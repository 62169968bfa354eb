"""Write-path micro-benchmark: what PostgresStore and TieredCache add to a bare pooled INSERT of the same row.

Workload: write_cache of one ~1 KB product-shaped document (orjson-encoded per call) to one of 60 targets
of one venue, in turn, single thread. The floor is a psycopg_pool connection (autocommit) running a
prepared `INSERT INTO biz.ai_cache (...) VALUES (...) RETURNING id` of the same columns; its triggers
(dirty groups, change outbox) fire for it as for the library. PostgresStore.write_cache also returns
what get_latest now serves (one statement); TieredCache.write_cache adds Redis: the key's lease before
the write and its entry after. Every round runs each contender for --batch calls, the first one rotated
each round; p50/p99 are over every call of a run, the ratio is the median of per-round p50 ratios to
the floor, and --runs repeats the whole measurement (min-max of the ratio over runs).

    python -m bench.wmicro [--rounds 40] [--batch 50] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

SITE = 9_999_002
APP = "app3_clue"
N_TARGETS = 60
NAMESPACE = "tcbench-wmicro"
FLOOR = "floor: pooled psycopg INSERT ... RETURNING id"
CONTENDERS = (FLOOR, "PostgresStore.write_cache", "TieredCache.write_cache")

INSERT = """
INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, triggered_by, score, expires_at, status)
VALUES (%(cache_type)s, %(site_id)s, %(target_id)s, %(result_json)s::jsonb, %(triggered_by)s, %(score)s,
        %(expires_at)s, 'valid')
RETURNING id
"""


class Bench:
    """The three contenders over one database and Redis, writing the same documents to the same keys."""

    def __init__(self, dsn: str, url: str, n_targets: int = N_TARGETS) -> None:
        import psycopg_pool

        from tiered_cache import PostgresStore, TieredCache, migrate

        from ._workload import document_pool

        migrate(dsn)
        self.dsn = dsn
        self.docs = document_pool(1)
        self.targets = [f"member-wmicro-{i:04d}" for i in range(n_targets)]
        self.pool = psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=1, kwargs={"autocommit": True}, open=True)
        self.store = PostgresStore(dsn)
        self.cache = TieredCache.connect(dsn, url, namespace=NAMESPACE)
        self.expires_at = datetime.now(timezone.utc) + timedelta(days=1)

    def calls(self) -> dict[str, Callable[[], int]]:
        """contender -> a no-argument call that writes the next (target, document) and returns the new row id."""
        out: dict[str, Callable[[], int]] = {}
        for name, write in ((FLOOR, self.floor_write), ("PostgresStore.write_cache", self.store.write_cache),
                            ("TieredCache.write_cache", self.cache.write_cache)):
            turns = itertools.cycle(zip(self.targets, itertools.cycle(self.docs)))
            out[name] = lambda write=write, turns=turns: write(APP, SITE, *next(turns), "bench-wmicro", 80)  # type: ignore[misc]
        return out

    def floor_write(self, cache_type: str, site_id: int, target_id: str, result_json: dict[str, Any],
                    triggered_by: str, score: int) -> int:
        """The floor: encode, then one prepared autocommit INSERT on a pooled connection."""
        params = {"cache_type": cache_type, "site_id": site_id, "target_id": target_id,
                  "result_json": orjson.dumps(result_json).decode(), "triggered_by": triggered_by, "score": score,
                  "expires_at": self.expires_at}
        with self.pool.connection() as conn:
            return conn.execute(INSERT, params, prepare=True).fetchone()[0]  # type: ignore[index]

    def verify(self) -> dict[str, int]:
        """Each contender writes a marked document; the row of the id it returns holds it (else AssertionError)."""
        import psycopg

        written: dict[str, int] = {}
        for i, (name, write) in enumerate((
                (FLOOR, self.floor_write), ("PostgresStore.write_cache", self.store.write_cache),
                ("TieredCache.write_cache", self.cache.write_cache))):
            doc = {"marker": name, "n": i}
            written[name] = write(APP, SITE, self.targets[i], doc, "bench-wmicro", 80)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for name, row_id in written.items():
                row = conn.execute("SELECT result_json, status FROM biz.ai_cache WHERE id = %s", (row_id,)).fetchone()
                if row is None or row[0].get("marker") != name or row[1] != "valid":
                    raise AssertionError(f"{name}: row {row_id} is {row!r}, not its marked document")
        latest = self.cache.get_latest(APP, SITE, self.targets[2])
        if latest is None or latest["id"] != written["TieredCache.write_cache"]:
            raise AssertionError(f"TieredCache serves {latest!r} after its own write")
        return written

    def close(self) -> None:
        """Delete the venue's rows and the namespace's Redis keys; close every client."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM biz.ai_cache WHERE site_id = %s", (SITE,))
            conn.execute("DELETE FROM biz.ai_cache_changes WHERE site_id = %s", (SITE,))
        client = self.cache.redis.client
        keys = list(client.scan_iter(match=f"{NAMESPACE}:*", count=1000))
        if keys:
            client.unlink(*keys)
        self.cache.close()
        self.store.close()
        self.pool.close()


def _latencies(fn: Callable[[], Any], n: int) -> list[float]:
    """Seconds taken by each of n calls of fn."""
    pc = time.perf_counter
    out = []
    for _ in range(n):
        t0 = pc()
        fn()
        out.append(pc() - t0)
    return out


def measure(calls: dict[str, Callable[[], Any]], rounds: int, batch: int) -> dict[str, dict[str, float]]:
    """One run: rounds of every contender in turn (first one rotated); p50/p99 over all calls, median ratio."""
    names = list(calls)
    for fn in calls.values():  # warm up: sessions opened, statements prepared, keys leased once
        _latencies(fn, 20)
    every: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        p50s = {}
        for name in names[r % len(names):] + names[:r % len(names)]:
            lat = _latencies(calls[name], batch)
            every[name] += lat
            p50s[name] = statistics.median(lat)
        for name in names:
            ratios[name].append(p50s[name] / p50s[FLOOR])
    return {name: {"p50_us": statistics.median(every[name]) * 1e6, "p99_us": _quantile(every[name], 0.99) * 1e6,
                   "ratio": statistics.median(ratios[name])} for name in names}


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def summarize(runs: list[dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Per contender: median over runs of p50/p99 and of the ratio, with the ratio's min and max."""
    rows = []
    for name in runs[0]:
        ratios = [run[name]["ratio"] for run in runs]
        rows.append({"contender": name, "p50_us": statistics.median(run[name]["p50_us"] for run in runs),
                     "p99_us": statistics.median(run[name]["p99_us"] for run in runs),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)})
    return rows


def render(rows: list[dict[str, Any]], rounds: int, batch: int, runs: int) -> str:
    head = ["contender", "p50 µs", "p99 µs", "p50 ratio to the floor (min-max over runs)"]
    body = [[r["contender"], f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}",
             f"{r['ratio']:.3f}x ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([f"write-path micro-benchmark: {runs} runs x {rounds} rounds x {batch} writes per contender, "
                      f"interleaved (medians over runs)", line(head), "  ".join("-" * w for w in widths),
                      *(line(b) for b in body)])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wmicro", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=40, help="rounds per run (each runs every contender)")
    p.add_argument("--batch", type=int, default=50, help="writes per contender per round")
    p.add_argument("--runs", type=int, default=3, help="repeat the whole measurement")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    from tiered_cache.testing import embedded_servers

    with embedded_servers() as (dsn, url):
        bench = Bench(dsn, url)
        try:
            bench.verify()
            runs = []
            for i in range(args.runs):
                runs.append(measure(bench.calls(), args.rounds, args.batch))
                if sys.stderr.isatty():
                    sys.stderr.write(f"\r  run {i + 1}/{args.runs}")
                    sys.stderr.flush()
            if sys.stderr.isatty():
                sys.stderr.write("\r" + " " * 30 + "\r")
            bench.verify()
        finally:
            bench.close()
    rows = summarize(runs)
    print(orjson.dumps({"runs": runs, "summary": rows}, option=orjson.OPT_INDENT_2).decode() if args.json
          else render(rows, args.rounds, args.batch, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
