"""Concurrency sweep: the main contenders under 1..N threads sharing one instance, and under 2 processes."""

from __future__ import annotations

import multiprocessing
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from ._contenders import ENTRIES, Contender, Env
from ._workload import Keyspace, Op, WorkloadSpec, chat_stream, document_pool


def _errors(c: Contender) -> int:
    return c.tier_stats().get("redis_errors", 0)


def run_threads(c: Contender, ops: Sequence[Op], threads: int, seconds: float) -> tuple[int, int, list[int], int]:
    """`threads` threads share one contender, each on its own part of the stream; (ops, wall ns, latencies, Redis errors)."""
    errors_before = _errors(c)
    barrier = threading.Barrier(threads)
    out: list[Any] = [None] * threads
    errors: list[BaseException] = []

    def work(i: int) -> None:
        lat: list[int] = []
        cursor = (i * len(ops)) // threads
        try:
            barrier.wait(10)
            t0 = time.perf_counter_ns()
            _, n, _, _ = c.run_slice(ops, cursor, t0 + int(seconds * 1e9), lat, {})
            out[i] = (n, t0, time.perf_counter_ns(), lat)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
            barrier.abort()

    workers = [threading.Thread(target=work, args=(i,), name=f"bench-{i}") for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    ops_done = sum(o[0] for o in out)
    wall = max(o[2] for o in out) - min(o[1] for o in out)
    return ops_done, wall, [x for o in out for x in o[3]], _errors(c) - errors_before


# -- two processes ----------------------------------------------------------------------------------


def _child(conn: Any, barrier: Any, dsn: str, url: str, spec: dict[str, Any], names: list[str], prefix: str,
           index: int, processes: int, warmup_s: float, time_scale: float) -> None:
    """One sweep process: builds its own contenders (same Redis namespaces, so Redis is warm), then runs on command."""
    ws = WorkloadSpec(**spec)
    env = Env(dsn, url, document_pool(ws.seed), prefix, time_scale=time_scale)
    ops = chat_stream(ws, Keyspace(ws), seed_offset=0)
    built: dict[str, Contender] = {}
    failed: dict[str, str] = {}
    for entry in ENTRIES:
        if entry.name in names:
            try:
                c = built[entry.name] = entry.cls(env)
                c.run_slice(ops, 0, time.perf_counter_ns() + int(warmup_s * 1e9), [], {})
            except Exception as exc:  # reported to the parent, which leaves the contender out
                failed[entry.name] = f"{type(exc).__name__}: {exc}"
    conn.send(("ready", failed))
    cursor = (index * len(ops)) // processes
    try:
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            _, name, seconds = cmd
            lat: list[int] = []
            errors = _errors(built[name])
            barrier.wait(30)
            t0 = time.perf_counter_ns()
            cursor, n, _, _ = built[name].run_slice(ops, cursor, t0 + int(seconds * 1e9), lat, {})
            conn.send((n, t0, time.perf_counter_ns(), _errors(built[name]) - errors, array("q", lat).tobytes()))
    finally:
        for c in built.values():
            c.close()
        conn.close()


class ProcessPool:
    """`processes` spawned workers that run one named contender at a time, all together, behind a barrier."""

    def __init__(self, dsn: str, url: str, spec: WorkloadSpec, names: list[str], prefix: str, processes: int,
                 warmup_s: float, time_scale: float = 1.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.barrier = ctx.Barrier(processes)
        self.pipes = []
        self.procs = []
        for i in range(processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_child, args=(child, self.barrier, dsn, url, asdict(spec), names, prefix, i,
                                                 processes, warmup_s, time_scale), daemon=True, name=f"bench-proc-{i}")
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)
        self.failed: dict[str, str] = {}
        for pipe in self.pipes:
            if not pipe.poll(120):
                raise RuntimeError("a sweep process did not start within 120 s")
            _, failed = pipe.recv()
            self.failed.update(failed)

    def run(self, name: str, seconds: float) -> tuple[int, int, list[int], int]:
        for pipe in self.pipes:
            pipe.send(("run", name, seconds))
        out = []
        for pipe in self.pipes:
            if not pipe.poll(seconds + 120):
                raise RuntimeError(f"a sweep process did not finish {name} in time")
            out.append(pipe.recv())
        lat: list[int] = []
        for *_, raw in out:
            lat.extend(array("q", raw))
        return (sum(o[0] for o in out), max(o[2] for o in out) - min(o[1] for o in out), lat,
                sum(o[3] for o in out))

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(5)


def sweep(contenders: dict[str, Contender], names: list[str], ops: Sequence[Op], threads: Sequence[int],
          processes: int, seconds: float, pool_factory: Callable[[], ProcessPool] | None,
          tick: Callable[[str, float], None], summarize: Callable[[int, int, list[int]], dict[str, Any]]) -> dict[str, Any]:
    """Each point runs every contender twice for half the time, interleaved; returns rows by contender."""
    points = [f"{t} thread{'s' if t > 1 else ''}" for t in threads]
    acc: dict[str, dict[str, list[Any]]] = {n: {} for n in names}
    errors: dict[str, str] = {}
    half = seconds / 2
    for t, label in zip(threads, points):
        for _ in range(2):
            for name in names:
                if name in errors:
                    continue
                try:
                    acc[name].setdefault(label, []).append(run_threads(contenders[name], ops, t, half))
                except Exception as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"
                tick(f"{label} · {name}", half)
    if processes > 1 and pool_factory is not None:
        label = f"{processes} processes"
        points.append(label)
        pool = pool_factory()
        try:
            errors.update(pool.failed)
            for _ in range(2):
                for name in names:
                    if name in errors:
                        continue
                    try:
                        acc[name].setdefault(label, []).append(pool.run(name, half))
                    except Exception as exc:
                        errors[name] = f"{type(exc).__name__}: {exc}"
                    tick(f"{label} · {name}", half)
        finally:
            pool.close()
    rows = []
    for name in names:
        pts = {}
        for label, runs in acc[name].items():
            n = sum(r[0] for r in runs)
            wall = sum(r[1] for r in runs)
            pts[label] = {**summarize(n, wall, [x for r in runs for x in r[2]]),
                          "redis_errors": sum(r[3] for r in runs)}
        rows.append({"contender": name, "points": pts, "error": errors.get(name)})
    return {"points": points, "rows": rows}
