"""Async hit-path micro-benchmark: AsyncTieredCache, cashews, aiocache and a raw redis.asyncio floor in one loop.

Ops: get_latest and get_history(limit=2) of one key (the chat turn's two reads), get_many(50) (a board
page), and page body(50): that page as the JSON bytes a handler sends (AsyncTieredCache: get_many_json's
bytes in one orjson.dumps with orjson.Fragment), every one a hit. The floor is redis.asyncio GET / HGET /
MGET of the very keys and bytes AsyncTieredCache stored, on AsyncTieredCache's own client, plus orjson.loads
(page body: plus orjson.dumps of the page). Contenders take turns within every round (the first one rotated
each round), so drift falls on all alike; the ratio is the median of per-round ratios to the floor. --runs repeats the whole measurement and reports the ratio's min/median/max over
runs. A second floor passes the bytes through undecoded (a page: the MGET bytes joined). The concurrency
sweep (bench/_asweep.py) runs N tasks at once on the same loop.

    python -m bench.amicro [--rounds 100] [--batch 100] [--runs 3] [--no-sweep] [--json]
    tiered-cache bench --async [the same flags]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from ._acontenders import AsyncContender, build, close_all

OPS = ("get_latest", "get_history", "get_many(50)", "page body(50)")
#: Each op's share of a round's calls: a get_many reads 50 keys, so it gets a tenth of the calls.
DIVISOR = {"get_latest": 1, "get_history": 1, "get_many(50)": 10, "page body(50)": 10}
N_TARGETS = 60


def op_calls(c: AsyncContender, targets: Sequence[str]) -> dict[str, Callable[[], Awaitable[Any]]]:
    """op -> a no-argument coroutine function on contender c; every contender reads the same keys."""
    one, many = targets[0], list(targets[:50])
    return {"get_latest": lambda: c.get_latest(one), "get_history": lambda: c.get_history(one),
            "get_many(50)": lambda: c.get_many(many), "page body(50)": lambda: c.page_body(many)}


async def verify(contenders: Sequence[AsyncContender], targets: Sequence[str]) -> dict[str, list[str]]:
    """Per contender, the ops (and targets) whose answer differs from the floor's: empty lists when all agree."""
    floor, *others = contenders
    many = list(targets[:50])
    want_latest = {t: await floor.get_latest(t) for t in targets}
    want_history = {t: await floor.get_history(t) for t in targets}
    want_many = floor.as_many(await floor.get_many(many), many)
    want_page = await floor.page_body(many)
    out: dict[str, list[str]] = {floor.name: [] if orjson.loads(want_page) == want_many else ["page body(50)"]}
    for c in others:
        bad = [f"get_latest {t}" for t in targets if c.as_row(await c.get_latest(t)) != want_latest[t]]
        bad += [f"get_history {t}" for t in targets if c.as_row(await c.get_history(t)) != want_history[t]]
        if c.as_many(await c.get_many(many), many) != want_many:
            bad.append("get_many(50)")
        if orjson.loads(await c.page_body(many)) != want_many:
            bad.append("page body(50)")
        out[c.name] = bad
    return out


async def _timed(fn: Callable[[], Awaitable[Any]], n: int, lat: list[int], failed: list[str]) -> int:
    """Await fn() n times, one after another; per-call ns into lat; returns the total ns.

    A call that raises (the floor has the library's 50 ms timeout and no PostgreSQL behind it) is
    counted in failed by type and keeps the time it took; the library serves such a read from PostgreSQL.
    """
    pc = time.perf_counter_ns
    append = lat.append
    start = pc()
    for _ in range(n):
        t0 = pc()
        try:
            await fn()
        except Exception as exc:
            failed.append(type(exc).__name__)
        append(pc() - t0)
    return pc() - start


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def measure(contenders: Sequence[AsyncContender], targets: Sequence[str], rounds: int,
                  batch: int) -> list[dict[str, Any]]:
    """One run: every round, every op, every contender in turn (first one rotated); one row per op and contender."""
    calls = [op_calls(c, targets) for c in contenders]
    lat = [[[] for _ in contenders] for _ in OPS]  # type: list[list[list[int]]]
    ratios = [[[] for _ in contenders] for _ in OPS]  # type: list[list[list[float]]]
    failed = [[[] for _ in contenders] for _ in OPS]  # type: list[list[list[str]]]
    for fns in calls:  # warm every path (connections, caches, branch predictors)
        for op in OPS:
            await _timed(fns[op], 20, [], [])
    k = len(contenders)
    for r in range(rounds):
        order = [(r + i) % k for i in range(k)]
        for o, op in enumerate(OPS):
            n = max(1, batch // DIVISOR[op])
            totals = [0] * k
            for i in order:
                totals[i] = await _timed(calls[i][op], n, lat[o][i], failed[o][i])
            for i in range(k):
                ratios[o][i].append(totals[i] / totals[0])
    rows = []
    for o, op in enumerate(OPS):
        floor_p50 = statistics.median(lat[o][0])
        for i, c in enumerate(contenders):
            xs = lat[o][i]
            rows.append({"op": op, "contender": c.name, "calls": len(xs), "p50_us": statistics.median(xs) / 1e3,
                         "p99_us": _quantile(xs, 0.99) / 1e3, "mean_us": sum(xs) / len(xs) / 1e3,
                         "ratio": statistics.median(ratios[o][i]), "ratio_p50": statistics.median(xs) / floor_p50,
                         "failed": {kind: failed[o][i].count(kind) for kind in sorted(set(failed[o][i]))}})
    return rows


def summarize(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per op and contender over runs: min/median/max of the ratio, median p50 and p99."""
    out: list[dict[str, Any]] = []
    for j, first in enumerate(runs[0] if runs else []):
        same = [run[j] for run in runs]
        ratio = [r["ratio"] for r in same]
        out.append({"op": first["op"], "contender": first["contender"], "runs": len(same),
                    "ratio_min": min(ratio), "ratio_median": statistics.median(ratio), "ratio_max": max(ratio),
                    "p50_us": statistics.median(r["p50_us"] for r in same),
                    "p99_us": statistics.median(r["p99_us"] for r in same),
                    "failed": sum(sum(r["failed"].values()) for r in same)})
    return out


async def run_bench(dsn: str, redis_url: str, *, rounds: int = 100, batch: int = 100, runs: int = 3,
                    sweep_tasks: Sequence[int] = (1, 16, 64, 256), sweep_s: float = 1.0,
                    redis_timeout: float = 0.05,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole async bench on these servers: setup, correctness check, runs, the sweep, cleanup."""
    from tiered_cache import migrate

    from . import _asweep

    await asyncio.to_thread(migrate, dsn)
    targets = [f"member-amicro-{i:04d}" for i in range(N_TARGETS)]
    contenders = await build(dsn, redis_url, targets, redis_timeout)
    try:
        agree = await verify(contenders, targets)
        per_run = []
        for run in range(runs):
            if progress:
                progress(f"run {run + 1}/{runs}")
            per_run.append(await measure(contenders, targets, rounds, batch))
        sweep = []
        if sweep_tasks:
            if progress:
                progress("concurrency sweep")
            sweep = await _asweep.sweep(contenders, targets, sweep_tasks, sweep_s)
        agree_after = await verify(contenders, targets)
    finally:
        await close_all(contenders, dsn)
    return {"schema": 1, "contenders": [{"name": c.name, "note": c.note} for c in contenders],
            "rounds": rounds, "batch": batch, "redis_timeout": redis_timeout,
            "mismatches": agree, "mismatches_after": agree_after,
            "runs": per_run, "summary": summarize(per_run), "sweep": {"tasks": list(sweep_tasks), "seconds": sweep_s,
                                                                     "rows": sweep}}


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(head), "  ".join("-" * w for w in widths), *(line(b) for b in body)]


def render(result: dict[str, Any]) -> str:
    """The summary and the sweep as text tables."""
    from ._asweep import render_sweep

    n = len(result["runs"])
    out = [f"async hit-path micro-benchmark: {n} run(s) x {result['rounds']} rounds x {result['batch']} calls "
           f"(get_many: a tenth), contenders interleaved in one event loop",
           "floor: redis.asyncio GET / HGET / MGET on AsyncTieredCache's client + orjson.loads of the same bytes "
           "(page body: + orjson.dumps of the page)",
           *(f"  {c['name']}: {c['note']}" for c in result["contenders"] if c["note"]), ""]
    body = [[r["op"], r["contender"], f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}", f"{r['ratio_median']:.3f}x",
             f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}", str(r["failed"])] for r in result["summary"]]
    if body:
        out += _table(["op", "contender", "p50 µs", "p99 µs", f"ratio to floor (median of {n})", "min-max",
                       "failed calls"], body)
    bad = {k: v for k, v in {**result["mismatches"], **result["mismatches_after"]}.items() if v}
    out.append("\nanswers: " + ("every contender returned the floor's rows" if not bad else f"MISMATCH {bad}"))
    if result["sweep"]["rows"]:
        out += ["", *render_sweep(result["sweep"])]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tiered-cache bench --async", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=100, help="rounds per run (each runs every op of every contender)")
    p.add_argument("--batch", type=int, default=100, help="calls per op per contender per round (get_many: a tenth)")
    p.add_argument("--runs", type=int, default=3, help="whole measurements in this invocation (spread over runs)")
    p.add_argument("--sweep-tasks", default="1,16,64,256", help="concurrent tasks at each sweep point")
    p.add_argument("--sweep-seconds", type=float, default=1.0, help="measured seconds per contender per sweep point")
    p.add_argument("--no-sweep", action="store_true", help="skip the concurrency sweep")
    p.add_argument("--redis-timeout", type=float, default=0.05,
                   help="AsyncTieredCache's redis_timeout (its client is the floor's too); default the library's")
    p.add_argument("--tiny", action="store_true", help="a few calls of everything (the test suite's size)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--out", type=Path, help="also write the tables to OUT.txt and the JSON to OUT.json")
    p.add_argument("--dsn", help="PostgreSQL DSN (default $TIERED_CACHE_DSN, else a throwaway server)")
    p.add_argument("--redis-url", help="Redis URL (default $TIERED_CACHE_REDIS_URL, else a throwaway server)")
    args = p.parse_args(argv)
    if args.dsn:
        os.environ["TIERED_CACHE_DSN"] = args.dsn
    if args.redis_url:
        os.environ["TIERED_CACHE_REDIS_URL"] = args.redis_url
    if args.tiny:
        args.rounds, args.batch, args.runs, args.sweep_tasks, args.sweep_seconds = 3, 10, 2, "1,4", 0.05
    tasks = () if args.no_sweep else tuple(int(x) for x in args.sweep_tasks.split(",") if x)
    from tiered_cache.testing import embedded_servers

    def tick(what: str) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\r  {what}" + " " * 20)
            sys.stderr.flush()

    with embedded_servers() as (dsn, url):
        result = asyncio.run(run_bench(dsn, url, rounds=args.rounds, batch=args.batch, runs=args.runs,
                                       sweep_tasks=tasks, sweep_s=args.sweep_seconds, redis_timeout=args.redis_timeout,
                                       progress=tick))
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 40 + "\r")
    text, data = render(result), orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if args.out:
        args.out.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
        args.out.with_suffix(".json").write_text(data + "\n", encoding="utf-8")
    print(data if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
