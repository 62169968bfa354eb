"""Hit-path micro-benchmark: what TieredCache adds on top of the bare Redis round trip and decode.

`get_latest` and `get_many(50)` served from Redis, against redis-py GET / MGET + orjson.loads of the
very same keys (the bytes the cache stored) on the very same client. The paths alternate within
every round; each figure is the median over rounds, and the ratio is the median of the per-round
ratios, so drift cancels. With the near tier available, its hit is compared with a bare cachetools
lookup plus the orjson decode a mutation-safe near cache needs.

Page bodies: a board page of 50 as the JSON bytes a handler sends. TieredCache builds it from
get_many_json's bytes (one orjson.dumps with orjson.Fragment); the decoding floor is MGET + orjson.loads
+ orjson.dumps of the page, the passthrough floor MGET + the bytes joined (keys encoded before timing).

    python -m tiered_cache.bench.micro [--rounds 200] [--batch 200]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

SITE = 9_999_001
APP = "app3_clue"


def _timed(fn: Callable[[], Any], n: int) -> float:
    """Seconds per call of fn over n calls."""
    pc = time.perf_counter
    t0 = pc()
    for _ in range(n):
        fn()
    return (pc() - t0) / n


def paths(cache: Any, near_cache: Any | None, targets: list[str]) -> dict[str, tuple[Callable[[], Any], Callable[[], Any], int]]:
    """name -> (library call, floor call, calls per round divisor); both sides read identical keys and bytes."""
    from cachetools import LRUCache

    client = cache.redis.client  # the very client (and pool) TieredCache uses
    if getattr(cache.redis, "cluster", False):  # a cluster's floor for many keys: redis-py's own per-slot MGET
        client = _ClusterFloor(client)
    one = targets[0]
    key = cache.keys.entry(APP, SITE, one)
    many = targets[:50]
    keys = [cache.keys.entry(APP, SITE, t) for t in many]
    loads, dumps, fragment = orjson.loads, orjson.dumps, orjson.Fragment
    members = [orjson.dumps(t) + b":" for t in many]

    def decoded_page(raws: list[bytes]) -> bytes:
        return dumps(dict(zip(many, [loads(r) for r in raws])))

    def joined_page(raws: list[bytes]) -> bytes:
        return b"{" + b",".join([m + r for m, r in zip(members, raws)]) + b"}"

    def fragment_page(page: dict[str, bytes | None]) -> bytes:
        return dumps({t: None if raw is None else fragment(raw) for t, raw in page.items()})

    out: dict[str, tuple[Callable[[], Any], Callable[[], Any], int]] = {
        "get_latest (Redis hit)": (
            lambda: cache.get_latest(APP, SITE, one),
            lambda: loads(client.get(key)),
            1,
        ),
        "get_many(50) (Redis hits)": (
            lambda: cache.get_many(APP, SITE, many),
            lambda: [loads(r) for r in client.mget(keys)],
            10,
        ),
        "page body: get_many(50) + dumps (Redis) vs decoding floor": (
            lambda: dumps(cache.get_many(APP, SITE, many)),
            lambda: decoded_page(client.mget(keys)),
            10,
        ),
        "page body: get_many_json(50) (Redis) vs decoding floor": (
            lambda: fragment_page(cache.get_many_json(APP, SITE, many)),
            lambda: decoded_page(client.mget(keys)),
            10,
        ),
        "page body: get_many_json(50) (Redis) vs passthrough floor": (
            lambda: fragment_page(cache.get_many_json(APP, SITE, many)),
            lambda: joined_page(client.mget(keys)),
            10,
        ),
    }
    if near_cache is not None:
        lru: LRUCache[str, bytes] = LRUCache(maxsize=len(targets))
        for t in targets:
            lru[cache.keys.entry(APP, SITE, t)] = client.get(cache.keys.entry(APP, SITE, t))
        near_cache.get_latest(APP, SITE, one)
        out["get_latest (near hit)"] = (
            lambda: near_cache.get_latest(APP, SITE, one),
            lambda: loads(lru[key]),
            1,
        )
        near_cache.get_many(APP, SITE, many)
        out["page body: get_many_json(50) (near) vs cachetools + decoding"] = (
            lambda: fragment_page(near_cache.get_many_json(APP, SITE, many)),
            lambda: decoded_page([lru[k] for k in keys]),
            10,
        )
        out["page body: get_many_json(50) (near) vs cachetools + join"] = (
            lambda: fragment_page(near_cache.get_many_json(APP, SITE, many)),
            lambda: joined_page([lru[k] for k in keys]),
            10,
        )
    return out


def measure(tests: dict[str, tuple[Callable[[], Any], Callable[[], Any], int]], rounds: int, batch: int,
            progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Alternate library and floor within every round (order flipped each round); medians over rounds."""
    samples: dict[str, dict[str, list[float]]] = {name: {"lib": [], "floor": [], "ratio": []} for name in tests}
    for fn_lib, fn_floor, _ in tests.values():  # warm both paths (connections, caches, branch predictors)
        _timed(fn_lib, 50)
        _timed(fn_floor, 50)
    for r in range(rounds):
        for name, (fn_lib, fn_floor, div) in tests.items():
            n = max(1, batch // div)
            if r % 2:
                floor = _timed(fn_floor, n)
                lib = _timed(fn_lib, n)
            else:
                lib = _timed(fn_lib, n)
                floor = _timed(fn_floor, n)
            s = samples[name]
            s["lib"].append(lib)
            s["floor"].append(floor)
            s["ratio"].append(lib / floor)
        if progress:
            progress(r + 1)
    rows = []
    for name, s in samples.items():
        rows.append({
            "path": name,
            "library_us": statistics.median(s["lib"]) * 1e6,
            "floor_us": statistics.median(s["floor"]) * 1e6,
            "ratio": statistics.median(s["ratio"]),
            "ratio_p10": _quantile(s["ratio"], 0.1),
            "ratio_p90": _quantile(s["ratio"], 0.9),
            "overhead_us": (statistics.median(s["lib"]) - statistics.median(s["floor"])) * 1e6,
        })
    return rows


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class _ClusterFloor:
    """The floor client on a cluster: GET as is, MGET as redis-py's mget_nonatomic (one pipeline per node)."""

    def __init__(self, client: Any) -> None:
        self.get, self.mget = client.get, client.mget_nonatomic


def setup(dsn: str, url: str, n_targets: int = 60) -> tuple[Any, Any | None, list[str]]:
    """Write n_targets rows through TieredCache (write-through fills Redis); a near+redis twin if the option exists."""
    from tiered_cache import TieredCache, migrate

    from ._workload import document_pool

    migrate(dsn)
    docs = document_pool(1)
    cache = TieredCache.connect(dsn, url, namespace="tcbench-micro")
    targets = [f"member-micro-{i:04d}" for i in range(n_targets)]
    for i, t in enumerate(targets):
        cache.write_cache(APP, SITE, t, docs[i % len(docs)], "bench-micro", 80)
    cache.get_many(APP, SITE, targets)  # every entry now in Redis
    params = inspect.signature(TieredCache).parameters
    near_cache = None
    option = next((p for p in ("near_max_entries", "near_maxsize", "near") if p in params), None)
    if option:
        extra = {"near_max_age": 3600.0} if "near_max_age" in params else {}
        near_cache = TieredCache.connect(dsn, url, namespace="tcbench-micro", **{option: 10_000}, **extra)
        if near_cache.listener is not None:
            near_cache.listener.subscribed.wait(5)
    return cache, near_cache, targets


def cleanup(dsn: str, cache: Any) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM biz.ai_cache WHERE site_id = %s", (SITE,))
        conn.execute("DELETE FROM biz.ai_cache_changes WHERE site_id = %s", (SITE,))
    client = cache.redis.client
    keys = list(client.scan_iter(match="tcbench-micro:*", count=1000))
    if keys:
        client.unlink(*keys)


def render(rows: list[dict[str, Any]], rounds: int, batch: int) -> str:
    head = ["path", "TieredCache µs", "floor µs", "ratio (median of rounds)", "p10-p90", "overhead µs"]
    body = [[r["path"], f"{r['library_us']:.1f}", f"{r['floor_us']:.1f}", f"{r['ratio']:.2f}x",
             f"{r['ratio_p10']:.2f}-{r['ratio_p90']:.2f}", f"{r['overhead_us']:.1f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    floors = ("floors: redis-py GET / MGET on the same client + orjson.loads of the same bytes; "
              "near: cachetools LRUCache lookup + orjson.loads; page bodies: see the module docstring")
    return "\n".join([f"hit-path micro-benchmark: {rounds} rounds x {batch} calls (get_many: {batch // 10}), interleaved",
                      floors, line(head), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tiered_cache.bench.micro", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=200, help="rounds (each runs every path and its floor)")
    p.add_argument("--batch", type=int, default=200, help="calls per path per round (get_many: a tenth)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--redis-url", help="a Redis, redis+cluster:// or redis+sentinel:// URL (default: a throwaway server)")
    args = p.parse_args(argv)
    if args.redis_url:
        import os

        os.environ["TIERED_CACHE_REDIS_URL"] = args.redis_url
    from tiered_cache.testing import embedded_servers

    with embedded_servers() as (dsn, url):
        cache, near_cache, targets = setup(dsn, url)
        try:
            def tick(done: int) -> None:
                if sys.stderr.isatty():
                    sys.stderr.write(f"\r  round {done}/{args.rounds}")
                    sys.stderr.flush()

            rows = measure(paths(cache, near_cache, targets), args.rounds, args.batch, tick)
            if sys.stderr.isatty():
                sys.stderr.write("\r" + " " * 30 + "\r")
        finally:
            cleanup(dsn, cache)
            if near_cache is not None:
                near_cache.close()
            cache.close()
    print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() if args.json else render(rows, args.rounds, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
