"""Codec cost: encode + decode of one ~1.5 KB Chinese-text row, as get_latest returns it.

orjson (what the Redis and near tiers use) against the standard json module, msgpack if it is
installed, and pickle, shown only as a reference point: pickle is not an option for a cache whose
bytes another process could have written (unpickling runs code). Interleaved rounds; medians.

    python -m tiered_cache.bench.codecs [--rounds 300] [--batch 200]
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson


def sample_row(target_bytes: int = 1500) -> dict[str, Any]:
    """A row shaped like get_latest's answer, its result_json grown or shrunk to about target_bytes encoded."""
    from ._workload import make_document

    rng = random.Random(7)
    doc = make_document(rng, "app3_clue")
    row = {
        "id": 1234567, "cache_type": "app3_clue", "site_id": 101, "target_id": "member-0101-00042",
        "result_json": doc, "score": 87, "triggered_by": "chat",
        "created_at": "2024-06-01T10:15:30.123456+08:00", "expires_at": "2024-06-08T10:15:30.123456+08:00",
        "status": "valid",
    }
    while len(orjson.dumps(row)) > target_bytes and len(doc["suggestions"]) > 1:
        doc["suggestions"].pop()
    while len(orjson.dumps(row)) < target_bytes - 60:
        doc["suggestions"].append("建议安排专属顾问跟进,可推送限时优惠提升到店频次。")
    return row


def codecs() -> dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any], str]]:
    """name -> (encode, decode, remark)."""
    out: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any], str]] = {
        "orjson": (orjson.dumps, orjson.loads, "used by tiered_cache (strict JSON, UTF-8)"),
        "json (ensure_ascii=False)": (lambda v: json.dumps(v, ensure_ascii=False).encode(), json.loads,
                                      "stdlib, the old service's setting"),
        "json (default)": (lambda v: json.dumps(v).encode(), json.loads, "stdlib, \\u escapes"),
    }
    try:
        import msgpack

        out["msgpack"] = (msgpack.packb, msgpack.unpackb, "binary; not readable by psql or redis-cli")
    except ImportError:
        out["msgpack"] = (None, None, "not installed")  # type: ignore[assignment]
    out["pickle (reference only)"] = (lambda v: pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL), pickle.loads,
                                      "unsafe: unpickling runs code; never used")
    return out


def measure(row: dict[str, Any], rounds: int, batch: int) -> list[dict[str, Any]]:
    table = {name: c for name, c in codecs().items() if c[0] is not None}
    for name, (enc, dec, _) in table.items():  # every codec must round-trip the row exactly
        assert dec(enc(row)) == row, name
    enc_s: dict[str, list[float]] = {n: [] for n in table}
    dec_s: dict[str, list[float]] = {n: [] for n in table}
    pc = time.perf_counter
    names = list(table)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            enc, dec, _ = table[name]
            t0 = pc()
            for _ in range(batch):
                enc(row)
            t1 = pc()
            blob = enc(row)
            t2 = pc()
            for _ in range(batch):
                dec(blob)
            t3 = pc()
            enc_s[name].append((t1 - t0) / batch)
            dec_s[name].append((t3 - t2) / batch)
    rows = []
    for name in names:
        e, d = statistics.median(enc_s[name]) * 1e6, statistics.median(dec_s[name]) * 1e6
        rows.append({"codec": name, "bytes": len(table[name][0](row)), "encode_us": e, "decode_us": d,
                     "total_us": e + d, "remark": table[name][2]})
    base = next(r["total_us"] for r in rows if r["codec"] == "orjson")
    for r in rows:
        r["vs_orjson"] = r["total_us"] / base
    for name, c in codecs().items():
        if c[0] is None:
            rows.append({"codec": name, "bytes": None, "encode_us": None, "decode_us": None, "total_us": None,
                         "vs_orjson": None, "remark": c[2]})
    return rows


def render(rows: list[dict[str, Any]], row_bytes: int, rounds: int, batch: int) -> str:
    head = ["codec", "bytes", "encode µs", "decode µs", "enc+dec µs", "vs orjson", "remark"]
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    body = [[r["codec"], f(r["bytes"], ","), f(r["encode_us"], ".2f"), f(r["decode_us"], ".2f"), f(r["total_us"], ".2f"),
             "-" if r["vs_orjson"] is None else f"{r['vs_orjson']:.1f}x", r["remark"]] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join(l.rstrip() for l in [f"codec cost of one {row_bytes:,}-byte row (orjson size), Chinese text; {rounds} rounds x {batch}, "
                      f"medians", line(head), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tiered_cache.bench.codecs", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    row = sample_row()
    rows = measure(row, args.rounds, args.batch)
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render(rows, len(orjson.dumps(row)), args.rounds, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
