"""How cost grows with the table: `tiered-cache bench --scale` (python -m bench.scale).

At each size of biz.ai_cache (10k and 1M rows by default; 10M with --sizes 10k,1m,10m) it measures the
miss path (PostgresStore.get_latest of a random key, get_many of 50 random targets of one venue),
TieredCache.get_many(N) Redis hits for N = 1, 10, 50, 200, 1000, and sweep() after 1,000 written rows
of which a tenth expired (the second such round: a group's first pass counts it whole), with EXPLAIN
(ANALYZE, BUFFERS) of one get_many(50) miss. Rows are loaded with COPY (about 300 B each) and ANALYZEd; every figure is the
median of repeated calls in one process, so the sizes are compared under the same conditions. Prints a
table and writes bench/results/scale.md, scale.json and (with matplotlib) a log-log chart, scale.png.
Per-op cost should stay flat as the table grows: the reads are index probes, sweep visits only groups
written since its last pass.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import psycopg

SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000, "10m": 10_000_000}
CT = "app3_clue"
SITES = 200
HOT_SITE = 10_000
MANY = (1, 10, 50, 200, 1000)
RESULTS = Path(__file__).resolve().parent / "results"


def _median_us(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000


def load_to(dsn: str, rows: int, have: int) -> None:
    """Grow biz.ai_cache from `have` to `rows` rows with COPY: SITES venues, one row per target."""
    if rows <= have:
        return
    doc = orjson.dumps({"summary": "会员最近到店 3 次，偏好晚间时段" * 6}).decode()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # bulk load: no outbox rows, no dirty groups
        with conn.cursor().copy("COPY biz.ai_cache (cache_type, site_id, target_id, result_json, status,"
                                " expires_at) FROM STDIN") as copy:
            buf = io.StringIO()
            for i in range(have, rows):
                site, target = i % SITES, i // SITES
                buf.write(f"{CT}\t{site}\tt{target}\t{doc}\tvalid\t2099-01-01 00:00:00+00\n")
                if buf.tell() > 1 << 20:
                    copy.write(buf.getvalue())
                    buf = io.StringIO()
            if have == 0:  # the venue the hit-path figures read: 1,000 targets, whatever the table's size
                for t in range(max(MANY)):
                    buf.write(f"{CT}\t{HOT_SITE}\th{t}\t{doc}\tvalid\t2099-01-01 00:00:00+00\n")
            copy.write(buf.getvalue())
        conn.execute("ANALYZE biz.ai_cache")
        conn.execute("CHECKPOINT")


def measure(dsn: str, url: str, rows: int, rng: random.Random) -> dict[str, Any]:
    from tiered_cache import PostgresStore, TieredCache, redis_client

    per_site = rows // SITES
    out: dict[str, Any] = {"rows": rows}
    with PostgresStore(dsn) as store:
        def key() -> tuple[str, int, str]:
            return CT, rng.randrange(SITES), f"t{rng.randrange(per_site)}"

        out["miss get_latest"] = _median_us(lambda: store.get_latest(*key()), 2000)
        out["miss get_many(50)"] = _median_us(
            lambda: store.get_many(CT, rng.randrange(SITES), [f"t{rng.randrange(per_site)}" for _ in range(50)]), 300)
        cache = TieredCache(store, redis_client(url, timeout=1.0), namespace=f"scale{rows}")
        try:
            site = HOT_SITE
            targets = [f"h{i}" for i in range(max(MANY))]
            cache.get_many(CT, site, targets)  # fills Redis: what follows are hits
            for n in MANY:
                ids = targets[:n]
                cache.get_many(CT, site, ids)
                out[f"hit get_many({n})"] = _median_us(lambda ids=ids: cache.get_many(CT, site, ids), 300 if n < 200 else 60)
            # sweep after 1,000 written rows, a tenth of them already expired: the second such round, timed (the
            # first pass over a group counts it whole and trims what the bulk load put beyond retention)
            from datetime import datetime, timedelta, timezone

            past = datetime.now(timezone.utc) - timedelta(seconds=1)
            for round_ in ("first", "timed"):
                for i in range(1000):
                    store.write_cache(CT, i % SITES, f"w{rows}-{round_}-{i}", {"v": i},
                                      expires_at=past if i % 10 == 0 else None)
                t0 = time.perf_counter()
                report = store.sweep()
                out[f"sweep {round_} pass"] = (time.perf_counter() - t0) * 1e6
            out["sweep per 1k written"] = out.pop("sweep timed pass")
            out["sweep expired"] = report.expired
            out["explain miss get_many(50)"] = explain_many(dsn, rng, per_site)
        finally:
            cache.close()
    return out


def explain_many(dsn: str, rng: random.Random, per_site: int) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of one get_many(50) miss, summed: where its time goes (cache hits or reads)."""
    from tiered_cache.tiers import _sql

    params = {"cache_type": CT, "site_id": rng.randrange(SITES),
              "target_ids": [f"t{rng.randrange(per_site)}" for _ in range(50)]}
    with psycopg.connect(dsn, autocommit=True) as conn:
        plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + _sql.GET_MANY, params).fetchone()[0][0]
    top = plan["Plan"]
    return (f"{plan['Execution Time']:.2f} ms, shared buffers hit {top.get('Shared Hit Blocks', 0)}, "
            f"read {top.get('Shared Read Blocks', 0)}")


def render(results: list[dict[str, float]]) -> str:
    cols = ["miss get_latest", "miss get_many(50)"] + [f"hit get_many({n})" for n in MANY] + ["sweep per 1k written"]
    lines = ["| rows | " + " | ".join(f"{c} µs" for c in cols) + " |", "|---:|" + "---:|" * len(cols)]
    for r in results:
        cells = [f"{r[c]:,.0f}" if c in r else "-" for c in cols]
        lines.append(f"| {int(r['rows']):,} | " + " | ".join(cells) + " |")
    base = results[0]
    lines.append("")
    lines += [f"- {int(r['rows']):,} rows: first sweep pass after the load {r['sweep first pass'] / 1e3:,.0f} ms; "
              f"one get_many(50) miss: {r['explain miss get_many(50)']}" for r in results if "sweep first pass" in r]
    lines.append("")
    lines.append("growth from the smallest size (x): " + "; ".join(
        f"{c}: " + ", ".join(f"{r[c] / base[c]:.2f}" for r in results[1:] if c in r and c in base)
        for c in cols))
    return "\n".join(lines)


def chart(results: list[dict[str, float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for c in ["miss get_latest", "miss get_many(50)"] + [f"hit get_many({n})" for n in MANY] + ["sweep per 1k written"]:
        pts = [(r["rows"], r[c]) for r in results if c in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=c)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows in biz.ai_cache")
    ax.set_ylabel("median µs per call")
    ax.set_title("tiered_cache: cost per operation as the table grows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tiered-cache bench --scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10k,1m", help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--dsn")
    p.add_argument("--redis-url")
    args = p.parse_args(argv)
    sizes = sorted(SIZES[s.strip().lower()] for s in args.sizes.split(","))
    import os

    from tiered_cache import migrate

    from .run import servers

    if args.dsn:
        os.environ["TIERED_CACHE_DSN"] = args.dsn
    if args.redis_url:
        os.environ["TIERED_CACHE_REDIS_URL"] = args.redis_url
    results = []
    rng = random.Random(5)
    with servers() as srv:
        migrate(srv.dsn)
        have = 0
        for rows in sizes:
            t0 = time.perf_counter()
            load_to(srv.dsn, rows, have)
            have = rows
            print(f"loaded {rows:,} rows in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            results.append(measure(srv.dsn, srv.redis_url, rows, rng))
    text = render(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.md").write_text(text + "\n", encoding="utf-8")
    (args.out / "scale.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    chart(results, args.out / "scale.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
