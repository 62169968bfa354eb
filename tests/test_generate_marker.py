"""get_or_generate's regeneration marker, on both APIs: the others get the previous result from Redis alone,
and nothing that changed the key (an invalidate, a failure, the end of the generation) leaves it behind."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest
import redis

from _apis import target
from test_generate import WAIT, Generator, _write_expired
from tiered_cache import GenerationTimeout, TieredCache
from tiered_cache.policy.keys import KeySet

CT = "app3_clue"
SITE = 101


def after_call(obj: Any, name: str, api: str, hook: Callable[[Any], None]) -> None:
    """Run hook(result) after each call of obj.name; the hook may block (the event loop keeps running)."""
    inner = target(obj)
    original = getattr(inner, name)
    if api == "sync":
        def call(*a: Any, **k: Any) -> Any:
            out = original(*a, **k)
            hook(out)
            return out
    else:
        async def call(*a: Any, **k: Any) -> Any:
            out = await original(*a, **k)
            await asyncio.to_thread(hook, out)
            return out
    setattr(inner, name, call)


def count_reads(cache: TieredCache, api: str) -> list[str]:
    """Every PostgreSQL read the cache's store sends from now on, by the operation that sent it."""
    seen: list[str] = []
    store = target(cache.store)
    original = store._read
    if api == "sync":
        def read(sql: str, params: Any, op: str) -> Any:
            seen.append(op)
            return original(sql, params, op)
    else:
        async def read(sql: str, params: Any, op: str) -> Any:
            seen.append(op)
            return await original(sql, params, op)
    store._read = read
    return seen


def marker(r: redis.Redis, ks: KeySet) -> tuple[int | None, int]:
    """The row id the key's regeneration marker serves (None: no marker), and its time to live in ms."""
    raw = r.get(ks.regenerating)
    return (None if raw is None else orjson.loads(raw)["id"]), r.pttl(ks.regenerating)


@pytest.fixture
def r(redis_url: str) -> Any:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def start_generation(cache: TieredCache, pool: ThreadPoolExecutor, gen: Generator, key: str, **kwargs: Any) -> Any:
    """The winner's call, running in the pool until gen is released; returns its future once generate() started."""
    winner = pool.submit(cache.get_or_generate, CT, SITE, key, gen(), **kwargs)
    assert gen.started.wait(WAIT)
    return winner


def test_while_one_generates_the_others_read_the_previous_result_from_redis_alone(
        cache: TieredCache, api: str, dsn: str, r: redis.Redis) -> None:
    """The winner leaves the previous row in Redis (TTL: the lease); joiners read no PostgreSQL; finalize removes it."""
    old = _write_expired(dsn, "m1", "old")
    ks = cache.keyset(CT, SITE, "m1")
    gen = Generator(api, {"text": "new"}).hold()
    with ThreadPoolExecutor(max_workers=9) as pool:
        winner = start_generation(cache, pool, gen, "m1", lease_ttl=20.0)
        assert marker(r, ks)[0] == old and 0 < marker(r, ks)[1] <= 20_000
        reads = count_reads(cache, api)
        hits, misses = cache.stats()["redis"]["hits"], cache.stats()["redis"]["misses"]
        one_by_one = [cache.get_or_generate(CT, SITE, "m1", gen()) for _ in range(3)]
        # One entry lookup per call (the marker is not counted as one).
        assert cache.stats()["redis"]["hits"] - hits + cache.stats()["redis"]["misses"] - misses == 3
        others = [f.result(WAIT) for f in [pool.submit(cache.get_or_generate, CT, SITE, "m1", gen()) for _ in range(8)]]
        assert reads == []
        assert {o["id"] for o in one_by_one + others} == {old} and others[0]["result_json"] == {"text": "old"}
        assert not winner.done()
        gen.release.set()
        new = winner.result(WAIT)
    assert marker(r, ks)[0] is None and orjson.loads(r.get(ks.entry))["id"] == new["id"]
    assert cache.stats()["generations"]["joined"] == 11 and gen.calls == 1


def test_an_invalidate_during_the_generation_removes_the_marker(cache: TieredCache, api: str, dsn: str,
                                                                r: redis.Redis) -> None:
    """After invalidate returns no caller gets the invalidated previous row: it waits for the generation instead."""
    _write_expired(dsn, "m2", "old")
    ks = cache.keyset(CT, SITE, "m2")
    gen = Generator(api, {"text": "new"}).hold()
    with ThreadPoolExecutor(max_workers=2) as pool:
        winner = start_generation(cache, pool, gen, "m2")
        assert marker(r, ks)[0] is not None
        cache.invalidate(CT, SITE, "m2")
        assert marker(r, ks)[0] is None
        with pytest.raises(GenerationTimeout):
            cache.get_or_generate(CT, SITE, "m2", gen(), wait=0)
        waiter = pool.submit(cache.get_or_generate, CT, SITE, "m2", gen(), wait=WAIT)
        gen.release.set()
        assert waiter.result(WAIT)["result_json"] == {"text": "new"} == winner.result(WAIT)["result_json"]
    assert gen.calls == 1


def test_an_invalidate_between_the_winners_read_and_its_marker_refuses_the_marker(
        cache: TieredCache, api: str, dsn: str, r: redis.Redis) -> None:
    """The fill lease rule: the winner read the previous row, an invalidate committed, then the marker is refused."""
    _write_expired(dsn, "m3", "old")
    ks = cache.keyset(CT, SITE, "m3")
    read, go_on = threading.Event(), threading.Event()

    def pause(_: Any) -> None:
        if not read.is_set():  # the first `previous` read is the winner's, for its marker (its peek is another)
            read.set()
            assert go_on.wait(WAIT), "never released"

    after_call(cache.leases, "previous", api, pause)
    gen = Generator(api, {"text": "new"}).hold()
    with ThreadPoolExecutor(max_workers=2) as pool:
        winner = pool.submit(cache.get_or_generate, CT, SITE, "m3", gen())
        assert read.wait(WAIT)  # the winner holds the fill lease and has read the (still valid) previous row
        cache.invalidate(CT, SITE, "m3")
        go_on.set()
        assert gen.started.wait(WAIT)
        assert marker(r, ks)[0] is None
        with pytest.raises(GenerationTimeout):
            cache.get_or_generate(CT, SITE, "m3", gen(), wait=0)
        gen.release.set()
        assert winner.result(WAIT)["result_json"] == {"text": "new"}
    assert gen.calls == 1


def test_a_failed_generation_removes_the_marker_and_the_next_caller_generates(
        cache: TieredCache, api: str, dsn: str, r: redis.Redis) -> None:
    """generate() raising retires the placeholder (a history kill): the marker goes with it, nobody keeps waiting on it."""
    old = _write_expired(dsn, "m4", "old")
    ks = cache.keyset(CT, SITE, "m4")
    gen = Generator(api, error=RuntimeError("model overloaded")).hold()
    with ThreadPoolExecutor(max_workers=1) as pool:
        winner = start_generation(cache, pool, gen, "m4")
        assert marker(r, ks)[0] == old
        gen.release.set()
        with pytest.raises(RuntimeError):
            winner.result(WAIT)
    assert marker(r, ks)[0] is None
    again = Generator(api, {"text": "second"})
    assert cache.get_or_generate(CT, SITE, "m4", again())["result_json"] == {"text": "second"}
    assert again.calls == 1


def test_the_heartbeat_keeps_the_marker_as_long_as_the_lease(cache: TieredCache, api: str, dsn: str,
                                                             r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """After each heartbeat PostgreSQL granted, the marker's time to live is the lease's again (never longer)."""
    from tiered_cache._async import regenerating as aregenerating
    from tiered_cache._sync import regenerating as sregenerating

    module = sregenerating if api == "sync" else aregenerating
    refreshed = threading.Event()
    original = module.refresh
    if api == "sync":
        def refresh(*a: Any) -> None:
            original(*a)
            refreshed.set()
    else:
        async def refresh(*a: Any) -> None:  # type: ignore[misc]
            await original(*a)
            refreshed.set()
    monkeypatch.setattr(module, "refresh", refresh)
    _write_expired(dsn, "m5", "old")
    ks = cache.keyset(CT, SITE, "m5")
    gen = Generator(api).hold()
    with ThreadPoolExecutor(max_workers=1) as pool:
        winner = start_generation(cache, pool, gen, "m5", lease_ttl=1.5)
        r.pexpire(ks.regenerating, 3_600_000)  # far longer than the lease: only a refresh brings it back
        assert refreshed.wait(WAIT)
        assert marker(r, ks)[0] is not None and 0 < marker(r, ks)[1] <= 1_500
        gen.release.set()
        winner.result(WAIT)
    assert marker(r, ks)[0] is None


def test_no_marker_without_a_previous_result(cache: TieredCache, api: str, r: redis.Redis) -> None:
    """A cold key leaves nothing in Redis but what it always did: the others wait for the generation."""
    ks = cache.keyset(CT, SITE, "m6")
    gen = Generator(api).hold()
    with ThreadPoolExecutor(max_workers=2) as pool:
        winner = start_generation(cache, pool, gen, "m6")
        assert r.exists(ks.regenerating) == 0 and r.exists(ks.lease) == 0
        waiter = pool.submit(cache.get_or_generate, CT, SITE, "m6", gen(), wait=WAIT)
        gen.release.set()
        assert waiter.result(WAIT) == winner.result(WAIT)
