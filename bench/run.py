"""`tiered-cache bench`: the product's read paths through every contender, interleaved in one process.

Workload: many venues, the old service's seven apps, ~1.5 KB JSON results in Chinese, Zipf-popular
targets; chat turns (get_latest + get_history), board pages (get_many of 20-50) and a mixed profile
where AI workers write, regenerate and invalidate. Contenders take turns in short time slices, so
drift (CPU frequency, background work, server caches) falls on all of them alike. It asserts nothing
about time; it prints a table and writes results.json, results.md and chart.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import psycopg

from . import _report
from ._contenders import ENTRIES, OLD, Contender, Entry, Env, near_option
from ._workload import (
    COPY_COLUMNS,
    SITE_BASE,
    SIZES,
    STREAMS,
    WORKLOAD_TEXT,
    Keyspace,
    Op,
    WorkloadSpec,
    document_pool,
    prewarm_keys,
    rows_to_load,
    touched,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PREFIX = "tcbench"
SWEEP_WORKLOAD = "chat"


# -- servers ----------------------------------------------------------------------------------------


@dataclass
class Servers:
    dsn: str
    redis_url: str
    owned_pg: bool
    owned_redis: bool


@contextlib.contextmanager
def servers() -> Iterator[Servers]:
    """TIERED_CACHE_DSN / TIERED_CACHE_REDIS_URL when set, else throwaway servers (PostgreSQL with pg_stat_statements)."""
    dsn = os.environ.get("TIERED_CACHE_DSN")
    url = os.environ.get("TIERED_CACHE_REDIS_URL")
    with contextlib.ExitStack() as stack:
        if not dsn:
            from tiered_cache.testing import PostgresServer

            pg = stack.enter_context(PostgresServer())
            _preload_pg_stat_statements(pg)
            dsn = pg.create_database("tiered_cache_bench")
        if not url:
            from tiered_cache.testing import RedisServer

            url = stack.enter_context(RedisServer()).url
        yield Servers(dsn, url, not os.environ.get("TIERED_CACHE_DSN"), not os.environ.get("TIERED_CACHE_REDIS_URL"))


def _preload_pg_stat_statements(pg: Any) -> None:
    """Our own server may be restarted: load pg_stat_statements so queries are counted by PostgreSQL itself."""
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_stat_statements'").fetchone():
                return
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        pg.restart()
    except Exception:
        auto = Path(pg.data_dir) / "postgresql.auto.conf"
        with contextlib.suppress(OSError):
            auto.write_text("".join(l for l in auto.read_text().splitlines(True) if "shared_preload" not in l))
        if not pg.running:
            pg.start()


class PgStatements:
    """Statements on biz.ai_cache as counted by pg_stat_statements, when the server has it loaded."""

    def __init__(self, dsn: str) -> None:
        self.available = False
        self.reason = ""
        self.conn = psycopg.connect(dsn, autocommit=True)
        created = False
        try:
            if not self.conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone():
                self.conn.execute("CREATE EXTENSION pg_stat_statements")
                created = True
            self.calls()
            self.available = True
        except psycopg.Error as exc:
            self.reason = str(exc).strip().splitlines()[0]
            if created:
                with contextlib.suppress(psycopg.Error):
                    self.conn.execute("DROP EXTENSION IF EXISTS pg_stat_statements")

    def calls(self) -> int:
        return self.conn.execute(
            "SELECT coalesce(sum(s.calls), 0)::bigint FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
            "WHERE d.datname = current_database() AND s.query LIKE '%biz.ai_cache%' "
            "AND s.query NOT LIKE '%pg_stat_statements%'"
        ).fetchone()[0]

    def close(self) -> None:
        self.conn.close()


def server_versions(dsn: str, url: str) -> dict[str, str]:
    import redis

    with psycopg.connect(dsn) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
    client = redis.Redis.from_url(url)
    try:
        rv = client.info("server")["redis_version"]
    finally:
        client.close()
    return {"postgresql": pg, "redis": str(rv)}


# -- data -------------------------------------------------------------------------------------------


def clean(dsn: str, url: str) -> None:
    """Remove what an earlier bench run left: its venues' rows and its Redis keys (nothing else is touched)."""
    import redis

    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in ("biz.ai_cache", "biz.ai_cache_changes"):
            conn.execute(f"DELETE FROM {table} WHERE site_id >= %s AND site_id < %s", (SITE_BASE, SITE_BASE + 10**6))
    client = redis.Redis.from_url(url)
    try:
        batch = []
        for key in client.scan_iter(match=PREFIX + "*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


def load(dsn: str, spec: WorkloadSpec, keyspace: Keyspace) -> dict[str, Any]:
    """COPY the whole table in one transaction (the schema is migrated already) and ANALYZE it."""
    from tiered_cache import ExpiryPolicy
    from tiered_cache.policy.expiry import utc_now

    started = time.perf_counter()
    policy = ExpiryPolicy()
    n = size = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(f"COPY biz.ai_cache ({', '.join(COPY_COLUMNS)}) FROM STDIN") as copy:
                for row in rows_to_load(spec, keyspace, utc_now(), policy.expires_at):
                    copy.write_row(row)
                    n += 1
                    size += len(row[3].encode())
        # The outbox trigger recorded every loaded key; no relay runs here, so those rows would only pile up.
        conn.execute("DELETE FROM biz.ai_cache_changes WHERE site_id >= %s", (SITE_BASE,))
        conn.execute("ANALYZE biz.ai_cache")
    return {"rows_loaded": n, "avg_result_bytes": size // max(n, 1), "load_s": time.perf_counter() - started}


_HISTORY_BULK = """
SELECT k.i, h.id, h.cache_type, h.site_id, h.target_id, h.result_json, h.score, h.triggered_by, h.created_at, h.expires_at
FROM unnest(%(ct)s::text[], %(site)s::bigint[], %(tid)s::text[], %(lim)s::int[]) WITH ORDINALITY AS k(ct, site, tid, lim, i)
CROSS JOIN LATERAL (
    SELECT * FROM biz.ai_cache a WHERE a.cache_type = k.ct AND a.site_id = k.site AND a.target_id = k.tid
    ORDER BY a.created_at DESC, a.id DESC LIMIT k.lim
) h
ORDER BY k.i, h.created_at DESC, h.id DESC
"""


def floor_bytes(dsn: str, streams: dict[str, list[Op]], prefix: str) -> dict[str, bytes]:
    """For every key the read streams touch, the exact bytes TieredCache stores (latest entries and histories)."""
    from psycopg.types.json import set_json_loads

    from tiered_cache import PostgresStore
    from tiered_cache.policy.entries import encode, encode_entry
    from tiered_cache.tiers import _sql

    reads = [ops for name, ops in streams.items() if name in ("chat", "board")]
    out: dict[str, bytes] = {}
    groups: dict[tuple[str, int], list[str]] = defaultdict(list)
    for ct, site, target in sorted(touched(reads)):
        groups[(ct, site)].append(target)
    with PostgresStore(dsn) as store:
        for (ct, site), targets in groups.items():
            for i in range(0, len(targets), 1000):
                for target, row in store.fetch_many(ct, site, targets[i : i + 1000]).items():
                    out[f"{prefix}-floor:e:{ct}:{site}:{target}"] = encode_entry(row)
    hist = sorted({(ct, site, t, lim) for ops in reads for k, ct, site, t, lim in ops if k == "H"})
    if hist:
        with psycopg.connect(dsn, autocommit=True, options="-c TimeZone=Asia/Shanghai") as conn:
            set_json_loads(orjson.loads, conn)
            rows = conn.execute(_HISTORY_BULK, {"ct": [h[0] for h in hist], "site": [h[1] for h in hist],
                                                "tid": [h[2] for h in hist], "lim": [h[3] for h in hist]}).fetchall()
        by_key: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            by_key[r[0]].append(_sql.row_dict(_sql.HISTORY_COLUMNS, r[1:]))
        for i, (ct, site, t, lim) in enumerate(hist, start=1):
            out[f"{prefix}-floor:h:{ct}:{site}:{t}:{lim}"] = encode(by_key.get(i, []))
    return out


def prefill_redis(url: str, entries: dict[str, bytes]) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        items = list(entries.items())
        for i in range(0, len(items), 1000):
            pipe = client.pipeline(transaction=False)
            for k, v in items[i : i + 1000]:
                pipe.set(k, v)
            pipe.execute()
    finally:
        client.close()


# -- measuring --------------------------------------------------------------------------------------


@dataclass
class Tally:
    """One contender's measurements in one workload, summed over its slices."""

    cursor: int = 0
    ids: dict[int, int] = field(default_factory=dict)
    lat: list[int] = field(default_factory=list)
    ops: int = 0
    keys: int = 0
    read_keys: int = 0
    wall_ns: int = 0
    cpu_s: float = 0.0
    queries_client: int = 0
    queries_server: int = 0
    loaded_keys: int = 0
    tiers: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    error: str | None = None


def run_slice(c: Contender, ops: Sequence[Op], t: Tally, seconds: float, pgss: PgStatements | None, record: bool) -> float:
    """One turn of one contender; returns its wall seconds. Counters are read around it, outside the timing."""
    before_tiers = c.tier_stats()
    q0, l0 = c.counters.queries, c.counters.loaded_keys
    s0 = pgss.calls() if (pgss and record) else 0
    cpu0 = time.process_time()
    lat = t.lat if record else []
    t0 = time.perf_counter_ns()
    t.cursor, n, keys, read_keys = c.run_slice(ops, t.cursor, t0 + int(seconds * 1e9), lat, t.ids)
    wall = time.perf_counter_ns() - t0
    cpu = time.process_time() - cpu0
    if record:
        if pgss:
            t.queries_server += pgss.calls() - s0
        t.ops += n
        t.keys += keys
        t.read_keys += read_keys
        t.wall_ns += wall
        t.cpu_s += cpu
        t.queries_client += c.counters.queries - q0
        t.loaded_keys += c.counters.loaded_keys - l0
        for k, v in c.tier_stats().items():
            t.tiers[k] += v - before_tiers.get(k, 0)
    return wall / 1e9


def measure(workload: str, ops: list[Op], contenders: dict[str, Contender], dims: Any, pgss: PgStatements | None,
            progress: _report.Progress) -> dict[str, Tally]:
    """Warm up, then round-robin slices (starting contender rotated each round) until each had its budget."""
    names = list(contenders)
    tallies = {n: Tally() for n in names}
    for phase, budget, record in (("warm-up", dims.warmup_s, False), ("measure", dims.budget_s, True)):
        spent = dict.fromkeys(names, 0.0)
        rnd = 0
        while True:
            live = [n for n in names if spent[n] < budget and tallies[n].error is None]
            if not live:
                break
            order = live[rnd % len(live):] + live[: rnd % len(live)]
            rnd += 1
            for name in order:
                want = min(dims.slice_s, budget - spent[name])
                try:
                    took = run_slice(contenders[name], ops, tallies[name], want, pgss, record)
                except Exception as exc:  # a broken contender is reported, not fatal
                    tallies[name].error = f"{type(exc).__name__}: {exc}"
                    took = budget
                spent[name] += took
                progress.advance(min(took, want + 0.05), f"{phase} · {name}")
    return tallies


def summarize_latency(n: int, wall_ns: int, lat: list[int]) -> dict[str, Any]:
    p50, p99, p999 = _report.percentiles(lat)
    return {"ops": n, "ops_per_s": n / (wall_ns / 1e9) if wall_ns else None, "p50_us": p50, "p99_us": p99, "p999_us": p999}


def workload_rows(tallies: dict[str, Tally], entries: dict[str, Entry], pgss: PgStatements | None) -> list[dict[str, Any]]:
    rows = []
    for name, t in tallies.items():
        e = entries[name]
        wall = t.wall_ns / 1e9
        p50, p99, p999 = _report.percentiles(t.lat)
        tiers = t.tiers
        near_seen = tiers.get("near_hits", 0) + tiers.get("near_misses", 0)
        redis_seen = tiers.get("redis_hits", 0) + tiers.get("redis_misses", 0)
        rows.append({
            "contender": name,
            "role": e.role,
            "floor": e.floor,
            "error": t.error,
            "ops": t.ops,
            "keys": t.keys,
            "seconds": round(wall, 3),
            "ops_per_s": t.ops / wall if wall and t.ops else None,
            "keys_per_s": t.keys / wall if wall and t.ops else None,
            "p50_us": p50, "p99_us": p99, "p999_us": p999,
            "mean_us": (sum(t.lat) / len(t.lat) / 1000) if t.lat else None,
            "pg_queries_per_1k": 1000 * t.queries_client / t.ops if t.ops else None,
            "pg_queries_server_per_1k": 1000 * t.queries_server / t.ops if (t.ops and pgss) else None,
            "hit_ratio": None if e.role == "floor" or not t.read_keys else max(0.0, 1 - t.loaded_keys / t.read_keys),
            "near_hit_ratio": tiers["near_hits"] / near_seen if near_seen else None,
            "redis_hit_ratio": tiers["redis_hits"] / redis_seen if redis_seen else None,
            "tier_counters": dict(tiers),
            "cpu_us_per_op": 1e6 * t.cpu_s / t.ops if t.ops else None,
        })
    by_name = {r["contender"]: r for r in rows}
    old = by_name.get(OLD, {}).get("ops_per_s")
    for r in rows:
        r["vs_old"] = _report.ratio(r["ops_per_s"], old)
        floor = by_name.get(r["floor"]) if r["floor"] else None
        r["vs_floor"] = _report.ratio(floor["ops_per_s"], r["ops_per_s"]) if floor else None
        r["vs_floor_p50"] = _report.ratio(r["p50_us"], floor["p50_us"]) if floor else None
    return rows


def memory_pass(contenders: dict[str, Contender], ops: list[Op], cursors: dict[str, int], limit: int,
                progress: _report.Progress) -> list[dict[str, Any]]:
    """Each contender runs `limit` more chat ops (at most 0.5 s) under tracemalloc: peak and retained Python heap."""
    rows = []
    for name, c in contenders.items():
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            t0 = time.perf_counter_ns()
            _, n, _, _ = c.run_slice(ops, cursors.get(name, 0), t0 + 500_000_000, [], {}, limit)
            current, peak = tracemalloc.get_traced_memory()
        except Exception as exc:
            rows.append({"contender": name, "ops": 0, "peak_kib": None, "retained_kib": None, "error": str(exc)})
            continue
        finally:
            tracemalloc.stop()
        rows.append({"contender": name, "ops": n, "peak_kib": (peak - base) / 1024, "retained_kib": (current - base) / 1024})
        progress.advance(0.3, name)
    return rows


# -- main -------------------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tiered-cache bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="tiny (tests), quick (< 2 min), full (< 10 min)")
    p.add_argument("--quick", dest="size", action="store_const", const="quick", help="same as --size quick")
    p.add_argument("--full", dest="size", action="store_const", const="full", help="same as --size full")
    p.add_argument("--seed", type=int, default=WorkloadSpec.seed, help="workload seed (same seed, same data and ops)")
    p.add_argument("--write-rate", type=float, default=WorkloadSpec.write_rate, help="mixed profile: share of ops that write")
    p.add_argument("--workloads", default="chat,board,mixed", help="comma-separated subset of chat,board,mixed")
    p.add_argument("--only", default="", help="comma-separated substrings: run only matching contenders "
                   "(the old service and the floors are always kept, for the ratios)")
    p.add_argument("--no-sweep", action="store_true", help="skip the concurrency sweep")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="leave CPU placement to the scheduler (by default this process runs on one CPU, "
                        "its throwaway servers on the others: bench/_pinning.py)")
    p.add_argument("--runs", type=int, default=1,
                   help="repeat the whole run; results.* show the last, spread.md every figure's median and min-max")
    p.add_argument("--scale", action="store_true",
                   help="measure how cost grows with the table instead (bench/scale.py: --scale --help)")
    p.add_argument("--async", dest="async_", action="store_true",
                   help="run the async hit-path bench instead (bench/amicro.py; its flags follow: --async --help)")
    p.add_argument("--cluster", action="store_true",
                   help="the hit path on one Redis and a local 3+3 cluster instead (bench/cluster.py: --cluster --help)")
    p.add_argument("--http", action="store_true",
                   help="run the FastAPI example under HTTP load instead (bench/http.py; its flags follow: --http --help)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where results.json/.md and chart.png go")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--dsn", help="PostgreSQL DSN (default $TIERED_CACHE_DSN, else a throwaway server)")
    p.add_argument("--redis-url", help="Redis URL (default $TIERED_CACHE_REDIS_URL, else a throwaway server)")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(args.workloads) - set(STREAMS)
    if unknown:
        p.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if not 0 <= args.write_rate < 1:
        p.error("--write-rate must be in [0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table; write results.json, results.md and chart.png. Returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--scale" in argv:  # how cost grows with the table (bench/scale.py has flags of its own)
        from .scale import main as scale_main

        argv.remove("--scale")
        return scale_main(argv)
    if "--async" in argv:  # the async bench has flags of its own
        from .amicro import main as async_main

        argv.remove("--async")
        return async_main(argv)
    if "--cluster" in argv:  # the hit path on one Redis and on a local cluster, side by side
        from .cluster import main as cluster_main

        argv.remove("--cluster")
        return cluster_main(argv)
    if "--http" in argv:  # so has the web workload
        from .http import main as http_main

        argv.remove("--http")
        return http_main(argv)
    args = parse(argv)
    if args.dsn:
        os.environ["TIERED_CACHE_DSN"] = args.dsn
    if args.redis_url:
        os.environ["TIERED_CACHE_REDIS_URL"] = args.redis_url
    spec = WorkloadSpec(size=args.size, seed=args.seed, write_rate=args.write_rate)
    results = []
    with servers() as srv:
        pinned = None
        if args.pin and srv.owned_pg and srv.owned_redis:  # only servers this run started are moved
            from . import _pinning

            pinned = _pinning.pin(_pinning.server_pids(srv.dsn, srv.redis_url))
        args.pinned = pinned  # the run's method notes say where it ran
        for i in range(args.runs):
            results.append(run(spec, srv, args))
            if args.runs > 1:  # each run whole, then the spread of every figure over them
                (args.out / f"run-{i + 1}").mkdir(parents=True, exist_ok=True)
                _report.write_json(results[-1], args.out / f"run-{i + 1}" / "results.json")
    result = results[-1]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.runs > 1:
        from . import _spread

        spread = _spread.summarize(results)
        _report.write_json(spread, args.out / "spread.json")
        (args.out / "spread.md").write_text(_spread.render(spread, args.runs), encoding="utf-8")
        print(_spread.render(spread, args.runs))
    _report.write_json(result, args.out / "results.json")
    (args.out / "results.md").write_text(_report.render_markdown(result), encoding="utf-8")
    charted = _report.write_chart(result, args.out / "chart.png")
    print(_report.render_text(result))
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'results.md'}"
          + (f", {args.out / 'chart.png'}" if charted else " (no chart: matplotlib is not installed)"))
    return 0


def _selected(args: argparse.Namespace) -> tuple[list[Entry], dict[str, str]]:
    wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
    chosen, skipped = [], {}
    for e in ENTRIES:
        if wanted and e.role not in ("old", "floor") and not any(w in e.name.lower() for w in wanted):
            continue
        reason = e.available()
        if reason:
            skipped[e.name] = reason
        else:
            chosen.append(e)
    return chosen, skipped


def run(spec: WorkloadSpec, srv: Servers, args: argparse.Namespace) -> dict[str, Any]:
    dims = spec.dims
    chosen, skipped = _selected(args)
    sweep_names = [e.name for e in chosen if e.sweep]
    n_measured = len(chosen)
    n_cached = sum(e.cls.cached for e in chosen)
    prewarm_guess = {"tiny": 0.1, "quick": 0.6, "full": 2.5}.get(spec.size, 1.0)
    planned = sum((dims.budget_s + dims.warmup_s) * (n_measured if w != "mixed" else sum(e.cls.writes for e in chosen))
                  + prewarm_guess * n_cached for w in args.workloads)
    if not args.no_sweep and SWEEP_WORKLOAD in args.workloads:
        planned += dims.sweep_s * len(sweep_names) * (len(dims.sweep_threads) + (1 if dims.sweep_processes > 1 else 0))
    planned += 0.3 * n_measured + 5  # memory pass, load
    progress = _report.Progress(planned, enabled=not args.no_progress)
    phases: dict[str, float] = {}
    load_before = os.getloadavg()

    def timed(label: str, t0: float) -> None:
        phases[label] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    progress.phase("loading data")
    from tiered_cache import migrate

    migrate(srv.dsn)
    clean(srv.dsn, srv.redis_url)
    keyspace = Keyspace(spec)
    loaded = load(srv.dsn, spec, keyspace)
    streams = {name: STREAMS[name](spec, keyspace) for name in args.workloads}
    env = Env(srv.dsn, srv.redis_url, document_pool(spec.seed), PREFIX)
    env.floor_bytes = floor_bytes(srv.dsn, streams, PREFIX)
    prefill_redis(srv.redis_url, env.floor_bytes)
    progress.advance(5, "loaded")
    timed("load", t0)

    pgss = PgStatements(srv.dsn)
    pg_method = ("the client: every statement sent is counted (PostgresStore's _read/_write wrapped on each "
                 "instance, the old service's and the floor's own cursor calls); "
                 + ("cross-checked with pg_stat_statements (calls on biz.ai_cache read before and after every slice; "
                    "pg_queries_server_per_1k in results.json)" if pgss.available else
                    f"pg_stat_statements is not available here ({pgss.reason})"))

    t0 = time.perf_counter()
    progress.phase("starting contenders")
    # Each contender runs 1/N of the wall clock while N take turns: TieredCache's wall-clock windows are stretched by N.
    env.time_scale = float(n_measured)
    contenders: dict[str, Contender] = {}
    failed: dict[str, str] = {}
    for e in chosen:
        try:
            contenders[e.name] = e.cls(env)
        except Exception as exc:
            failed[e.name] = f"{type(exc).__name__}: {exc}"
    entries = {e.name: e for e in chosen}
    timed("start contenders", t0)

    workloads: dict[str, Any] = {}
    cursors: dict[str, int] = {}
    for name in args.workloads:
        part = {n: c for n, c in contenders.items() if (name != "mixed" or c.writes)}
        t0 = time.perf_counter()
        progress.phase(f"workload {name}: prewarm")
        groups, history = prewarm_keys(streams[name])
        for n, c in part.items():
            if c.cached:
                t1 = time.perf_counter()
                try:
                    c.prewarm(groups, history)
                except Exception as exc:
                    failed.setdefault(n, f"prewarm: {type(exc).__name__}: {exc}")
                progress.advance(min(time.perf_counter() - t1, prewarm_guess), n)
        part = {n: c for n, c in part.items() if n not in failed}
        turn_notes = {}
        for n, c in part.items():  # the writers alone take turns in mixed: near_max_age per own running time
            if note := c.take_turns(len(part)):
                turn_notes[n] = note
        timed(f"{name} prewarm", t0)
        t0 = time.perf_counter()
        progress.phase(f"workload {name}")
        tallies = measure(name, streams[name], part, dims, pgss if pgss.available else None, progress)
        timed(f"{name} measure", t0)
        if name == SWEEP_WORKLOAD:
            cursors = {n: t.cursor for n, t in tallies.items()}
        workloads[name] = {"description": WORKLOAD_TEXT[name],
                           "prewarmed": {"latest_keys": sum(map(len, groups.values())), "histories": len(history)},
                           "rows": workload_rows(tallies, entries, pgss if pgss.available else None),
                           "turns": {"contenders": len(part), "notes": turn_notes}}
        for n, t in tallies.items():
            if t.error:
                failed.setdefault(n, t.error)

    memory: dict[str, Any] = {"ops": dims.memory_ops, "rows": []}
    if "chat" in streams:
        t0 = time.perf_counter()
        progress.phase("memory pass")
        live = {n: c for n, c in contenders.items() if n not in failed}
        memory["rows"] = memory_pass(live, streams["chat"], cursors, dims.memory_ops, progress)
        timed("memory", t0)

    sweep: dict[str, Any] = {"workload": SWEEP_WORKLOAD, "points": [], "rows": [], "note": ""}
    if not args.no_sweep and SWEEP_WORKLOAD in streams:
        from ._sweep import ProcessPool, sweep as run_sweep

        t0 = time.perf_counter()
        names = [n for n in sweep_names if n in contenders and n not in failed]
        progress.phase("concurrency sweep")
        sweep.update(run_sweep(
            contenders, names, streams[SWEEP_WORKLOAD], dims.sweep_threads, dims.sweep_processes, dims.sweep_s,
            lambda: ProcessPool(srv.dsn, srv.redis_url, spec, names, PREFIX, dims.sweep_processes,
                                min(0.3, dims.warmup_s), env.time_scale),
            lambda detail, s: progress.advance(s, detail),
            summarize_latency,
        ))
        sweep["note"] = (f"threads share one instance, each on its own part of the op stream; processes are spawned, "
                         f"each with its own instances on the same Redis namespaces (already warm); "
                         f"{dims.sweep_s:g} s per point in two interleaved halves; client, PostgreSQL and Redis share "
                         f"the machine's {os.cpu_count()} cores")
        timed("sweep", t0)

    tier_notes = _tier_notes(workloads) + _pgss_notes(workloads) + _sweep_notes(sweep)
    for c in contenders.values():
        with contextlib.suppress(Exception):
            c.close()
    pgss.close()
    if not (srv.owned_pg and srv.owned_redis):
        clean(srv.dsn, srv.redis_url)
    progress.close()
    load_after = os.getloadavg()

    import resource

    contender_list = []
    for e in ENTRIES:
        status = "ok" if e.name in contenders and e.name not in failed else "skipped" if e.name in skipped else (
            "failed" if e.name in failed else "not selected")
        contender_list.append({"name": e.name, "role": e.role, "floor": e.floor, "status": status,
                               "reason": skipped.get(e.name) or failed.get(e.name),
                               "note": contenders[e.name].note if e.name in contenders else ""})
    return {
        "schema": 1,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**_report.machine(), "load_average_1m": [round(load_before[0], 2), round(load_after[0], 2)]},
        "versions": _report.library_versions(),
        "servers": {**server_versions(srv.dsn, srv.redis_url), "owned": srv.owned_pg and srv.owned_redis},
        "workload": {**spec.describe(), **loaded, "workloads": {w: WORKLOAD_TEXT[w] for w in args.workloads}},
        "method": {
            "time_scale": (f"TieredCache's wall-clock windows (negative_ttl, near_max_age) are multiplied by the "
                           f"{env.time_scale:g} contenders taking turns, so per second of its own running time they "
                           f"are the defaults (near_max_age is reset per workload to the number taking turns in it: mixed has "
                           f"the writers only)"),
            "interleaving": (f"one process; caches are first prewarmed with every key the workload reads (steady "
                             f"state: latest entries by get_many per venue and app, histories one by one, untimed); "
                             f"then contenders take turns in {dims.slice_s * 1000:g} ms slices (the first one rotated "
                             f"each round) after {dims.warmup_s:g} s of warm-up each, until each had {dims.budget_s:g} s "
                             f"per workload; every contender walks the same seeded op stream"),
            "pg_queries": pg_method,
            "placement": (f"pinned: this process on CPU {pinned['client']}, PostgreSQL and Redis on {pinned['servers']} "
                          f"(bench/_pinning.py: a cross-core round trip costs ~3x a same-core one here, and left to "
                          f"the scheduler placement differed by contender)"
                          if (pinned := getattr(args, "pinned", None)) else "left to the scheduler (--no-pin, one CPU, or servers not ours)"),
            "cpu": "time.process_time() around each slice (all threads of this process), divided by ops",
            "memory": (f"tracemalloc while each contender runs up to {dims.memory_ops:,} more chat ops (at most 0.5 s), "
                       f"after the timed runs: peak and retained Python heap above the start"),
            "cashews": ("cashews is asyncio: it gets one event loop in a dedicated thread; each slice of ops runs as "
                        "one coroutine submitted with asyncio.run_coroutine_threadsafe, and per-op times are taken "
                        "inside the loop (so the thread hop, once per slice, is outside them)"),
            "ratios": "vs old = ops/s divided by the old service's; vs floor = the floor's ops/s divided by the "
                      "contender's, i.e. how many times the floor's time per op it takes",
        },
        "contenders": contender_list,
        "workloads": workloads,
        "memory": memory,
        "sweep": sweep,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "phase_seconds": phases,
        "notes": _notes(contender_list, dims, near_option()) + tier_notes,
    }


def _tier_notes(workloads: dict[str, Any]) -> list[str]:
    out = []
    for name, wl in workloads.items():
        for contender, note in wl.get("turns", {}).get("notes", {}).items():
            out.append(f"{name}: {contender}: {note}")
        for r in wl["rows"]:
            tc = r.get("tier_counters") or {}
            if tc.get("redis_errors") or tc.get("breaker_trips"):
                out.append(f"{name}: {r['contender']} saw {tc.get('redis_errors', 0)} Redis errors and "
                           f"{tc.get('breaker_trips', 0)} breaker trips (50 ms client timeout)")
            if tc.get("near_puts_skipped"):
                out.append(f"{name}: {r['contender']} skipped {tc['near_puts_skipped']:,} near-tier puts "
                           f"(an eviction happened while the read was in flight)")
            tried = [f"{tc.get(f'near_{what}_tried', 0):,} of "
                     f"{tc.get(f'near_{what}_tried', 0) + tc.get(f'near_{what}_skipped', 0):,} {label}"
                     for what, label in (("reads", "single reads"), ("pages", "pages"))
                     if tc.get(f"near_{what}_tried", 0) + tc.get(f"near_{what}_skipped", 0)]
            if tc.get("near_reads_skipped") or tc.get("near_pages_skipped"):
                out.append(f"{name}: {r['contender']}'s near-tier gates (policy/page_gate) tried " + ", ".join(tried))
            if r.get("error"):
                out.append(f"{name}: {r['contender']} stopped: {r['error']}")
    return out


def _sweep_notes(sweep: dict[str, Any]) -> list[str]:
    out = []
    for r in sweep.get("rows", []):
        if r.get("error"):
            out.append(f"sweep: {r['contender']} stopped: {r['error']}")
        for label, pt in r["points"].items():
            if pt.get("redis_errors"):
                out.append(f"sweep {label}: {r['contender']} saw {pt['redis_errors']:,} Redis errors (timeouts of the "
                           f"50 ms client; those reads fell back to PostgreSQL)")
    return out


def _pgss_notes(workloads: dict[str, Any]) -> list[str]:
    """Where pg_stat_statements disagrees with the client-side count, say so (and why, for the old service)."""
    out = []
    for name, wl in workloads.items():
        for r in wl["rows"]:
            client, server = r["pg_queries_per_1k"], r.get("pg_queries_server_per_1k")
            if server is None or client is None or abs(server - client) <= max(5.0, 0.05 * client):
                continue
            why = (" (its reads never commit: closing the connection aborts the transaction, and pg_stat_statements "
                   "records a statement only when its portal ends normally)" if r["role"] == "old" else "")
            out.append(f"{name}: pg_stat_statements saw {server:,.0f} statements per 1k ops from {r['contender']}, "
                       f"the client sent {client:,.0f}{why}")
    return out


def _notes(contenders: list[dict[str, Any]], dims: Any, near: str | None) -> list[str]:
    from ._contenders import NEAR_ENTRIES, PEER_TTL

    out = [
        "floors are the least each path can cost: the same bytes TieredCache stores, fetched by redis-py GET/MGET "
        "(same client settings) and decoded by orjson; a bare cachetools LRUCache lookup, with and without the "
        "orjson decode that a mutation-safe near cache needs; one pooled, prepared psycopg SELECT without row shaping",
        "the old service opens a new PostgreSQL connection per call, as delivered; its board page is one get_latest "
        "per target (it had no get_many); its writes also run the per-key retention DELETE",
        f"peers (dogpile.cache, cashews) load through the same PostgresStore, cache-aside with their default codec "
        f"(pickle) and a flat {PEER_TTL} s TTL, and delete their keys after each write; TieredCache writes through "
        f"under leases and expires each entry at its row's expires_at",
        "each cache contender has its own Redis namespace and sees its own writes only; all write the same table",
    ]
    if near:
        out.append(f"TieredCache near+redis: {near}={NEAR_ENTRIES:,}; the near tier pays off only when the hot set "
                   f"fits in it and is re-read within near_max_age; a working set larger than the tier costs a put "
                   f"per miss for few hits")
    for c in contenders:
        if c["status"] in ("skipped", "failed"):
            out.append(f"{c['name']}: {c['status']} — {c['reason']}")
        elif c["note"]:
            out.append(f"{c['name']}: {c['note']}")
    return out


if __name__ == "__main__":
    sys.exit(main())
