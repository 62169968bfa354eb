"""The async concurrency sweep: N tasks on one event loop doing hit reads, each contender in turn, ops/s and latency.

Every point (op, N) gives each contender its time in SLICES turns, the contender order rotated each
turn, so drift falls on all alike. A task walks the targets from its own offset (get_latest: one key
per call; get_many: a page of 50). Errors are counted by type, not raised; ops/s counts only calls that
returned (a failed call's latency is still recorded: it took that long to fail).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ._acontenders import AsyncContender

SWEEP_OPS = ("get_latest", "get_many(50)")
SLICES = 4


def _args(op: str, targets: Sequence[str]) -> list[Any]:
    """What one call is given, in walking order: a target, or a page of 50 starting at each target."""
    if op == "get_latest":
        return list(targets)
    ring = list(targets) * 2
    return [ring[i : i + 50] for i in range(len(targets))]


async def _task(fn: Callable[[Any], Awaitable[Any]], walk: list[Any], start: int, deadline_ns: int,
                lat: list[int], errors: dict[str, int]) -> None:
    """Call fn until the deadline, one call at a time; per-call ns into lat, failures by type into errors."""
    pc = time.perf_counter_ns
    append = lat.append
    n, i = len(walk), start % len(walk)
    while True:
        t0 = pc()
        try:
            await fn(walk[i])
        except Exception as exc:
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
        t1 = pc()
        append(t1 - t0)
        i = i + 1 if i + 1 < n else 0
        if t1 >= deadline_ns:
            return


async def _point(c: AsyncContender, op: str, walk: list[Any], tasks: int, seconds: float,
                 lat: list[int], errors: dict[str, int]) -> float:
    """One contender's turn: `tasks` tasks for `seconds`; returns the wall seconds it took."""
    fn = c.get_latest if op == "get_latest" else c.get_many
    start = time.perf_counter_ns()
    deadline = start + int(seconds * 1e9)
    await asyncio.gather(*(_task(fn, walk, k * 7, deadline, lat, errors) for k in range(tasks)))
    return (time.perf_counter_ns() - start) / 1e9


def _quantile(xs: Sequence[int], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def sweep(contenders: Sequence[AsyncContender], targets: Sequence[str], task_counts: Sequence[int],
                seconds: float) -> list[dict[str, Any]]:
    """One row per (op, N, contender): ops/s, p50/p99, errors, reads the library served from PostgreSQL, ratio to the floor."""
    rows = []
    k = len(contenders)
    for op in SWEEP_OPS:
        walk = _args(op, targets)
        for tasks in task_counts:
            lat: list[list[int]] = [[] for _ in contenders]
            wall = [0.0] * k
            errors: list[dict[str, int]] = [{} for _ in contenders]
            tier_errors = [c.tier_errors() for c in contenders]
            for turn in range(SLICES):
                for i in [(turn + j) % k for j in range(k)]:
                    wall[i] += await _point(contenders[i], op, walk, tasks, seconds / SLICES, lat[i], errors[i])
            rates = [(len(lat[i]) - sum(errors[i].values())) / wall[i] for i in range(k)]
            for i, c in enumerate(contenders):
                before, after = tier_errors[i], c.tier_errors()
                rows.append({"op": op, "tasks": tasks, "contender": c.name, "ops": len(lat[i]),
                             "ops_per_s": rates[i], "p50_us": statistics.median(lat[i]) / 1e3,
                             "p99_us": _quantile(lat[i], 0.99) / 1e3, "errors": errors[i],
                             "served_by_pg": None if before is None else after - before,
                             "vs_floor": rates[0] / rates[i] if rates[i] else None})
    return rows


def render_sweep(sweep: dict[str, Any]) -> list[str]:
    """The sweep as one table per op: a row per contender, ops/s, p50/p99 and time per op vs the floor at each N."""
    out = [f"concurrency sweep: N tasks on one event loop, {sweep['seconds']:g} s per contender per point "
           f"({SLICES} interleaved turns); vs floor = floor ops/s / contender ops/s"]
    for op in SWEEP_OPS:
        rows = [r for r in sweep["rows"] if r["op"] == op]
        if not rows:
            continue
        names = list(dict.fromkeys(r["contender"] for r in rows))
        head = ["contender", *(f"N={n}: ops/s  p50/p99 µs  vs floor" for n in sweep["tasks"])]
        body = []
        for name in names:
            cells = [name]
            for n in sweep["tasks"]:
                r = next(x for x in rows if x["contender"] == name and x["tasks"] == n)
                err = f" [{sum(r['errors'].values())} failed]" if r["errors"] else ""
                err += f" [{r['served_by_pg']} from PG]" if r["served_by_pg"] else ""
                vs = "-" if r["vs_floor"] is None else f"{r['vs_floor']:.2f}x"
                cells.append(f"{r['ops_per_s']:,.0f}  {r['p50_us']:,.0f}/{r['p99_us']:,.0f}  {vs}{err}")
            body.append(cells)
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
        out += ["", f"{op}:"]
        out += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                for cells in [head, ["-" * w for w in widths], *body]]
        out += [f"  failed at N={r['tasks']}, {r['contender']}: "
                + ", ".join(f"{n} {kind}" for kind, n in r["errors"].items()) for r in rows if r["errors"]]
    return out
