"""The hit path on one Redis and on a local Redis Cluster, side by side, in one run.

bench/micro.py's paths and method (library and floor alternate within each round; medians over rounds),
run first on a throwaway redis-server, then on a throwaway cluster of 3 primaries and 3 replicas on the
same machine (tiered_cache.testing.redis_cluster), against the same PostgreSQL. On the cluster the
get_many floor is redis-py's own mget_nonatomic (one MGET per slot, one pipeline per node), since a
single MGET cannot cross slots. `--redis-url` runs one given deployment instead of the two.

    tiered-cache bench --cluster [--rounds 100] [--batch 200] [--out bench/results]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from .micro import cleanup, measure, paths, setup

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_on(dsn: str, url: str, rounds: int, batch: int) -> list[dict[str, Any]]:
    """micro's rows for one Redis deployment."""
    cache, near_cache, targets = setup(dsn, url)
    try:
        return measure(paths(cache, near_cache, targets), rounds, batch)
    finally:
        cleanup(dsn, cache)
        if near_cache is not None:
            near_cache.close()
        cache.close()


def render(results: dict[str, list[dict[str, Any]]], rounds: int, batch: int) -> str:
    names = list(results)
    head = ["path"] + [f"{n} µs (floor µs), ratio p10-p90" for n in names]
    paths_seen = [r["path"] for r in results[names[0]]]
    body = []
    for path in paths_seen:
        cells = [path]
        for n in names:
            row = next((r for r in results[n] if r["path"] == path), None)
            cells.append("-" if row is None else f"{row['library_us']:.0f} ({row['floor_us']:.0f}), "
                         f"{row['ratio']:.2f}x {row['ratio_p10']:.2f}-{row['ratio_p90']:.2f}")
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([f"hit path, one Redis and a 3+3 cluster: {rounds} rounds x {batch} calls (get_many: {batch // 10})",
                      "", line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(b) for b in body)])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tiered-cache bench --cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--redis-url", help="one deployment to measure instead of a throwaway server and cluster")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    from tiered_cache.testing import PostgresServer, RedisServer

    results: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        dsn = stack.enter_context(PostgresServer()).dsn
        if args.redis_url:
            results["given"] = run_on(dsn, args.redis_url, args.rounds, args.batch)
        else:
            from tiered_cache.testing.redis_cluster import RedisCluster

            results["one Redis"] = run_on(dsn, stack.enter_context(RedisServer()).url, args.rounds, args.batch)
            cluster = stack.enter_context(RedisCluster())
            results["cluster 3+3"] = run_on(dsn, cluster.url, args.rounds, args.batch)
    text = render(results, args.rounds, args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster.md").write_text(text + "\n", encoding="utf-8")
    (args.out / "cluster.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
