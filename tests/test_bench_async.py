"""The async bench's output shape and answers on the test-owned servers; nothing here asserts a time."""

from __future__ import annotations

import asyncio
import json

import pytest

from tiered_cache.bench._acontenders import AiocachePeer, build, close_all
from tiered_cache.bench._asweep import SWEEP_OPS
from tiered_cache.bench.amicro import OPS, verify

NAMES = ["floor: redis.asyncio + orjson", "floor: redis.asyncio bytes", "AsyncTieredCache redis",
         "AsyncTieredCache near+redis", "cashews redis", "cashews client-side", "aiocache redis"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the peers' own deprecations, not ours
def test_tiny_async_bench_measures_every_contender(dsn: str, redis_url: str, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """`bench --async --tiny`: every contender in every op, run and sweep point, answering the floor's rows."""
    from tiered_cache.bench import main

    monkeypatch.setenv("TIERED_CACHE_DSN", dsn)
    monkeypatch.setenv("TIERED_CACHE_REDIS_URL", redis_url)
    assert main(["--async", "--tiny", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    assert [c["name"] for c in result["contenders"]] == NAMES and result["redis_timeout"] == 0.05
    assert result["mismatches"] == result["mismatches_after"] == {name: [] for name in NAMES}
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        assert [(r["op"], r["contender"]) for r in run] == [(op, name) for op in OPS for name in NAMES]
        for r in run:
            assert r["calls"] > 0 and 0 < r["p50_us"] <= r["p99_us"] and isinstance(r["failed"], dict), r
        assert all(r["ratio"] == 1.0 for r in run if r["contender"] == NAMES[0])
    assert [(r["op"], r["contender"]) for r in result["summary"]] == [(op, name) for op in OPS for name in NAMES]
    for r in result["summary"]:
        assert r["runs"] == 2 and r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"], r

    sweep = result["sweep"]
    assert sweep["tasks"] == [1, 4]
    assert [(r["op"], r["tasks"], r["contender"]) for r in sweep["rows"]] == [
        (op, n, name) for op in SWEEP_OPS for n in (1, 4) for name in NAMES]
    for r in sweep["rows"]:
        assert r["ops"] > 0 and r["p50_us"] > 0, r
        assert (r["served_by_pg"] is None) == (not r["contender"].startswith("AsyncTieredCache")), r


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_answer_check_names_a_contender_that_differs(dsn: str, redis_url: str) -> None:
    """A peer holding another row than the floor reads is named with the op and target: the check can fail."""
    targets = [f"member-check-{i}" for i in range(4)]

    async def scenario() -> dict[str, list[str]]:
        contenders = await build(dsn, redis_url, targets)
        try:
            peer = contenders[-1]
            assert isinstance(peer, AiocachePeer)
            await peer.cache.set(peer._latest(targets[1]), {"tampered": True}, ttl=60)
            return await verify(contenders, targets)
        finally:
            await close_all(contenders, dsn)

    found = asyncio.run(scenario())
    assert found == {**{name: [] for name in NAMES},
                     "aiocache redis": [f"get_latest {targets[1]}", "get_many(50)", "page body(50)"]}
