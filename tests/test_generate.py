"""get_or_generate in one process, on both APIs: single flight, stale-while-regenerating, failures, fencing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import psycopg
import pytest
import redis

from tiered_cache import GenerationFailed, GenerationTimeout, InvalidInput, TieredCache

CT = "app3_clue"  # 7 days of expiry
SITE = 101
WAIT = 20.0  # seconds any step may take before the test calls it hung


def sql(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


class Generator:
    """A generate() the test counts and holds: a plain function for the sync API, a coroutine one for async."""

    def __init__(self, api: str, result: Any = None, *, error: Exception | None = None) -> None:
        self.api = api
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.result = result if result is not None else {"text": "generated"}
        self.error = error
        self._guard = threading.Lock()

    def hold(self) -> Generator:
        self.release.clear()
        return self

    def _body(self) -> Any:
        with self._guard:
            self.calls += 1
        self.started.set()
        return self.error, self.result

    def __call__(self) -> Callable[[], Any]:
        if self.api == "sync":
            def generate() -> Any:
                error, result = self._body()
                assert self.release.wait(WAIT), "never released"
                if error is not None:
                    raise error
                return result
            return generate

        import asyncio

        async def agenerate() -> Any:
            error, result = self._body()
            while not self.release.is_set():  # the test's thread releases it
                await asyncio.sleep(0.005)
            if error is not None:
                raise error
            return result
        return agenerate


def busy_answers(cache: TieredCache, api: str) -> threading.Semaphore:
    """Released once per 'busy' answer the cache's lease table gives: a caller that is now waiting."""
    leases = getattr(cache.leases, "_target", cache.leases)
    acquire = leases.acquire
    busy = threading.Semaphore(0)

    def note(grant: Any) -> Any:
        if grant.outcome == "busy":
            busy.release()
        return grant

    if api == "sync":
        leases.acquire = lambda *a, **k: note(acquire(*a, **k))
    else:
        async def aacquire(*a: Any, **k: Any) -> Any:
            return note(await acquire(*a, **k))
        leases.acquire = aacquire
    return busy


def test_a_cold_key_is_generated_once_and_then_served_from_the_tiers(cache: TieredCache, api: str, dsn: str,
                                                                      redis_url: str) -> None:
    gen = Generator(api, {"text": "one", "n": 1})
    row = cache.get_or_generate(CT, SITE, "t1", gen(), triggered_by="test")
    assert gen.calls == 1
    assert row["result_json"] == {"text": "one", "n": 1} and row["status"] == "valid"
    assert row == cache.get_latest(CT, SITE, "t1")
    again = cache.get_or_generate(CT, SITE, "t1", gen())
    assert gen.calls == 1 and again == row
    # The placeholder was finalized in place: one row, token 1, lease released.
    assert sql(dsn, "SELECT status, gen_token, triggered_by FROM biz.ai_cache") == [("valid", 1, "test")]
    assert sql(dsn, "SELECT token, holder FROM biz.ai_cache_leases") == [(1, None)]
    # Every tier has it: Redis holds exactly the row get_latest returns.
    r = redis.Redis.from_url(redis_url)
    assert orjson.loads(r.get(cache.keyset(CT, SITE, "t1").entry)) == row
    r.close()
    stats = cache.stats()["generations"]
    assert stats["started"] == 1 and stats["won"] == 1 and stats["failed"] == 0


def test_concurrent_callers_in_one_process_share_one_generation(cache: TieredCache, api: str) -> None:
    gen = Generator(api).hold()
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(cache.get_or_generate, CT, SITE, "hot", gen(), wait=WAIT) for _ in range(16)]
        assert gen.started.wait(WAIT)
        gen.release.set()
        rows = [f.result(WAIT) for f in futures]
    assert gen.calls == 1
    assert len({r["id"] for r in rows}) == 1 and rows[0]["result_json"] == {"text": "generated"}
    stats = cache.stats()["generations"]
    assert stats["won"] == 1 and stats["waited"] + stats["won"] <= 16 and stats["timed_out"] == 0


def _write_expired(dsn: str, target: str, text: str) -> int:
    """A row past its expiry, written as ETL would (servable no more, never invalidated)."""
    rows = sql(dsn, "INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, status, expires_at, created_at)"
                    " VALUES (%s, %s, %s, %s, 'valid', now() - interval '1 minute', now() - interval '1 day') RETURNING id",
               (CT, SITE, target, orjson.dumps({"text": text}).decode()))
    return rows[0][0]


def test_while_one_caller_regenerates_the_others_get_the_previous_result(cache: TieredCache, api: str,
                                                                         dsn: str) -> None:
    old = _write_expired(dsn, "t2", "old")
    gen = Generator(api, {"text": "new"}).hold()
    with ThreadPoolExecutor(max_workers=9) as pool:
        winner = pool.submit(cache.get_or_generate, CT, SITE, "t2", gen())
        assert gen.started.wait(WAIT)
        # Every other caller returns while the generation is still held: none waits for it.
        others = [pool.submit(cache.get_or_generate, CT, SITE, "t2", gen()).result(WAIT) for _ in range(8)]
        assert not winner.done()
        gen.release.set()
        new = winner.result(WAIT)
    assert {o["id"] for o in others} == {old} and others[0]["result_json"] == {"text": "old"}
    assert new["result_json"] == {"text": "new"} and gen.calls == 1
    assert cache.get_latest(CT, SITE, "t2") == new
    assert cache.stats()["generations"]["joined"] == 8


def test_an_invalidated_row_is_never_served_as_the_previous_result(cache: TieredCache, api: str, dsn: str) -> None:
    _write_expired(dsn, "t3", "old")
    cache.invalidate(CT, SITE, "t3")
    gen = Generator(api).hold()
    with ThreadPoolExecutor(max_workers=2) as pool:
        winner = pool.submit(cache.get_or_generate, CT, SITE, "t3", gen())
        assert gen.started.wait(WAIT)
        waiter = pool.submit(cache.get_or_generate, CT, SITE, "t3", gen(), wait=WAIT)
        gen.release.set()
        assert waiter.result(WAIT)["result_json"] == {"text": "generated"}
        assert winner.result(WAIT) == waiter.result()
    assert gen.calls == 1


def test_a_failed_generation_reaches_the_winner_and_its_waiters_then_the_next_call_retries(
        cache: TieredCache, api: str, dsn: str) -> None:
    gen = Generator(api, error=RuntimeError("model overloaded")).hold()
    busy = busy_answers(cache, api)
    with ThreadPoolExecutor(max_workers=4) as pool:
        winner = pool.submit(cache.get_or_generate, CT, SITE, "t4", gen())
        assert gen.started.wait(WAIT)
        waiters = [pool.submit(cache.get_or_generate, CT, SITE, "t4", gen(), wait=WAIT) for _ in range(3)]
        for _ in waiters:
            assert busy.acquire(timeout=WAIT)  # each is waiting for the winner now
        gen.release.set()
        with pytest.raises(RuntimeError, match="model overloaded"):
            winner.result(WAIT)
        for w in waiters:
            with pytest.raises(GenerationFailed, match="model overloaded") as info:
                w.result(WAIT)
            assert info.value.key == (CT, SITE, "t4")
    assert gen.calls == 1
    # The placeholder is retired, the lease free; nothing servable was written.
    assert sql(dsn, "SELECT status FROM biz.ai_cache") == [("expired",)]
    assert sql(dsn, "SELECT holder FROM biz.ai_cache_leases") == [(None,)]
    assert cache.get_latest(CT, SITE, "t4") is None
    ok = Generator(api, {"text": "second try"})
    assert cache.get_or_generate(CT, SITE, "t4", ok())["result_json"] == {"text": "second try"}
    assert cache.stats()["generations"]["failed"] == 1


def test_a_waiter_gives_up_after_wait_naming_the_key(cache: TieredCache, api: str) -> None:
    gen = Generator(api).hold()
    with ThreadPoolExecutor(max_workers=2) as pool:
        winner = pool.submit(cache.get_or_generate, CT, SITE, "t5", gen())
        assert gen.started.wait(WAIT)
        with pytest.raises(GenerationTimeout, match=r"t5.*waiting") as info:
            cache.get_or_generate(CT, SITE, "t5", gen(), wait=0.2)
        assert info.value.waited >= 0.2
        gen.release.set()
        winner.result(WAIT)
    assert cache.stats()["generations"]["timed_out"] == 1


def test_refresh_ahead_regenerates_once_while_everyone_keeps_the_current_row(cache: TieredCache, api: str,
                                                                            dsn: str) -> None:
    # A row in the last 10% of its life: created 9.5 days ago, expiring in half a day.
    now = datetime.now(timezone.utc)
    current = sql(dsn, "INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, status, expires_at, created_at)"
                       " VALUES (%s, %s, 't6', '{\"text\": \"current\"}', 'valid', %s, %s) RETURNING id",
                  (CT, SITE, now + timedelta(hours=12), now - timedelta(days=9, hours=12)))[0][0]
    gen = Generator(api, {"text": "refreshed"}).hold()
    assert cache.get_or_generate(CT, SITE, "t6", gen(), refresh_ahead=0.01)["id"] == current  # not due yet
    assert gen.calls == 0
    with ThreadPoolExecutor(max_workers=6) as pool:
        refresher = pool.submit(cache.get_or_generate, CT, SITE, "t6", gen(), refresh_ahead=0.1)
        assert gen.started.wait(WAIT)
        others = [pool.submit(cache.get_or_generate, CT, SITE, "t6", gen(), refresh_ahead=0.1).result(WAIT)
                  for _ in range(5)]
        assert {o["id"] for o in others} == {current}
        gen.release.set()
        assert refresher.result(WAIT)["result_json"] == {"text": "refreshed"}
    assert gen.calls == 1
    assert cache.get_latest(CT, SITE, "t6")["result_json"] == {"text": "refreshed"}


def test_a_superseded_finalize_is_refused_and_changes_no_tier(cache: TieredCache, api: str, dsn: str,
                                                              redis_url: str) -> None:
    gen = Generator(api, {"text": "slow and old"}).hold()
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(cache.get_or_generate, CT, SITE, "t7", gen(), lease_ttl=60)
        assert gen.started.wait(WAIT)
        # As if the slow worker had stopped heartbeating: its lease lapses, and another caller takes over.
        sql(dsn, "UPDATE biz.ai_cache_leases SET expires_at = now() - interval '1 second'")
        fresh = Generator(api, {"text": "newer"})
        newer = cache.get_or_generate(CT, SITE, "t7", fresh())
        assert newer["result_json"] == {"text": "newer"} and fresh.calls == 1
        gen.release.set()
        # The slow worker's finalize is refused; it returns the newer result, which stays in every tier.
        assert slow.result(WAIT) == newer
    assert cache.get_latest(CT, SITE, "t7") == newer
    r = redis.Redis.from_url(redis_url)
    assert orjson.loads(r.get(cache.keyset(CT, SITE, "t7").entry)) == newer
    r.close()
    assert sql(dsn, "SELECT gen_token, status FROM biz.ai_cache ORDER BY id") == [(1, "expired"), (2, "valid")]
    assert cache.stats()["generations"]["taken_over"] == 1
    # The plain API on the retired placeholder is refused too.
    first = sql(dsn, "SELECT id FROM biz.ai_cache WHERE gen_token = 1")[0][0]
    assert cache.finalize_cache(first, {"text": "late"}) is False
    assert cache.get_latest(CT, SITE, "t7") == newer


def test_bad_arguments_are_refused_before_any_io(cache: TieredCache, api: str, dsn: str) -> None:
    gen = Generator(api)
    for kwargs, field in (({"wait": -1}, "wait"), ({"wait": float("nan")}, "wait"), ({"lease_ttl": 0}, "lease_ttl"),
                          ({"refresh_ahead": 1.5}, "refresh_ahead"), ({"refresh_ahead": True}, "refresh_ahead"),
                          ({"triggered_by": "x\x00"}, "triggered_by")):
        with pytest.raises(InvalidInput) as info:
            cache.get_or_generate(CT, SITE, "t8", gen(), **kwargs)
        assert info.value.field == field
    with pytest.raises(InvalidInput, match="generate"):
        cache.get_or_generate(CT, SITE, "t8", "not callable")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="site_id"):
        cache.get_or_generate(CT, "101", "t8", gen())  # type: ignore[arg-type]
    assert gen.calls == 0
    assert sql(dsn, "SELECT count(*) FROM biz.ai_cache_leases") == [(0,)]


def test_a_generated_result_that_is_not_json_fails_cleanly(cache: TieredCache, api: str, dsn: str) -> None:
    gen = Generator(api, {"x": float("nan")})
    with pytest.raises(InvalidInput, match="result_json"):
        cache.get_or_generate(CT, SITE, "t9", gen())
    assert sql(dsn, "SELECT status FROM biz.ai_cache") == [("expired",)]
    assert sql(dsn, "SELECT holder FROM biz.ai_cache_leases") == [(None,)]
