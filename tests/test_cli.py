"""The `tiered-cache` command against the test-owned servers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import psycopg
import pytest
import redis

from tiered_cache import AsyncTieredCache, TieredCache
from tiered_cache.cli import main
from tiered_cache.verify import VerifyReport, verify


def _run(args: list[str], dsn: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TIERED_CACHE_DSN": dsn, "TIERED_CACHE_REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "tiered_cache.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_demo_plays_the_scene_and_leaves_its_rows(dsn: str, redis_url: str) -> None:
    """`tiered-cache demo` migrates, writes for two venues, reads a board, regenerates and invalidates."""
    done = _run(["demo"], dsn, redis_url)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for step in ("1. An AI worker", "2. A board page", "3. Venue 202", "4. The result", "5. An operator"):
        assert step in out
    assert "finalized=True" in out and "finalized=False" in out
    assert "4 of 4 cells served by Redis" in out
    assert "101/m-1002 now: None" in out
    with psycopg.connect(dsn) as conn:
        statuses = dict(conn.execute("SELECT status, count(*) FROM biz.ai_cache GROUP BY status").fetchall())
    assert statuses == {"valid": 5, "invalidated": 1}


def test_migrate_is_idempotent(dsn: str, capsys) -> None:  # type: ignore[no-untyped-def]
    """A second migrate over a current schema says so and succeeds."""
    assert main(["--dsn", dsn, "migrate"]) == 0
    assert "schema already current" in capsys.readouterr().out


def test_verify_reports_a_planted_mismatch(dsn: str, redis_url: str, cache) -> None:  # type: ignore[no-untyped-def]
    """verify prints the consistent share and exits 1 when Redis disagrees with PostgreSQL."""
    cache.write_cache("app3_clue", 1, "a", {"v": 1})
    cache.write_cache("app3_clue", 1, "b", {"v": 1})
    cache.get_many("app3_clue", 1, ["a", "b"])
    ok = _run(["verify"], dsn, redis_url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "2/2 consistent" in ok.stdout
    # Change a row behind the cache's back with the outbox relay not running: Redis is now stale.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE biz.ai_cache SET result_json = '{\"v\": 2}' WHERE target_id = 'a'")
    bad = _run(["verify"], dsn, redis_url)
    assert bad.returncode == 1
    assert "1/2 consistent" in bad.stdout and "mismatch ['app3_clue', 1, 'a']" in bad.stdout


def _plant_mismatch(dsn: str) -> None:
    """Change a row behind the cache's back with no relay running: Redis is now stale for that key."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE biz.ai_cache SET result_json = '{\"v\": 2}' WHERE target_id = 'a'")


@pytest.mark.parametrize("api", ["sync", "async"])
def test_verify_function_takes_either_apis_cache(dsn: str, redis_url: str, api: str) -> None:
    """verify(cache), the function behind the command, reads an AsyncTieredCache's tiers as a TieredCache's (from
    async code in a thread, its connections its own): both entries agree, then the planted mismatch is found."""
    if api == "sync":
        with TieredCache.connect(dsn, redis_url) as cache:
            for target in ("a", "b"):
                cache.write_cache("app3_clue", 1, target, {"v": 1})
            cache.get_many("app3_clue", 1, ["a", "b"])
            before = verify(cache)
            _plant_mismatch(dsn)
            after = verify(cache)
    else:
        async def reports() -> tuple[VerifyReport, VerifyReport]:
            async with await AsyncTieredCache.connect(dsn, redis_url) as cache:
                for target in ("a", "b"):
                    await cache.write_cache("app3_clue", 1, target, {"v": 1})
                await cache.get_many("app3_clue", 1, ["a", "b"])
                first = await asyncio.to_thread(verify, cache)
                _plant_mismatch(dsn)
                return first, await asyncio.to_thread(verify, cache)

        before, after = asyncio.run(reports())
    assert (before.sampled, before.consistent, before.mismatches) == (2, 2, [])
    assert (after.sampled, after.consistent) == (2, 1)
    assert [m["key"] for m in after.mismatches] == [["app3_clue", 1, "a"]]
    assert after.mismatches[0]["redis"]["result_json"] == {"v": 1}
    assert after.mismatches[0]["postgres"]["result_json"] == {"v": 2}


def test_sweep_prints_its_report(dsn: str, capsys) -> None:  # type: ignore[no-untyped-def]
    """`tiered-cache sweep` runs one pass and prints what it changed."""
    assert main(["--dsn", dsn, "sweep", "--retention", "5"]) == 0
    assert "SweepReport(" in capsys.readouterr().out


def test_relay_applies_raw_sql_changes_then_stops(dsn: str, redis_url: str, cache) -> None:  # type: ignore[no-untyped-def]
    """`tiered-cache relay` drops an entry changed by raw SQL; SIGINT stops it cleanly."""
    import signal
    import time

    cache.write_cache("app3_clue", 9, "x", {"v": 1})
    cache.get_latest("app3_clue", 9, "x")
    entry = cache.keyset("app3_clue", 9, "x").entry
    client = redis.Redis.from_url(redis_url)
    assert client.exists(entry)
    env = {**os.environ, "TIERED_CACHE_DSN": dsn, "TIERED_CACHE_REDIS_URL": redis_url}
    proc = subprocess.Popen([sys.executable, "-m", "tiered_cache.cli", "relay"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE biz.ai_cache SET score = 5 WHERE target_id = 'x'")
        deadline = time.monotonic() + 20
        while client.exists(entry) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not client.exists(entry)
        assert cache.get_latest("app3_clue", 9, "x")["score"] == 5
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "RelayStats(" in out
