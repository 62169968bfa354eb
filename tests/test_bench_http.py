"""`bench --http`: its output shape and answers on the test-owned servers, and its stale-read rule; no time asserted."""

from __future__ import annotations

import json

import pytest

from tiered_cache.bench._loadgen import ENDPOINTS, StaleCheck

BACKENDS = ["store", "redis", "near"]


@pytest.mark.slow
def test_tiny_http_bench_serves_every_backend_without_errors_or_stale_reads(  # type: ignore[no-untyped-def]
        dsn: str, redis_url: str, tmp_path, capsys, monkeypatch) -> None:
    """`bench --http --tiny`: each backend answers every endpoint under load, no error, no stale read, costs counted."""
    from tiered_cache.bench import main

    monkeypatch.setenv("TIERED_CACHE_DSN", dsn)
    monkeypatch.setenv("TIERED_CACHE_REDIS_URL", redis_url)
    assert main(["--http", "--tiny", "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "http.json").read_text()) == result
    assert "| AsyncTieredCache, near + Redis (10,000 entries) |" in (tmp_path / "http.md").read_text()

    (run,) = result["runs"]
    assert [r["backend"] for r in run] == BACKENDS == [s["backend"] for s in result["summary"]]
    for r in run:
        assert r["errors"] == 0, r["error_examples"]
        assert r["stale_reads"] == 0, r["stale_examples"]
        assert r["reads_checked"] > 0 and r["requests"] > 0 and r["req_per_s"] > 0, r
        assert sorted(r["endpoints"]) == sorted(ENDPOINTS)
        for name in ("board", "chat"):  # the mix's 95% of reads are always there in 2 s
            e = r["endpoints"][name]
            assert e["requests"] > 0 and 0 < e["p50_ms"] <= e["p99_ms"], (r["backend"], name, e)
        assert sum(r["connections_per_worker"]) == 16 and len(r["connections_per_worker"]) == 2, r
        cpu = r["cpu_ms_per_request"]
        assert cpu["app"] > 0 and cpu["loadgen"] > 0 and cpu["server"] >= cpu["app"], cpu
        assert r["pg_xacts_per_1k"] > 0  # the store reads PostgreSQL; the cache's relays poll it
    assert run[0]["cpu_ms_per_request"]["pg"] > 0  # every store request is a PostgreSQL query
    assert run[0]["vs_store"]["req_per_s"] == 1.0
    assert run[2]["stale_bound_s"] > 0 and run[1]["stale_bound_s"] == run[0]["stale_bound_s"] == 0


def test_stale_check_counts_an_older_state_and_spares_newer_ones() -> None:
    """After a write's reply, an older row is stale, the same or a newer one is not; within the bound it is counted apart."""
    check = StaleCheck(floor_id=100, bound=0.0)
    key = ("app3_clue", 9_000_000, "member-1")
    check.read(key, 0.5, 0.6, 7)  # before any mutation of ours: nothing to hold it against
    check.wrote(key, 150, done_at=1.0)
    check.read(key, 0.9, 1.1, 90)  # began before the reply arrived: not held against it
    check.read(key, 1.2, 1.3, 150)
    check.read(key, 1.2, 1.3, 151)  # a newer write in flight
    assert (check.checked, check.stale) == (2, 0)
    check.read(key, 1.2, 1.3, 90)
    check.read(key, 1.2, 1.3, None)  # null with no invalidation begun
    assert check.stale == 2

    max_before = check.invalidating(key, started_at=2.0)
    assert max_before == 150
    check.read(key, 2.1, 2.2, None)  # the invalidation is in flight: null may already show
    check.invalidated(key, max_before, done_at=2.5)
    check.read(key, 2.6, 2.7, None)
    check.read(key, 2.6, 2.7, 160)  # written after the invalidation
    assert check.stale == 2
    check.read(key, 2.6, 2.7, 150)  # a retired row
    assert check.stale == 3

    near = StaleCheck(floor_id=100, bound=2.0)
    near.wrote(key, 150, done_at=1.0)
    near.wrote(key, 170, done_at=3.0)
    near.read(key, 4.0, 4.1, 150)  # older than the state at 4.0, not than the state at 2.0: within the bound
    near.read(key, 5.5, 5.6, 150)  # older than the state 2 s before it began: beyond the bound
    assert (near.stale_within_bound, near.stale) == (1, 1)
