"""`tiered-cache bench --http`: examples/fastapi_app.py under load, on the pooled store, Redis only and near + Redis.

Workload: uvicorn with 2 workers on a loopback port; 16 keep-alive connections, each a seeded stream of
70% board pages (20-50 Zipf-popular targets of one venue and app), 25% chat turns (the latest result and
its history) and 5% mutations (writes, regenerations, invalidations), for a fixed time after a warm-up.
The backends run in turn, rotated between runs. CPU comes from /proc (the uvicorn tree, the postmaster's
tree, redis-server, and this generator), PostgreSQL transactions from pg_stat_database, both read while
the load runs. Every read of a key the generator mutated is held against the last mutation's reply.
It asserts nothing about time; it prints a table and writes http.md and http.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import psycopg

from . import _procstat
from ._loadgen import ENDPOINTS, Connection, Driver, Mix, StaleCheck, percentile_ms
from ._workload import SITE_BASE, Keyspace, WorkloadSpec, document_pool

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
NEAR_ENTRIES = "10000"  # the example's default
BACKENDS: dict[str, tuple[str, dict[str, str]]] = {
    "store": ("pooled AsyncPostgresStore (no cache)", {"TIERED_CACHE_BACKEND": "store"}),
    "redis": ("AsyncTieredCache, Redis only", {"TIERED_CACHE_BACKEND": "cache", "TIERED_CACHE_NEAR_MAX_ENTRIES": "0"}),
    "near": ("AsyncTieredCache, near + Redis", {"TIERED_CACHE_BACKEND": "cache", "TIERED_CACHE_NEAR_MAX_ENTRIES": NEAR_ENTRIES}),
}
BAR = "near + Redis >= 1.5x the store's req/s at <= 0.7x its server CPU per request; Redis only >= 1.0x; " \
      "PostgreSQL transactions per 1,000 requests <= 1/5 of the store's; zero errors; zero stale reads beyond the near bound"


def near_max_age() -> float:
    """The near tier's staleness bound as the example runs it (the library's default)."""
    from tiered_cache import AsyncTieredCache

    return float(inspect.signature(AsyncTieredCache.__init__).parameters["near_max_age"].default)


# -- data -------------------------------------------------------------------------------------------


def prepare(dsn: str, url: str, spec: WorkloadSpec) -> dict[str, Any]:
    """Migrate, drop what an earlier run left (rows, and the example's cached entries of bench venues), load afresh."""
    import redis

    from tiered_cache import migrate

    from .run import clean, load

    migrate(dsn)
    clean(dsn, url)
    client = redis.Redis.from_url(url)
    try:  # the example caches under namespace "tc": bench venues are 9xxxxxx
        stale = list(client.scan_iter(match="tc:*:{*:9[0-9][0-9][0-9][0-9][0-9][0-9]:*", count=1000))
        for i in range(0, len(stale), 1000):
            client.unlink(*stale[i : i + 1000])
    finally:
        client.close()
    return load(dsn, spec, Keyspace(spec))


def prewarm(dsn: str, url: str, spec: WorkloadSpec) -> dict[str, float]:
    """Every key read once through the example's cache (its board page and its chat history), before any backend runs.

    A deployment's Redis holds its keys after its first hour; a 3 s warm-up of 140,000 keys would measure a cold
    start instead. It reads the rows the store backend reads, so PostgreSQL's buffers are warmed for every backend.
    """
    from tiered_cache import AsyncTieredCache

    keyspace = Keyspace(spec)
    pages: dict[tuple[str, int], list[str]] = {}
    for app, site, _, target in keyspace.all_keys():
        pages.setdefault((app, site), []).append(target)

    async def run() -> tuple[float, float]:
        async with await AsyncTieredCache.connect(dsn, url, max_size=8) as cache:  # the example's defaults otherwise

            async def drain(calls: Iterator[Any]) -> None:  # 8 workers on one iterator: 8 calls in flight, no more
                for call in calls:
                    await call

            async def each(calls: Iterator[Any]) -> float:
                started = time.perf_counter()
                await asyncio.gather(*(drain(calls) for _ in range(8)))
                return time.perf_counter() - started

            boards = await each(cache.get_many_json(app, site, ids[i : i + 50]) for (app, site), ids in pages.items()
                                for i in range(0, len(ids), 50))
            histories = await each(cache.get_history_json(app, site, t, limit=3)  # the chat endpoint's limit
                                   for (app, site), ids in pages.items() for t in ids)
            return boards, histories

    boards_s, histories_s = asyncio.run(run())
    return {"prewarm_pages_s": boards_s, "prewarm_histories_s": histories_s}


def max_row_id(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM biz.ai_cache WHERE site_id >= %s",
                                (SITE_BASE,)).fetchone()[0])


# -- the server under test --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def uvicorn(backend: str, dsn: str, url: str, workers: int, log_dir: Path,
            stock: bool = False, near_entries: int | None = None) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The example under `uvicorn --workers N` on a free loopback port; stopped (SIGTERM, then SIGKILL) on exit.

    Unless `stock`, uvicorn starts through bench/_uvicorn.py, which only binds its listener so TCP_NODELAY holds.
    """
    if not (EXAMPLES / "fastapi_app.py").exists():
        raise SystemExit(f"bench --http needs the repository's examples/ ({EXAMPLES} is missing)")
    port = free_port()
    env = {**os.environ, "TIERED_CACHE_DSN": dsn, "TIERED_CACHE_REDIS_URL": url, **BACKENDS[backend][1]}
    if backend == "near" and near_entries is not None:
        env["TIERED_CACHE_NEAR_MAX_ENTRIES"] = str(near_entries)
    log_path = log_dir / f"uvicorn-{backend}.log"
    launcher = "uvicorn" if stock else "tiered_cache.bench._uvicorn"
    cmd = [sys.executable, "-m", launcher, "fastapi_app:app", "--app-dir", str(EXAMPLES), "--host", HOST,
           "--port", str(port), "--workers", str(workers), "--no-access-log", "--log-level", "warning"]
    parent = os.getpid()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=lambda: _term_with(parent))
    try:
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)  # its own session: only the processes this bench started
            proc.wait(5)


def _term_with(parent: int) -> None:
    """In the child: SIGTERM when this bench dies (uvicorn then stops its workers), so a killed run leaves no app."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _log_tail(log_dir: Path, backend: str) -> str:
    with contextlib.suppress(OSError):
        return (log_dir / f"uvicorn-{backend}.log").read_text(errors="replace")[-2000:]
    return ""


async def balanced_connections(proc: subprocess.Popen[bytes], port: int, n: int, workers: int,
                               timeout: float = 60.0) -> tuple[list[Connection], list[int], list[int]]:
    """n keep-alive connections, as evenly spread over the workers as a load balancer would (reopened until so).

    Which worker accepts a connection is the kernel's lottery; 16 long-lived connections left to it can put
    12 on one worker. A connection no worker has accepted yet (a worker still starting) is reopened too.
    """
    deadline = time.monotonic() + timeout
    conns = [Connection(HOST, port) for _ in range(n)]
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}")
        try:
            for c in conns:
                if c.writer is None:
                    await c.open()
                    status, _ = await asyncio.wait_for(c.request("GET", "/healthz"), 5)
                    if status != 200:
                        raise OSError(f"/healthz answered {status}")
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            for c in conns:
                c.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app did not become ready in {timeout:.0f} s: {exc}") from exc
            await asyncio.sleep(0.2)
            continue
        pids = [p for p in _procstat.tree(proc.pid) if p != proc.pid]
        held = _procstat.connections_by_worker(pids, port)
        owner = {port_: pid for pid, ports in held.items() for port_ in ports}
        per = {pid: [c for c in conns if owner.get(c.local_port) == pid] for pid in held}
        share = -(-n // workers)
        busy = [pid for pid, cs in per.items() if cs]
        if len(busy) == min(workers, n) and all(len(cs) <= share for cs in per.values()) and len(owner) >= n:
            return conns, sorted(len(cs) for cs in per.values() if cs), busy
        if time.monotonic() > deadline:
            return conns, sorted(len(cs) for cs in per.values() if cs), busy  # reported as measured
        for cs in per.values():
            for c in cs[share:]:
                c.close()
        for c in conns:
            if c.writer is not None and c.local_port not in owner:
                c.close()
        await asyncio.sleep(0.05)


# -- one measurement --------------------------------------------------------------------------------


class Meters:
    """CPU seconds of the app, PostgreSQL, Redis and this generator, and PostgreSQL's transaction count."""

    def __init__(self, dsn: str, url: str, app_pid: int) -> None:
        import redis

        self.conn = psycopg.connect(dsn, autocommit=True)
        backend = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.postmaster = int(_procstat._stat(backend)[1])  # type: ignore[index]
        client = redis.Redis.from_url(url)
        try:
            self.redis_pid = int(client.info("server")["process_id"])
        finally:
            client.close()
        self.app_pid = app_pid

    def snapshot(self) -> dict[str, float]:
        xacts = self.conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                                  "WHERE datname = current_database()").fetchone()[0]
        return {"app": _procstat.tree_cpu(self.app_pid), "pg": _procstat.tree_cpu(self.postmaster),
                "redis": _procstat.tree_cpu(self.redis_pid), "loadgen": _procstat.own_cpu(),
                "xacts": float(xacts), "t": time.perf_counter()}

    def close(self) -> None:
        self.conn.close()


def measure(backend: str, dsn: str, url: str, spec: WorkloadSpec, args: argparse.Namespace, stream_base: int,
            log_dir: Path) -> dict[str, Any]:
    """One backend: start the app, spread the connections, warm up, measure, stop the app."""
    docs = [orjson.dumps(d) for d in document_pool(spec.seed)]
    keyspace = Keyspace(spec)
    bound = near_max_age() if backend == "near" else 0.0
    stale = StaleCheck(max_row_id(dsn), bound)
    with uvicorn(backend, dsn, url, args.workers, log_dir, args.stock_uvicorn, args.near_entries) as (proc, port):

        async def drive() -> tuple[Driver, Any, Any, list[int]]:
            try:
                conns, spread, _ = await balanced_connections(proc, port, args.connections, args.workers)
            except RuntimeError as exc:
                raise RuntimeError(f"{backend}: {exc}\n{_log_tail(log_dir, backend)}") from exc
            mixes = [Mix(spec, keyspace, docs, stream_base + i) for i in range(len(conns))]
            meters = Meters(dsn, url, proc.pid)
            try:
                driver = Driver(conns, mixes, stale)
                before, after = await driver.run(args.warmup, args.seconds, meters.snapshot)
            finally:
                meters.close()
                for c in conns:
                    c.close()
            return driver, before, after, spread

        driver, before, after, spread = asyncio.run(drive())
    return summarize(backend, driver, before, after, spread, stale)


def summarize(backend: str, driver: Driver, before: dict[str, float], after: dict[str, float], spread: list[int],
              stale: StaleCheck) -> dict[str, Any]:
    t = driver.tally
    seconds = t.window[1] - t.window[0]
    n = sum(t.counted.values())
    per = {k: after[k] - before[k] for k in ("app", "pg", "redis", "loadgen", "xacts")}
    ms = {k: 1000 * per[k] / n if n else None for k in ("app", "pg", "redis", "loadgen")}
    return {
        "backend": backend, "label": BACKENDS[backend][0], "seconds": round(seconds, 3), "requests": n,
        "req_per_s": n / seconds if seconds > 0 else 0.0,
        "endpoints": {e: {"requests": t.counted[e], "p50_ms": percentile_ms(t.latency_ns[e], 0.50),
                          "p99_ms": percentile_ms(t.latency_ns[e], 0.99), "errors": t.errors[e]} for e in ENDPOINTS},
        "cpu_ms_per_request": {**ms, "server": None if n == 0 else sum(ms[k] for k in ("app", "pg", "redis"))},
        "cpu_s": {k: round(per[k], 3) for k in ("app", "pg", "redis", "loadgen")},
        "pg_xacts_per_1k": 1000 * per["xacts"] / n if n else None,
        "errors": sum(t.errors.values()), "error_examples": t.error_examples, "sent": t.sent,
        "stale_reads": stale.stale, "stale_within_bound": stale.stale_within_bound, "stale_bound_s": stale.bound,
        "reads_checked": stale.checked, "stale_examples": stale.examples, "connections_per_worker": spread,
    }


# -- runs, summary, report --------------------------------------------------------------------------


def ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against the store's row of the same run: req/s, server CPU per request, PostgreSQL transactions."""
    base = next((r for r in rows if r["backend"] == "store"), None)
    for r in rows:
        if base is None or not base["req_per_s"]:
            r["vs_store"] = None
            continue
        cpu, bcpu = r["cpu_ms_per_request"]["server"], base["cpu_ms_per_request"]["server"]
        r["vs_store"] = {"req_per_s": r["req_per_s"] / base["req_per_s"],
                         "server_cpu": cpu / bcpu if cpu is not None and bcpu else None,
                         "pg_xacts": (r["pg_xacts_per_1k"] / base["pg_xacts_per_1k"]
                                      if base["pg_xacts_per_1k"] else None)}


def summary(runs: list[list[dict[str, Any]]], backends: list[str]) -> list[dict[str, Any]]:
    """Per backend: the median over runs of each figure, with the min and max of the ratios."""
    out = []
    for b in backends:
        rows = [r for run in runs for r in run if r["backend"] == b]
        med = statistics.median

        def spread(get: Any) -> dict[str, float] | None:
            vals = [v for v in (get(r) for r in rows) if v is not None]
            return {"median": med(vals), "min": min(vals), "max": max(vals)} if vals else None

        out.append({
            "backend": b, "label": BACKENDS[b][0], "runs": len(rows),
            "req_per_s": spread(lambda r: r["req_per_s"]),
            "p50_ms": {e: spread(lambda r, e=e: r["endpoints"][e]["p50_ms"]) for e in ENDPOINTS},
            "p99_ms": {e: spread(lambda r, e=e: r["endpoints"][e]["p99_ms"]) for e in ENDPOINTS},
            "cpu_ms_per_request": {k: spread(lambda r, k=k: r["cpu_ms_per_request"][k])
                                   for k in ("app", "pg", "redis", "server", "loadgen")},
            "pg_xacts_per_1k": spread(lambda r: r["pg_xacts_per_1k"]),
            "vs_store": {k: spread(lambda r, k=k: (r["vs_store"] or {}).get(k)) for k in ("req_per_s", "server_cpu", "pg_xacts")},
            "errors": sum(r["errors"] for r in rows), "stale_reads": sum(r["stale_reads"] for r in rows),
            "stale_within_bound": sum(r["stale_within_bound"] for r in rows),
            "reads_checked": sum(r["reads_checked"] for r in rows),
        })
    return out


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    if isinstance(v, dict):
        v = v.get("median")
    return "-" if v is None else fmt.format(v)


def _range(v: dict[str, float] | None, fmt: str = "{:.2f}") -> str:
    if not v:
        return "-"
    return fmt.format(v["median"]) + (f" ({fmt.format(v['min'])}-{fmt.format(v['max'])})" if v["min"] != v["max"] else "")


def render(result: dict[str, Any]) -> str:
    """The summary as a Markdown table (medians over runs; ratio ranges in brackets), then the notes."""
    w = result["workload"]
    lines = [f"# bench --http: {w['connections']} connections, {w['workers']} uvicorn workers, "
             f"{w['seconds']:g} s measured per backend per run (after {w['warmup']:g} s warm-up), {w['runs']} run(s)", "",
             f"Mix: {w['mix']}. Data: {w['keys']} keys ({w['rows_loaded']} rows, ~{w['avg_result_bytes']} B results).",
             f"Machine: {result['machine']}. Load average before/after: {result['loadavg_before']} / {result['loadavg_after']}.", "",
             "| backend | req/s | x store | board p50/p99 ms | chat p50/p99 ms | write p50/p99 ms | CPU ms/req app / PG / Redis "
             "= server | x store | loadgen CPU ms/req | PG xacts/1k req | x store | errors | stale (within bound) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        c = s["cpu_ms_per_request"]
        lines.append(
            f"| {s['label']}{_near_size(result, s['backend'])} | {_f(s['req_per_s'], '{:.0f}')} | {_range(s['vs_store']['req_per_s'])} "
            f"| {_f(s['p50_ms']['board'])} / {_f(s['p99_ms']['board'])} | {_f(s['p50_ms']['chat'])} / {_f(s['p99_ms']['chat'])} "
            f"| {_f(s['p50_ms']['write'])} / {_f(s['p99_ms']['write'])} "
            f"| {_f(c['app'])} / {_f(c['pg'])} / {_f(c['redis'])} = {_f(c['server'])} | {_range(s['vs_store']['server_cpu'])} "
            f"| {_f(c['loadgen'])} | {_f(s['pg_xacts_per_1k'], '{:.0f}')} | {_range(s['vs_store']['pg_xacts'], '{:.3f}')} "
            f"| {s['errors']} | {s['stale_reads']} ({s['stale_within_bound']}) of {s['reads_checked']} |")
    lines += ["", f"Bar: {BAR}.", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def _near_size(result: dict[str, Any], backend: str) -> str:
    entries = result["workload"].get("near_entries")
    return f" ({entries:,} entries)" if backend == "near" and entries is not None else ""


def notes(result: dict[str, Any]) -> list[str]:
    return [
        "Server CPU per request: utime+stime deltas from /proc of the uvicorn master and its workers (app), the "
        "postmaster and every child of it (PG), and redis-server (Redis), read while the load runs, divided by the "
        "requests completed in the window; loadgen is this generator's own CPU, which shares the same 2 cores.",
        "PostgreSQL transactions: pg_stat_database.xact_commit + xact_rollback of the bench database, read while the "
        "load runs at both ends of the window (so the statistics' flush lag falls on both alike); the cache backends' "
        "figure includes each worker's relay polling the outbox.",
        "Stale reads: a board or chat read of a key this generator mutated, begun after the mutation's reply arrived, "
        "answering an older state (mutations of a key are serialized, so its states are ordered by row id); for near + "
        f"Redis a read older than the state near_max_age ({result['near_max_age']:g} s) before it began is stale, "
        "one stale only within that bound is counted in brackets.",
        "Regenerations are writes with triggered_by=regenerate (the example exposes no set_generating endpoint). "
        "Latencies are from request sent to reply read, on the generator's clock; write p50/p99 covers POSTs.",
        ("Before the runs every key was read once through the cache (its board page and its chat history: "
         f"{result['workload'].get('prewarm_pages_s', 0):.1f} s and {result['workload'].get('prewarm_histories_s', 0):.1f} s), "
         "as a deployment's Redis holds its keys after its first hour (`--cold` skips it). "
         if result["workload"]["prewarmed"] else "Cold start (`--cold`): nothing was read before the runs. ")
        + f"The backends run in turn (rotated between runs), each in a fresh uvicorn; Redis and PostgreSQL stay warm "
        f"across them. Connections per worker after spreading: "
        + "; ".join(f"{r['backend']} {r['connections_per_worker']}" for run in result["runs"] for r in run[:3]) + ".",
        f"HTTP stack: uvicorn {result['versions'].get('uvicorn', '?')} ({result['versions'].get('http', '?')}, "
        f"{result['versions'].get('loop', '?')} loop), "
        + ("stock `--workers` listener (Nagle on: ~43 ms delayed-ACK stall per request, Kludex/uvicorn#3149), "
           if result["workload"]["stock_uvicorn"] else "started through bench/_uvicorn.py so the `--workers` listener "
           "keeps TCP_NODELAY (stock uvicorn loses it, Kludex/uvicorn#3149: ~43 ms per request; --stock-uvicorn shows it), ")
        + f"PostgreSQL {result['versions'].get('postgresql', '?')}, Redis {result['versions'].get('redis', '?')}.",
    ]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tiered-cache bench --http", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "quick", "full"), default="full", help="the data (bench/_workload.py SIZES)")
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per backend per run")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each measurement")
    p.add_argument("--runs", type=int, default=3, help="runs over all backends, rotated (spread over runs)")
    p.add_argument("--tiny", action="store_true", help="tiny data, 2 s per backend, one run (the test suite's size)")
    p.add_argument("--backends", default="store,redis,near", help="comma-separated subset of store,redis,near")
    p.add_argument("--connections", type=int, default=16, help="concurrent keep-alive connections")
    p.add_argument("--workers", type=int, default=2, help="uvicorn workers")
    p.add_argument("--stock-uvicorn", action="store_true",
                   help="plain `python -m uvicorn` (its --workers listener loses TCP_NODELAY: ~43 ms a request)")
    p.add_argument("--near-entries", type=int, default=int(NEAR_ENTRIES),
                   help="near + Redis: the near tier's max entries (the example's default; its 64 MiB byte bound holds)")
    p.add_argument("--cold", action="store_true",
                   help="skip the prewarm (every key read once through the cache before the runs): a cold start")
    p.add_argument("--seed", type=int, default=WorkloadSpec.seed, help="workload seed (data and every op stream)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where http.md and http.json go")
    p.add_argument("--dsn", help="PostgreSQL DSN (default $TIERED_CACHE_DSN, else a throwaway server)")
    p.add_argument("--redis-url", help="Redis URL (default $TIERED_CACHE_REDIS_URL, else a throwaway server)")
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.seconds, args.warmup, args.runs = "tiny", 2.0, 0.5, 1
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or set(args.backends) - set(BACKENDS):
        p.error(f"--backends: expected a subset of {','.join(BACKENDS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every backend in turn; print the table; write http.md and http.json. Returns 0."""
    args = parse(argv)
    if args.dsn:
        os.environ["TIERED_CACHE_DSN"] = args.dsn
    if args.redis_url:
        os.environ["TIERED_CACHE_REDIS_URL"] = args.redis_url
    from importlib.metadata import version

    from .run import server_versions, servers

    spec = WorkloadSpec(size=args.size, seed=args.seed)
    loadavg_before = os.getloadavg()
    with servers() as srv, tempfile.TemporaryDirectory(prefix="bench-http-") as logs:
        loaded = prepare(srv.dsn, srv.redis_url, spec)
        if not args.cold:
            loaded.update(prewarm(srv.dsn, srv.redis_url, spec))
        runs = []
        for i in range(args.runs):
            order = args.backends[i % len(args.backends):] + args.backends[: i % len(args.backends)]
            rows = [measure(b, srv.dsn, srv.redis_url, spec, args, 100 * i + 10 * j, Path(logs))
                    for j, b in enumerate(order)]
            rows.sort(key=lambda r: args.backends.index(r["backend"]))
            ratios(rows)
            runs.append(rows)
        versions = {**server_versions(srv.dsn, srv.redis_url), "uvicorn": version("uvicorn"),
                    "http": "httptools" if _importable("httptools") else "h11",
                    "loop": "uvloop" if _importable("uvloop") else "asyncio"}
    result: dict[str, Any] = {
        "workload": {"connections": args.connections, "workers": args.workers, "seconds": args.seconds,
                     "warmup": args.warmup, "runs": args.runs, "size": args.size, "seed": args.seed,
                     "stock_uvicorn": args.stock_uvicorn, "prewarmed": not args.cold,
                     "near_entries": args.near_entries,
                     "mix": "70% board pages (20-50 targets), 25% chat turns (latest + history of 3), 5% mutations "
                            "(50% writes, 35% regenerations, 15% invalidations), Zipf-popular keys",
                     "keys": len(Keyspace(spec).sites) * spec.dims.targets * 7, **loaded},
        "machine": f"{os.cpu_count()} CPUs, {sys.platform}, Python {sys.version.split()[0]}",
        "loadavg_before": " ".join(f"{x:.2f}" for x in loadavg_before),
        "loadavg_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "near_max_age": near_max_age(), "versions": versions, "bar": BAR, "runs": runs,
        "summary": summary(runs, args.backends),
    }
    result["notes"] = notes(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (args.out / "http.md").write_text(render(result), encoding="utf-8")
    print(orjson.dumps(result).decode() if args.json else render(result))
    if not args.json:
        print(f"written: {args.out / 'http.md'}, {args.out / 'http.json'}")
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
