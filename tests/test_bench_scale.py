"""bench/scale.py at a tiny size on the suite's servers: every figure present and the data as loaded (no timing)."""

from __future__ import annotations

import random

import psycopg

from bench import scale


def test_scale_bench_loads_measures_and_renders(dsn: str, redis_url: str) -> None:
    scale.load_to(dsn, 2_000, 0)
    scale.load_to(dsn, 4_000, 2_000)
    with psycopg.connect(dsn) as conn:
        count, hot = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE site_id = %s) FROM biz.ai_cache", (scale.HOT_SITE,)).fetchone()
    assert (count, hot) == (4_000 + max(scale.MANY), max(scale.MANY))
    out = scale.measure(dsn, redis_url, 4_000, random.Random(1))
    for name in ["miss get_latest", "miss get_many(50)", "sweep per 1k written",
                 *[f"hit get_many({n})" for n in scale.MANY]]:
        assert out[name] > 0, name
    assert out["sweep expired"] == 100  # a tenth of the 1,000 written rows had expired
    assert out["sweep first pass"] > 0 and "shared buffers hit" in out["explain miss get_many(50)"]
    text = scale.render([out, {**out, "rows": 8_000}])
    assert "| 4,000 |" in text and "growth from the smallest size" in text
