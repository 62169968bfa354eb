"""The benchmark's output shape on the test-owned servers; nothing here asserts a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tiered_cache.bench import _workload
from tiered_cache.bench._contenders import ENTRIES

TOP_KEYS = {"schema", "generated_at", "machine", "versions", "servers", "workload", "method", "contenders",
            "workloads", "memory", "sweep", "notes", "phase_seconds"}
ROW_KEYS = {"contender", "role", "ops", "ops_per_s", "keys_per_s", "p50_us", "p99_us", "p999_us",
            "pg_queries_per_1k", "hit_ratio", "near_hit_ratio", "redis_hit_ratio", "cpu_us_per_op", "vs_old", "vs_floor"}
MUST_RUN = {"old service (connection per call)", "PostgresStore (pooled)", "TieredCache redis",
            "floor: redis GET/MGET + orjson", "floor: cachetools get + orjson copy", "floor: pooled psycopg SELECT"}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dogpile's setex, cashews' close: the peers', not ours
def test_tiny_run_writes_every_output(dsn: str, redis_url: str, tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """A tiny run prints the table and writes results.json, results.md and a PNG chart naming every contender."""
    from tiered_cache.bench import main

    monkeypatch.setenv("TIERED_CACHE_DSN", dsn)
    monkeypatch.setenv("TIERED_CACHE_REDIS_URL", redis_url)
    assert main(["--size", "tiny", "--out", str(tmp_path), "--no-progress"]) == 0

    out = capsys.readouterr().out
    assert out.startswith("tiered_cache benchmark\nmachine: ")
    assert "== chat:" in out and "== board:" in out and "== mixed:" in out and "== concurrency sweep" in out

    result = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert TOP_KEYS <= set(result)
    assert {"cpu", "cores", "ram_gib", "python"} <= set(result["machine"])
    assert {"postgresql", "redis"} <= set(result["servers"])
    assert result["workload"]["size"] == "tiny" and result["workload"]["rows_loaded"] > 0

    listed = {c["name"]: c for c in result["contenders"]}
    assert set(listed) == {e.name for e in ENTRIES}
    assert all(c["status"] in ("ok", "skipped") for c in listed.values()), listed
    for name in MUST_RUN:
        assert listed[name]["status"] == "ok", listed[name]
    ran = {n for n, c in listed.items() if c["status"] == "ok"}
    writers = {e.name for e in ENTRIES if e.cls.writes}

    assert set(result["workloads"]) == {"chat", "board", "mixed"}
    for workload, data in result["workloads"].items():
        rows = {r["contender"]: r for r in data["rows"]}
        assert set(rows) == (ran & writers if workload == "mixed" else ran), workload
        for r in rows.values():
            assert ROW_KEYS <= set(r) and r["error"] is None, r
            assert r["ops"] > 0
        assert rows["old service (connection per call)"]["vs_old"] == pytest.approx(1.0)
        assert rows["TieredCache redis"]["hit_ratio"] is not None
        if workload != "mixed":
            assert rows["TieredCache redis"]["vs_floor"] is not None
            assert rows["PostgresStore (pooled)"]["pg_queries_per_1k"] == pytest.approx(1000)

    assert {r["contender"] for r in result["memory"]["rows"]} == ran
    sweep = result["sweep"]
    assert sweep["points"] == ["1 thread", "4 threads", "2 processes"]
    assert {r["contender"] for r in sweep["rows"]} == {e.name for e in ENTRIES if e.sweep} & ran
    for r in sweep["rows"]:
        assert r["error"] is None and set(r["points"]) == set(sweep["points"]), r

    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert md.startswith("# tiered_cache benchmark")
    for workload in ("chat", "board", "mixed"):
        section = md.split(f"## {workload}:")[1].split("\n## ")[0]
        for name in result["workloads"][workload]["rows"]:
            assert f"| {name['contender']} |" in section
    png = (tmp_path / "chart.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_runs_report_each_figures_spread(dsn: str, redis_url: str, tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """--runs 2 keeps both runs and writes spread.md/json: per contender a median within its min-max, from both."""
    from tiered_cache.bench import main

    monkeypatch.setenv("TIERED_CACHE_DSN", dsn)
    monkeypatch.setenv("TIERED_CACHE_REDIS_URL", redis_url)
    assert main(["--size", "tiny", "--out", str(tmp_path), "--no-progress", "--no-sweep", "--only", "tiered",
                 "--workloads", "board", "--runs", "2"]) == 0
    runs = [json.loads((tmp_path / f"run-{i}" / "results.json").read_text(encoding="utf-8")) for i in (1, 2)]
    spread = json.loads((tmp_path / "spread.json").read_text(encoding="utf-8"))
    for name, stats in spread["board"]["contenders"].items():
        each = [next(r["ops_per_s"] for r in run["workloads"]["board"]["rows"] if r["contender"] == name) for run in runs]
        ops = stats["ops_per_s"]
        assert (ops["min"], ops["max"]) == (min(each), max(each)) and ops["min"] <= ops["median"] <= ops["max"], name
    near_vs_redis = spread["board"]["near_vs_redis_ops"]
    assert near_vs_redis is not None and near_vs_redis["min"] <= near_vs_redis["median"] <= near_vs_redis["max"]
    assert "near + Redis ops/s over Redis alone's" in (tmp_path / "spread.md").read_text(encoding="utf-8")


def test_importing_the_package_loads_no_benchmark_code() -> None:
    """`import tiered_cache.bench` stays cheap: the runner and its dependencies load only in main()."""
    code = ("import sys, tiered_cache.bench; "
            "print(sorted(m for m in sys.modules if m.startswith('tiered_cache.bench.') or m in ('matplotlib', 'cashews', 'dogpile')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_workload_is_reproducible_from_its_seed() -> None:
    """The same spec gives the same rows and op streams; another seed gives others."""
    from datetime import datetime, timezone

    from tiered_cache import ExpiryPolicy

    now = datetime(2024, 6, 1, 4, 0, tzinfo=timezone.utc)
    policy = ExpiryPolicy()

    def draw(seed: int) -> tuple[list, list, list, list]:
        spec = _workload.WorkloadSpec(size="tiny", seed=seed)
        ks = _workload.Keyspace(spec)
        return (list(_workload.rows_to_load(spec, ks, now, policy.expires_at)), _workload.chat_stream(spec, ks),
                _workload.board_stream(spec, ks), _workload.mixed_stream(spec, ks))

    first, again, other = draw(1), draw(1), draw(2)
    assert first == again
    assert first[1] != other[1]
    rows, chat, board, mixed = first
    assert all(1000 <= len(r[3].encode()) <= 2100 for r in rows if r[8] != "generating")
    assert {op[0] for op in chat} == {"L", "H"}
    assert all(20 <= len(op[3]) <= 40 and len(set(op[3])) == len(op[3]) for op in board)  # tiny has 40 targets
    assert {"W", "G", "F", "I", "L", "M"} <= {op[0] for op in mixed}
    generated = {i for i, op in enumerate(mixed) if op[0] == "G"}
    assert all(op[4][0] in generated and op[4][0] < i for i, op in enumerate(mixed) if op[0] == "F")


def test_codec_table_has_every_codec() -> None:
    """bench/codecs.py measures orjson, both json settings and pickle (msgpack when installed), round-tripping the row."""
    from tiered_cache.bench import codecs

    row = codecs.sample_row()
    rows = codecs.measure(row, rounds=2, batch=3)
    names = {r["codec"] for r in rows}
    assert {"orjson", "json (ensure_ascii=False)", "json (default)", "msgpack", "pickle (reference only)"} == names
    assert next(r for r in rows if r["codec"] == "orjson")["vs_orjson"] == pytest.approx(1.0)
    assert "Chinese" in codecs.render(rows, 1500, 2, 3)


def test_micro_benchmark_compares_each_hit_path_with_its_floor(dsn: str, redis_url: str) -> None:
    """The micro-benchmark reads the same keys through TieredCache and bare redis-py + orjson (page bodies: same bytes)."""
    from tiered_cache.bench import micro

    cache, near_cache, targets = micro.setup(dsn, redis_url, n_targets=50)
    try:
        tests = micro.paths(cache, near_cache, targets)
        for path, (fn_lib, fn_floor, _) in tests.items():
            got = fn_lib()
            if path.startswith("get_many"):  # a dict by target; the floor's MGET a list in the same order
                got = list(got.values())
            assert got == fn_floor(), path
        rows = micro.measure(tests, rounds=3, batch=10)
    finally:
        micro.cleanup(dsn, cache)
        if near_cache is not None:
            near_cache.close()
        cache.close()
    assert {"get_latest (Redis hit)", "get_many(50) (Redis hits)",
            "page body: get_many_json(50) (Redis) vs decoding floor",
            "page body: get_many_json(50) (near) vs cachetools + join"} <= {r["path"] for r in rows}
    assert all(r["ratio"] > 0 for r in rows)
    assert "ratio" in micro.render(rows, 3, 10)


def test_write_benchmark_compares_the_store_and_the_cache_with_a_pooled_insert(dsn: str, redis_url: str) -> None:
    """bench.wmicro: three contenders write the same rows; each one's id holds its document; a table comes out."""
    from tiered_cache.bench import wmicro

    bench = wmicro.Bench(dsn, redis_url, n_targets=5)
    try:
        written = bench.verify()
        assert set(written) == set(wmicro.CONTENDERS) and len(set(written.values())) == 3
        calls = bench.calls()
        ids = [calls[name]() for name in wmicro.CONTENDERS for _ in range(2)]
        assert ids == sorted(ids)  # each call inserted a new row
        run = wmicro.measure(calls, rounds=3, batch=2)
        with psycopg.connect(dsn, autocommit=True) as conn:
            count = conn.execute("SELECT count(*) FROM biz.ai_cache WHERE site_id = %s", (wmicro.SITE,)).fetchone()[0]  # type: ignore[index]
        assert count == 3 + 6 + 3 * (20 + 3 * 2)  # verify, the calls above, warm-up and rounds of every contender
    finally:
        bench.close()
    assert set(run) == set(wmicro.CONTENDERS) and run[wmicro.FLOOR]["ratio"] == 1.0
    assert all(r["p99_us"] >= r["p50_us"] > 0 for r in run.values())
    rows = wmicro.summarize([run, run])
    text = wmicro.render(rows, 3, 2, 2)
    assert all(name in text for name in wmicro.CONTENDERS) and "p50 ratio" in text


def test_listener_benchmark_counts_the_listener_threads_cpu_per_announcement_for_each_gather(
        dsn: str, redis_url: str) -> None:
    """bench.lmicro: another process publishes; the listener applies them under both settings; a table comes out."""
    from tiered_cache.bench import lmicro

    per_msg = lmicro.measure(dsn, redis_url, rate=200, seconds=0.5, runs=1)
    assert len(per_msg) == 2 and 0.0 in per_msg and all(len(v) == 1 and v[0] >= 0 for v in per_msg.values())
    text = lmicro.render(per_msg, 200, 0.5)
    assert "gather=0 s" in text and "gather=0.02 s" in text
