"""Across the runs of `tiered-cache bench --runs N`: every figure's median and min-max, so each ratio comes with its spread."""

from __future__ import annotations

import statistics
from typing import Any

FIELDS = ("ops_per_s", "p50_us", "vs_floor", "vs_old", "pg_queries_per_1k")
NEAR, REDIS = "TieredCache near+redis", "TieredCache redis"


def _stat(values: list[float]) -> dict[str, float] | None:
    return None if not values else {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """{workload: {contender: {field: {median, min, max}}}}, plus near + Redis ops/s over Redis alone's, run by run."""
    out: dict[str, Any] = {}
    for workload in results[0]["workloads"]:
        rows: dict[str, dict[str, list[float]]] = {}
        near_vs_redis: list[float] = []
        for result in results:
            by_name = {r["contender"]: r for r in result["workloads"][workload]["rows"]}
            for name, row in by_name.items():
                for f in FIELDS:
                    if row.get(f) is not None:
                        rows.setdefault(name, {}).setdefault(f, []).append(float(row[f]))
            if by_name.get(NEAR, {}).get("ops_per_s") and by_name.get(REDIS, {}).get("ops_per_s"):
                near_vs_redis.append(by_name[NEAR]["ops_per_s"] / by_name[REDIS]["ops_per_s"])
        out[workload] = {"contenders": {n: {f: _stat(v) for f, v in fs.items()} for n, fs in rows.items()},
                         "near_vs_redis_ops": _stat(near_vs_redis)}
    return out


def _cell(stat: dict[str, float] | None, fmt: str) -> str:
    if stat is None:
        return "-"
    return f"{fmt.format(stat['median'])} ({fmt.format(stat['min'])}-{fmt.format(stat['max'])})"


def render(summary: dict[str, Any], runs: int) -> str:
    """Markdown: per workload, each contender's medians with min-max over the runs."""
    lines = [f"# tiered_cache benchmark: spread over {runs} runs (median, min-max)", ""]
    for workload, data in summary.items():
        lines += [f"## {workload}", "", "| contender | ops/s | p50 µs | vs floor (time/op) | vs old (ops/s) | PG q/1k ops |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, s in data["contenders"].items():
            lines.append(f"| {name} | {_cell(s.get('ops_per_s'), '{:,.0f}')} | {_cell(s.get('p50_us'), '{:,.0f}')} "
                         f"| {_cell(s.get('vs_floor'), '{:.2f}x')} | {_cell(s.get('vs_old'), '{:,.1f}x')} "
                         f"| {_cell(s.get('pg_queries_per_1k'), '{:,.1f}')} |")
        lines += ["", f"near + Redis ops/s over Redis alone's, run by run: {_cell(data['near_vs_redis_ops'], '{:.3f}x')}", ""]
    return "\n".join(lines)
