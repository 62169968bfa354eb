"""TieredCache through both real tiers: every method, read-through, write-through, TTLs, isolation, faults."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tiered_cache import InvalidInput, PostgresStore, TieredCache, redis_client

CT = "app3_clue"  # 7 days of expiry
CT2 = "app4_analysis"  # 7 days, another app
UNTYPED = "custom_untyped"  # no expiry policy: expires_at NULL
SITE, OTHER_SITE = 101, 202

# -- helpers ------------------------------------------------------------------------------------


def sql(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement directly in PostgreSQL, bypassing the library entirely."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def row_count(dsn: str) -> int:
    return sql(dsn, "SELECT count(*) FROM biz.ai_cache")[0][0]


def entry_of(r: redis.Redis, cache: TieredCache, ct: str, site: int, target: str) -> Any:
    """The decoded Redis entry of a key: a row dict, None for a negative entry, or the string 'ABSENT'."""
    raw = r.get(cache.keyset(ct, site, target).entry)
    return "ABSENT" if raw is None else orjson.loads(raw)


def same(a: Any, b: Any) -> None:
    """Equal values and equal JSON types (1.0 is not 1, True is not 1), keys in any order."""
    assert a == b
    assert orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(b, option=orjson.OPT_SORT_KEYS)


def calls(r: redis.Redis) -> dict[str, int]:
    """Per-command call counts of the server (INFO commandstats)."""
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items()}


def delta(before: dict[str, int], after: dict[str, int], command: str) -> int:
    return after.get(command, 0) - before.get(command, 0)


def expires_ms_in_pg(dsn: str, row_id: int) -> int | None:
    """expires_at of a row as Unix milliseconds, floored, computed by PostgreSQL itself."""
    return sql(dsn, "SELECT floor(extract(epoch FROM expires_at) * 1000)::bigint FROM biz.ai_cache WHERE id = %s",
               (row_id,))[0][0]


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client on the test-owned redis-server, to look at what the cache stored."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def other(dsn: str, redis_url: str) -> Iterator[TieredCache]:
    """A second TieredCache with its own pool and client: another process of the application."""
    with TieredCache.connect(dsn, redis_url) as c:
        yield c


# -- get_latest: read-through -------------------------------------------------------------------


def test_get_latest_miss_reads_postgres_and_fills_redis(cache: TieredCache, store: PostgresStore, r: redis.Redis) -> None:
    """A cold get_latest returns PostgreSQL's row and leaves it as the key's Redis entry."""
    row_id = store.write_cache(CT, SITE, "m-1", {"v": 1})
    key = cache.keyset(CT, SITE, "m-1")
    assert r.exists(key.entry) == 0
    got = cache.get_latest(CT, SITE, "m-1")
    assert got is not None and got["id"] == row_id
    same(got, store.get_latest(CT, SITE, "m-1"))
    same(entry_of(r, cache, CT, SITE, "m-1"), got)
    assert r.exists(key.lease) == 0, "the fill must consume its lease"
    assert cache.redis.stats.misses == 1 and cache.redis.stats.fills == 1


def test_get_latest_second_read_is_a_redis_hit(cache: TieredCache, store: PostgresStore, dsn: str) -> None:
    """The second get_latest is served from Redis: a hit, and blind to a change made behind the cache's back."""
    store.write_cache(CT, SITE, "m-1", {"v": "original"})
    first = cache.get_latest(CT, SITE, "m-1")
    hits = cache.redis.stats.hits
    sql(dsn, """UPDATE biz.ai_cache SET result_json = '{"v": "changed behind the cache"}'""")
    assert store.get_latest(CT, SITE, "m-1")["result_json"] == {"v": "changed behind the cache"}
    second = cache.get_latest(CT, SITE, "m-1")
    assert cache.redis.stats.hits == hits + 1
    same(second, first)
    assert second["result_json"] == {"v": "original"}


def _insert_legacy(dsn: str, target: str) -> None:
    sql(dsn, """INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, status)
                VALUES (%s, %s, %s, '{"legacy": true, "n": [1, 2.5]}', NULL)""", (CT, SITE, target))


ROWS: dict[str, Callable[[TieredCache, str], None]] = {
    "chinese_text": lambda c, t: c.store.write_cache(CT, SITE, t, {"摘要": "会员近三个月消费下降，建议回访", "emoji": "🏸✓"},
                                                   triggered_by="定时任务"),
    "nested_json": lambda c, t: c.store.write_cache(CT, SITE, t, {"a": {"b": {"c": [{"d": None}, {"e": {}}]}}, "z": []}),
    "lists_floats_bools": lambda c, t: c.store.write_cache(
        CT, SITE, t, {"l": [1, 2.0, -0.5, 1e-7, 1.5e300, 2**62], "t": True, "f": False, "n": None, "s": ""}, score=-3),
    "score_none_unknown_type": lambda c, t: c.store.write_cache(UNTYPED, SITE, t, {"x": 1}),
    "score_and_triggered_by_set": lambda c, t: c.store.write_cache(CT, SITE, t, {"x": 0.1}, score=2**31 - 1,
                                                                 triggered_by="chat"),
    "finalized_placeholder": lambda c, t: c.store.finalize_cache(c.store.set_generating(CT, SITE, t, "worker"),
                                                                {"done": True}, score=7),
    "legacy_null_status": lambda c, t: _insert_legacy(c.store.dsn, t),
}


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_redis_entry_equals_postgres_row(kind: str, cache: TieredCache, other: TieredCache, r: redis.Redis) -> None:
    """A row read through Redis (fill, hit, another process's hit) is identical, types included, to PostgreSQL's dict."""
    ct = UNTYPED if kind == "score_none_unknown_type" else CT
    ROWS[kind](cache, "t-" + kind)
    truth = cache.store.get_latest(ct, SITE, "t-" + kind)
    assert truth is not None
    if kind == "score_none_unknown_type":
        assert truth["expires_at"] is None and truth["score"] is None
    if kind == "legacy_null_status":
        assert truth["status"] is None
    filled = cache.get_latest(ct, SITE, "t-" + kind)
    hit = cache.get_latest(ct, SITE, "t-" + kind)
    remote = other.get_latest(ct, SITE, "t-" + kind)
    assert other.redis.stats.hits == 1
    for got in (filled, hit, remote, entry_of(r, cache, ct, SITE, "t-" + kind)):
        same(got, truth)


def test_write_through_entry_equals_postgres_row(cache: TieredCache, other: TieredCache, r: redis.Redis) -> None:
    """The entry a write stores (not a fill) equals PostgreSQL's row for rich payloads, typed and untyped."""
    payload = {"名字": "张三", "nested": {"list": [1, 2.5, True, None, "中文"]}, "f": 3.0}
    for ct in (CT, UNTYPED):
        cache.write_cache(ct, SITE, "w", payload, triggered_by="系统", score=None)
        truth = cache.store.get_latest(ct, SITE, "w")
        same(entry_of(r, cache, ct, SITE, "w"), truth)
        same(other.get_latest(ct, SITE, "w"), truth)
    assert other.redis.stats.hits == 2 and other.redis.stats.misses == 0


# -- TTL ----------------------------------------------------------------------------------------


def expires_at_ms(r: redis.Redis, key: str) -> tuple[int, int]:
    """(absolute expiry in Unix ms, tolerance): PEXPIRETIME on Redis 7+, exact; on 6.2 (the embedded
    fallback has no PEXPIRETIME) the server's TIME plus PTTL, good to a few milliseconds."""
    try:
        return r.pexpiretime(key), 0
    except redis.ResponseError:
        sec, usec = r.time()
        return sec * 1000 + usec // 1000 + r.pttl(key), 3


def assert_expiry(r: redis.Redis, key: str, expected: int | None) -> None:
    """The key expires at `expected` Unix ms (exactly where the server can say so)."""
    got, tolerance = expires_at_ms(r, key)
    assert expected is not None and abs(got - expected) <= tolerance, (got, expected)


@pytest.mark.parametrize("ct", ["app2_finance", "app3_clue", "app6_note_analysis"])
def test_entry_expires_exactly_when_its_row_does(ct: str, cache: TieredCache, r: redis.Redis, dsn: str) -> None:
    """PEXPIRETIME of a typed entry equals the row's expires_at in Unix ms (floored), whether written or filled."""
    row_id = cache.write_cache(ct, SITE, "ttl", {"v": 1})
    key = cache.keyset(ct, SITE, "ttl").entry
    expected = expires_ms_in_pg(dsn, row_id)
    assert expected is not None
    assert_expiry(r, key, expected)  # stored by write-through
    r.delete(key)
    cache.get_latest(ct, SITE, "ttl")
    assert_expiry(r, key, expected)  # stored by a fill


def test_explicit_expiry_with_microseconds_is_floored(cache: TieredCache, r: redis.Redis, dsn: str) -> None:
    """An explicit expires_at with sub-millisecond digits becomes PEXPIRETIME floored to the millisecond."""
    at = (datetime.now(timezone.utc) + timedelta(hours=1)).replace(microsecond=123999)
    row_id = cache.write_cache(UNTYPED, SITE, "ttl", {"v": 1}, expires_at=at)
    expected = (at - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(milliseconds=1)
    assert expected % 1000 == 123
    assert expires_ms_in_pg(dsn, row_id) == expected
    assert_expiry(r, cache.keyset(UNTYPED, SITE, "ttl").entry, expected)


def test_rows_without_expiry_get_the_no_expiry_cap(dsn: str, redis_url: str, r: redis.Redis) -> None:
    """An entry of a row with expires_at NULL lives no_expiry_ttl at most, written or filled."""
    with TieredCache.connect(dsn, redis_url, no_expiry_ttl=30) as c:
        c.write_cache(UNTYPED, SITE, "forever", {"v": 1})
        key = c.keyset(UNTYPED, SITE, "forever").entry
        assert 25_000 < r.pttl(key) <= 30_000
        r.delete(key)
        assert c.get_latest(UNTYPED, SITE, "forever")["result_json"] == {"v": 1}
        assert 25_000 < r.pttl(key) <= 30_000


def test_entry_vanishes_with_its_row_and_the_older_row_is_served(cache: TieredCache, r: redis.Redis) -> None:
    """An entry whose row expires in ~300 ms is gone after it, and the next read serves PostgreSQL's older row."""
    old_id = cache.write_cache(CT, SITE, "k", {"v": "old"})
    soon = datetime.now(timezone.utc) + timedelta(milliseconds=300)
    new_id = cache.write_cache(CT, SITE, "k", {"v": "short-lived"}, expires_at=soon)
    key = cache.keyset(CT, SITE, "k").entry
    assert cache.get_latest(CT, SITE, "k")["id"] == new_id
    assert entry_of(r, cache, CT, SITE, "k")["id"] == new_id
    time.sleep(max(0.0, (soon - datetime.now(timezone.utc)).total_seconds()) + 0.05)
    assert r.exists(key) == 0
    assert cache.get_latest(CT, SITE, "k")["id"] == old_id
    assert cache.store.get_latest(CT, SITE, "k")["id"] == old_id


def test_entry_vanishes_with_its_only_row_and_none_is_served(cache: TieredCache, r: redis.Redis) -> None:
    """When the only row expires, its entry is gone and the next read returns None and caches that."""
    soon = datetime.now(timezone.utc) + timedelta(milliseconds=300)
    cache.write_cache(CT, SITE, "k", {"v": "short-lived"}, expires_at=soon)
    assert cache.get_latest(CT, SITE, "k")["result_json"] == {"v": "short-lived"}
    time.sleep(max(0.0, (soon - datetime.now(timezone.utc)).total_seconds()) + 0.05)
    assert entry_of(r, cache, CT, SITE, "k") == "ABSENT"
    assert cache.get_latest(CT, SITE, "k") is None
    assert entry_of(r, cache, CT, SITE, "k") is None


def test_row_written_already_expired_is_never_stored(cache: TieredCache, other: TieredCache, r: redis.Redis) -> None:
    """A write with expires_at in the past never reaches Redis; readers keep the previous row (or None)."""
    past = datetime.now(timezone.utc) - timedelta(seconds=5)
    dead = cache.write_cache(CT, SITE, "alone", {"v": "dead"}, expires_at=past)
    assert entry_of(r, cache, CT, SITE, "alone") in ("ABSENT", None)
    assert other.get_latest(CT, SITE, "alone") is None
    assert entry_of(r, cache, CT, SITE, "alone") is None

    live = cache.write_cache(CT, SITE, "k", {"v": "live"})
    dead = cache.write_cache(CT, SITE, "k", {"v": "dead"}, expires_at=past)
    stored = entry_of(r, cache, CT, SITE, "k")
    assert stored == "ABSENT" or stored["id"] == live
    assert other.get_latest(CT, SITE, "k")["id"] == live
    assert cache.get_latest(CT, SITE, "k")["id"] == live
    for key in r.scan_iter("tc:e:*"):
        raw = r.get(key)
        assert raw is None or raw == b"null" or orjson.loads(raw)["id"] != dead


# -- negative entries ---------------------------------------------------------------------------


def test_missing_key_caches_a_short_negative_entry_cleared_by_a_write(dsn: str, redis_url: str,
                                                                      r: redis.Redis) -> None:
    """get_latest of a missing key stores 'null' for at most negative_ttl; write_cache replaces it at once."""
    with TieredCache.connect(dsn, redis_url, negative_ttl=2) as c, TieredCache.connect(dsn, redis_url) as c2:
        key = c.keyset(CT, SITE, "nobody").entry
        assert c.get_latest(CT, SITE, "nobody") is None
        assert r.get(key) == b"null"
        assert 0 < r.pttl(key) <= 2000
        assert c2.get_latest(CT, SITE, "nobody") is None
        assert c2.redis.stats.hits == 1, "the negative entry is served from Redis"
        new_id = c.write_cache(CT, SITE, "nobody", {"v": 1})
        assert entry_of(r, c, CT, SITE, "nobody")["id"] == new_id
        assert c2.get_latest(CT, SITE, "nobody")["id"] == new_id
        assert c.get_latest(CT, SITE, "nobody")["id"] == new_id


def test_get_many_caches_negative_entries_for_empty_cells(dsn: str, redis_url: str, r: redis.Redis) -> None:
    """get_many stores short negative entries for cells without a row; a write to one cell shows in the next get_many."""
    with TieredCache.connect(dsn, redis_url, negative_ttl=2) as c, TieredCache.connect(dsn, redis_url) as c2:
        a = c.write_cache(CT, SITE, "a", {"v": "a"})
        got = c.get_many(CT, SITE, ["a", "b", "c"])
        assert got["a"]["id"] == a and got["b"] is None and got["c"] is None
        for t in ("b", "c"):
            key = c.keyset(CT, SITE, t).entry
            assert r.get(key) == b"null" and 0 < r.pttl(key) <= 2000
        b = c.write_cache(CT, SITE, "b", {"v": "b"})
        got2 = c2.get_many(CT, SITE, ["a", "b", "c"])
        assert got2["b"]["id"] == b and got2["a"]["id"] == a and got2["c"] is None
        assert c2.redis.stats.hits == 3 and c2.redis.stats.misses == 0


# -- get_many -----------------------------------------------------------------------------------


def test_get_many_is_one_mget_and_one_query_for_the_misses(cache: TieredCache, r: redis.Redis,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A board page costs one MGET, one PostgreSQL query for all misses and no per-target GET."""
    ids = [f"m-{i}" for i in range(20)]
    for t in ids[::2]:
        cache.store.write_cache(CT, SITE, t, {"t": t})
    for t in ids[:6]:
        cache.get_latest(CT, SITE, t)  # warm some cells
    fetches: list[list[str]] = []
    store = getattr(cache.store, "_target", cache.store)  # the async store itself, behind the blocking view
    real_fetch = store.fetch_many
    monkeypatch.setattr(store, "fetch_many", lambda ct, s, t: fetches.append(list(t)) or real_fetch(ct, s, t))
    monkeypatch.setattr(store, "get_latest", lambda *a: pytest.fail("get_many must not read per target"))
    before = calls(r)
    got = cache.get_many(CT, SITE, ids)
    after = calls(r)
    misses = len(ids) - 6
    assert delta(before, after, "mget") == 1
    assert delta(before, after, "set") == 2 * misses  # per missed cell: its lease, and the entry SET inside FILL
    assert delta(before, after, "evalsha") == misses  # one FILL per missed cell (one pipeline)
    # The only GETs are the lease checks inside those FILL scripts: no per-cell read round trip.
    assert delta(before, after, "get") == misses
    assert fetches == [ids[6:]]
    monkeypatch.undo()
    assert got == cache.store.get_many(CT, SITE, ids)
    for t in ids:
        same(entry_of(r, cache, CT, SITE, t), got[t])
    before = calls(r)
    assert cache.get_many(CT, SITE, ids) == got
    after = calls(r)
    assert delta(before, after, "mget") == 1 and delta(before, after, "evalsha") == 0


def test_get_many_mixed_hits_and_misses_equals_store(cache: TieredCache, dsn: str) -> None:
    """Mixed cached, uncached and missing cells give exactly store.get_many's answer, hits from Redis."""
    for t in ("a", "b", "c", "d"):
        cache.store.write_cache(CT, SITE, t, {"t": t, "中": [1.5, True]})
    cache.get_latest(CT, SITE, "a")
    cache.get_latest(CT, SITE, "zz")  # a cached negative cell
    ids = ["a", "b", "zz", "c", "missing", "d"]
    hits, misses = cache.redis.stats.hits, cache.redis.stats.misses
    got = cache.get_many(CT, SITE, ids)
    assert list(got) == ids
    same(got, cache.store.get_many(CT, SITE, ids))
    assert cache.redis.stats.hits - hits == 2 and cache.redis.stats.misses - misses == 4
    sql(dsn, """UPDATE biz.ai_cache SET result_json = '{"changed": 1}'""")
    again = cache.get_many(CT, SITE, ids)
    same(again, got)  # every cell now served from Redis


def test_get_many_duplicates_and_empty_list(cache: TieredCache, r: redis.Redis) -> None:
    """Duplicate target ids collapse to one cell each, as in the store; an empty list returns {} touching nothing."""
    cache.store.write_cache(CT, SITE, "a", {"v": "a"})
    got = cache.get_many(CT, SITE, ["a", "b", "a", "b", "a"])
    assert list(got) == ["a", "b"]
    same(got, cache.store.get_many(CT, SITE, ["a", "b", "a", "b", "a"]))
    again = cache.get_many(CT, SITE, ["b", "a", "b"])
    assert list(again) == ["b", "a"] and again["a"] == got["a"] and again["b"] is None
    before = r.info("stats")["total_commands_processed"]
    assert cache.get_many(CT, SITE, []) == {}
    assert cache.get_many(CT, SITE, ()) == {}
    assert r.info("stats")["total_commands_processed"] - before == 1  # only our INFO


# -- get_history --------------------------------------------------------------------------------


def _history_setup(cache: TieredCache) -> None:
    cache.store.write_cache(CT, SITE, "h", {"n": 1})
    cache.store.write_cache(CT, SITE, "h", {"n": 2})
    gen = cache.store.set_generating(CT, SITE, "h")
    cache.store.write_cache(CT, SITE, "h", {"n": 3, "文": "字"})
    cache.store.finalize_cache(gen, {"n": "finalized"})


def test_get_history_is_cached_per_limit(cache: TieredCache, r: redis.Redis, dsn: str) -> None:
    """get_history equals the store's for each limit and is cached under one hash field per limit."""
    _history_setup(cache)
    ks = cache.keyset(CT, SITE, "h")
    answers = {limit: cache.get_history(CT, SITE, "h", limit=limit) for limit in (1, 2, 5)}
    assert cache.get_history(CT, SITE, "h") == answers[2]  # default limit=2
    for limit, got in answers.items():
        same(got, cache.store.get_history(CT, SITE, "h", limit=limit))
    assert len(answers[5]) == 4
    assert set(r.hkeys(ks.history)) == {b"1", b"2", b"5"}
    for limit, got in answers.items():
        same(orjson.loads(r.hget(ks.history, str(limit))), got)
    assert 0 < r.pttl(ks.history) <= 3_600_000
    sql(dsn, "DELETE FROM biz.ai_cache")
    hits = cache.redis.stats.hits
    for limit, got in answers.items():
        same(cache.get_history(CT, SITE, "h", limit=limit), got)  # from Redis: PostgreSQL is empty now
    assert cache.redis.stats.hits - hits == 3


HISTORY_CHANGES: dict[str, Callable[[TieredCache], Any]] = {
    "write_cache": lambda c: c.write_cache(CT, SITE, "h", {"n": "new"}),
    "set_generating": lambda c: c.set_generating(CT, SITE, "h"),
    "finalize_cache": None,  # type: ignore[dict-item]  # needs a placeholder made before caching, see below
    "invalidate": lambda c: c.invalidate(CT, SITE, "h"),
    "invalidate_site": lambda c: c.invalidate_site(SITE),
}


@pytest.mark.parametrize("change", sorted(HISTORY_CHANGES))
def test_history_is_dropped_by_every_change(change: str, cache: TieredCache, other: TieredCache,
                                            r: redis.Redis) -> None:
    """write/set_generating/finalize/invalidate/invalidate_site drop the cached history; the next read is the store's."""
    _history_setup(cache)
    gen = cache.store.set_generating(CT, SITE, "h")
    ks = cache.keyset(CT, SITE, "h")
    before = {limit: other.get_history(CT, SITE, "h", limit=limit) for limit in (2, 10)}
    assert r.hlen(ks.history) == 2
    if change == "finalize_cache":
        assert cache.finalize_cache(gen, {"n": "done"}) is True
    else:
        HISTORY_CHANGES[change](cache)
    assert r.exists(ks.history) == 0
    for limit in (2, 10):
        now = other.get_history(CT, SITE, "h", limit=limit)
        same(now, cache.store.get_history(CT, SITE, "h", limit=limit))
        if change in ("write_cache", "set_generating", "finalize_cache"):  # invalidation changes no history column
            assert now != before[limit]
    assert r.hlen(ks.history) == 2


# -- write-through, seen by another process -----------------------------------------------------


def test_write_cache_is_seen_by_another_process_at_once(cache: TieredCache, other: TieredCache,
                                                        r: redis.Redis) -> None:
    """After write_cache returns, another TieredCache reads the new row in get_latest, get_many and get_history."""
    v1 = cache.write_cache(CT, SITE, "k", {"v": 1})
    assert other.get_latest(CT, SITE, "k")["id"] == v1
    assert other.get_many(CT, SITE, ["k"])["k"]["id"] == v1
    assert other.get_history(CT, SITE, "k")[0]["id"] == v1
    v2 = cache.write_cache(CT, SITE, "k", {"v": 2}, score=9, triggered_by="chat")
    assert entry_of(r, cache, CT, SITE, "k")["id"] == v2  # written through, not merely killed
    hits = other.redis.stats.hits
    got = other.get_latest(CT, SITE, "k")
    assert got["id"] == v2 and got["result_json"] == {"v": 2} and got["score"] == 9
    assert other.redis.stats.hits == hits + 1
    assert other.get_many(CT, SITE, ["k"])["k"]["id"] == v2
    assert [h["id"] for h in other.get_history(CT, SITE, "k")] == [v2, v1]
    same(got, cache.store.get_latest(CT, SITE, "k"))


def test_set_generating_keeps_serving_the_previous_result_from_redis(cache: TieredCache, other: TieredCache,
                                                                     r: redis.Redis, dsn: str) -> None:
    """A 'generating' placeholder hides nothing: the previous row stays the Redis entry and is served from there."""
    v1 = cache.write_cache(CT, SITE, "k", {"v": 1})
    key = cache.keyset(CT, SITE, "k").entry
    raw = r.get(key)
    gen = cache.set_generating(CT, SITE, "k", triggered_by="worker")
    assert gen > v1
    assert r.get(key) == raw
    assert sql(dsn, "SELECT status FROM biz.ai_cache WHERE id = %s", (gen,)) == [("generating",)]
    hits = other.redis.stats.hits
    assert other.get_latest(CT, SITE, "k")["id"] == v1
    assert other.get_many(CT, SITE, ["k"])["k"]["id"] == v1
    assert other.redis.stats.hits == hits + 2
    assert [h["id"] for h in other.get_history(CT, SITE, "k")] == [gen, v1]


def test_finalize_cache_is_seen_by_another_process_at_once(cache: TieredCache, other: TieredCache,
                                                           r: redis.Redis, dsn: str) -> None:
    """After finalize_cache returns True, another process reads the finalized row, with its own type's expiry."""
    v1 = cache.write_cache(CT, SITE, "k", {"v": 1})
    gen = cache.set_generating(CT, SITE, "k")
    assert other.get_latest(CT, SITE, "k")["id"] == v1
    assert cache.finalize_cache(gen, {"v": "final", "列表": [1, 2]}, score=5) is True
    stored = entry_of(r, cache, CT, SITE, "k")
    assert stored["id"] == gen and stored["status"] == "valid"
    got = other.get_latest(CT, SITE, "k")
    assert got["id"] == gen and got["result_json"] == {"v": "final", "列表": [1, 2]} and got["score"] == 5
    assert got["expires_at"] is not None
    assert_expiry(r, cache.keyset(CT, SITE, "k").entry, expires_ms_in_pg(dsn, gen))
    same(got, cache.store.get_latest(CT, SITE, "k"))


def test_finalize_of_a_non_generating_row_changes_nothing(cache: TieredCache, r: redis.Redis, dsn: str) -> None:
    """finalize_cache of a valid, an already finalized or a missing row returns False and leaves Redis as it was."""
    v1 = cache.write_cache(CT, SITE, "k", {"v": 1})
    gen = cache.set_generating(CT, SITE, "k")
    assert cache.finalize_cache(gen, {"v": 2}) is True
    cache.get_history(CT, SITE, "k")
    ks = cache.keyset(CT, SITE, "k")
    snapshot = {k: r.dump(k) for k in r.keys("*")}
    ttl = expires_at_ms(r, ks.entry)[0]
    table = sql(dsn, "SELECT id, result_json, status, score FROM biz.ai_cache ORDER BY id")
    assert cache.finalize_cache(v1, {"v": "again"}) is False
    assert cache.finalize_cache(gen, {"v": "again"}, score=1) is False
    assert cache.finalize_cache(999_999, {"v": "none"}) is False
    assert {k: r.dump(k) for k in r.keys("*")} == snapshot
    assert r.exists(ks.lease) == 0, "the unused writer lease must be given back"
    assert_expiry(r, ks.entry, ttl)
    assert sql(dsn, "SELECT id, result_json, status, score FROM biz.ai_cache ORDER BY id") == table
    assert cache.get_latest(CT, SITE, "k")["result_json"] == {"v": 2}


def test_invalidate_caches_a_negative_entry_seen_by_another_process(cache: TieredCache, other: TieredCache,
                                                                    r: redis.Redis, dsn: str) -> None:
    """After invalidate returns, the entry is a negative one and another process reads None from Redis."""
    cache.write_cache(CT, SITE, "k", {"v": 1})
    cache.write_cache(CT, SITE, "k", {"v": 2})
    assert other.get_latest(CT, SITE, "k") is not None
    assert cache.invalidate(CT, SITE, "k") == 2
    assert r.get(cache.keyset(CT, SITE, "k").entry) == b"null"
    hits = other.redis.stats.hits
    assert other.get_latest(CT, SITE, "k") is None
    assert other.get_many(CT, SITE, ["k"]) == {"k": None}
    assert other.redis.stats.hits == hits + 2
    assert sql(dsn, "SELECT DISTINCT status FROM biz.ai_cache") == [("invalidated",)]
    assert cache.invalidate(CT, SITE, "k") == 0


def test_invalidate_site_drops_exactly_the_changed_keys(cache: TieredCache, other: TieredCache,
                                                        r: redis.Redis) -> None:
    """invalidate_site drops the Redis keys of its site's keys that have rows, and no other site's or type's key."""
    for site in (SITE, OTHER_SITE):
        cache.write_cache(CT, site, "a", {"v": "a"})
        cache.write_cache(CT2, site, "b", {"v": "b"})
        cache.set_generating(CT, site, "only-placeholder")
    for site in (SITE, OTHER_SITE):
        for ct, t in ((CT, "a"), (CT2, "b"), (CT, "only-placeholder"), (CT, "never-written")):
            other.get_latest(ct, site, t)
            other.get_history(ct, site, t)
    keys_before = {k: r.dump(k) for k in r.keys("*")}
    assert cache.invalidate_site(SITE, cache_type=CT2) == 1
    b_keys = cache.keyset(CT2, SITE, "b")
    assert {k.decode() for k in keys_before} - {k.decode() for k in r.keys("*")} == {
        b_keys.entry, b_keys.history, b_keys.writer}
    assert other.get_latest(CT, SITE, "a")["result_json"] == {"v": "a"}
    assert other.get_latest(CT2, SITE, "b") is None
    keys_before = {k: r.dump(k) for k in r.keys("*")}
    assert cache.invalidate_site(SITE) == 1
    gone = {k.decode() for k in keys_before} - {k.decode() for k in r.keys("*")}
    a_keys = cache.keyset(CT, SITE, "a")
    # The changed key, and the site's keys that have rows but nothing valid (b, invalidated above; a key
    # with only a placeholder): another writer's invalidation of such a key may still be on its way to Redis.
    b_keys, placeholder = cache.keyset(CT2, SITE, "b"), cache.keyset(CT, SITE, "only-placeholder")
    assert gone == {a_keys.entry, a_keys.history, a_keys.writer, b_keys.entry, placeholder.entry, placeholder.history}
    for k, v in keys_before.items():  # everything else untouched, other site included
        if k.decode() not in gone:
            assert r.dump(k) == v, k
    for ct, t, v in ((CT, "a", "a"), (CT2, "b", "b")):
        assert entry_of(r, cache, ct, OTHER_SITE, t)["result_json"] == {"v": v}
        assert other.get_latest(ct, OTHER_SITE, t)["result_json"] == {"v": v}
    assert other.get_latest(CT, SITE, "a") is None
    assert other.get_many(CT, SITE, ["a", "never-written"]) == {"a": None, "never-written": None}


# -- site isolation -----------------------------------------------------------------------------


def test_sites_never_cross_in_any_read(cache: TieredCache, other: TieredCache, r: redis.Redis) -> None:
    """The same cache_type/target_id in two venues stays apart in every read, cold and from Redis."""
    ids = {site: cache.write_cache(CT, site, "same", {"site": site}) for site in (SITE, OTHER_SITE)}
    r.flushall()  # start cold: reads must fill per site
    for round_ in ("cold", "hot"):
        for site in (SITE, OTHER_SITE):
            assert other.get_latest(CT, site, "same")["id"] == ids[site], round_
            assert other.get_many(CT, site, ["same", "x"])["same"]["id"] == ids[site], round_
            assert [h["id"] for h in other.get_history(CT, site, "same", limit=5)] == [ids[site]], round_
            assert entry_of(r, cache, CT, site, "same")["site_id"] == site
    assert other.get_latest(CT, 303, "same") is None
    cache.invalidate(CT, SITE, "same")
    assert other.get_latest(CT, SITE, "same") is None
    assert other.get_latest(CT, OTHER_SITE, "same")["id"] == ids[OTHER_SITE]
    assert other.get_many(CT, OTHER_SITE, ["same"])["same"]["id"] == ids[OTHER_SITE]
    assert cache.keyset(CT, SITE, "same").entry != cache.keyset(CT, OTHER_SITE, "same").entry


# -- key injectivity ----------------------------------------------------------------------------

_NASTY = st.sampled_from([":", "{", "}", "%", "*", "\n", "%3A", "%25", "{}", "e:", "::", "?", "[", "]", "\\", " ",
                          "中", "é", "🏸", "\u200b", "\r", "\t"])
_ANY_CHAR = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
_PART = st.one_of(_NASTY, _ANY_CHAR)
TARGET_IDS = st.one_of(
    st.lists(_PART, min_size=1, max_size=12).map("".join),
    st.text(_ANY_CHAR, min_size=1, max_size=30),
    st.lists(_PART, min_size=1, max_size=60).map(lambda parts: ("".join(parts) * 512)[:512]),
    st.lists(_PART, min_size=1, max_size=60).map(lambda parts: ("".join(parts) * 512)[:511]),
).filter(lambda s: 0 < len(s) <= 512)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=TARGET_IDS, b=TARGET_IDS, site=st.sampled_from([1, -1, 0, 2**63 - 1]))
def test_adversarial_target_ids_never_collide(a: str, b: str, site: int, cache: TieredCache, r: redis.Redis) -> None:
    """Two different adversarial target ids written to the real server each read back their own row, cold and hot."""
    assume(a != b)
    ka, kb = cache.keyset(CT, site, a), cache.keyset(CT, site, b)
    assert not set(ka.all) & set(kb.all)
    assert cache.keys.parse_entry(ka.entry) == (CT, site, a)
    ia = cache.write_cache(CT, site, a, {"who": a})
    ib = cache.write_cache(CT, site, b, {"who": b})
    assert orjson.loads(r.get(ka.entry))["id"] == ia and orjson.loads(r.get(kb.entry))["id"] == ib
    assert cache.get_latest(CT, site, a)["id"] == ia
    assert cache.get_latest(CT, site, b)["id"] == ib
    r.delete(ka.entry, kb.entry)
    got = cache.get_many(CT, site, [a, b])
    assert got[a]["id"] == ia and got[a]["target_id"] == a and got[b]["id"] == ib and got[b]["target_id"] == b
    assert orjson.loads(r.get(ka.entry))["id"] == ia and orjson.loads(r.get(kb.entry))["id"] == ib
    assert cache.invalidate(CT, site, a) >= 1
    assert cache.get_latest(CT, site, a) is None
    assert cache.get_latest(CT, site, b)["id"] == ib


# -- bad input ----------------------------------------------------------------------------------

NAIVE = datetime(2030, 1, 1, 12, 0)
BAD_CALLS: dict[str, Callable[[TieredCache], Any]] = {
    "latest_empty_type": lambda c: c.get_latest("", SITE, "t"),
    "latest_long_type": lambda c: c.get_latest("x" * 129, SITE, "t"),
    "latest_site_str": lambda c: c.get_latest(CT, "101", "t"),
    "latest_site_bool": lambda c: c.get_latest(CT, True, "t"),
    "latest_site_overflow": lambda c: c.get_latest(CT, 2**63, "t"),
    "latest_empty_target": lambda c: c.get_latest(CT, SITE, ""),
    "latest_nul_target": lambda c: c.get_latest(CT, SITE, "a\x00b"),
    "latest_long_target": lambda c: c.get_latest(CT, SITE, "x" * 513),
    "latest_int_target": lambda c: c.get_latest(CT, SITE, 5),
    "latest_surrogate_target": lambda c: c.get_latest(CT, SITE, "a\ud800"),
    "many_str": lambda c: c.get_many(CT, SITE, "abc"),
    "many_none_item": lambda c: c.get_many(CT, SITE, ["a", None]),
    "many_empty_item": lambda c: c.get_many(CT, SITE, ["a", ""]),
    "many_too_many": lambda c: c.get_many(CT, SITE, [str(i) for i in range(1001)]),
    "many_bad_site": lambda c: c.get_many(CT, 1.5, ["a"]),
    "many_surrogate_item": lambda c: c.get_many(CT, SITE, ["a", "\udc00"]),
    "history_limit_0": lambda c: c.get_history(CT, SITE, "t", limit=0),
    "history_limit_101": lambda c: c.get_history(CT, SITE, "t", limit=101),
    "history_limit_bool": lambda c: c.get_history(CT, SITE, "t", limit=True),
    "history_limit_str": lambda c: c.get_history(CT, SITE, "t", limit="2"),
    "history_bad_key": lambda c: c.get_history(CT, SITE, ""),
    "write_list_result": lambda c: c.write_cache(CT, SITE, "t", [1, 2]),
    "write_nan": lambda c: c.write_cache(CT, SITE, "t", {"x": float("nan")}),
    "write_inf_nested": lambda c: c.write_cache(CT, SITE, "t", {"x": [1, {"y": float("-inf")}]}),
    "write_set_value": lambda c: c.write_cache(CT, SITE, "t", {"x": {1, 2}}),
    "write_int_key": lambda c: c.write_cache(CT, SITE, "t", {1: "a"}),
    "write_nul_in_json": lambda c: c.write_cache(CT, SITE, "t", {"x": "a\x00"}),
    "write_too_big": lambda c: c.write_cache(CT, SITE, "t", {"x": "y" * (1 << 20)}),
    "write_score_bool": lambda c: c.write_cache(CT, SITE, "t", {}, score=True),
    "write_score_overflow": lambda c: c.write_cache(CT, SITE, "t", {}, score=2**31),
    "write_score_str": lambda c: c.write_cache(CT, SITE, "t", {}, score="5"),
    "write_naive_expiry": lambda c: c.write_cache(CT, SITE, "t", {}, expires_at=NAIVE),
    "write_str_expiry": lambda c: c.write_cache(CT, SITE, "t", {}, expires_at="2030-01-01T00:00:00+08:00"),
    "write_empty_triggered_by": lambda c: c.write_cache(CT, SITE, "t", {}, triggered_by=""),
    "write_surrogate_target": lambda c: c.write_cache(CT, SITE, "\ud800", {}),
    "write_surrogate_triggered_by": lambda c: c.write_cache(CT, SITE, "t", {}, triggered_by="\udc00"),
    "write_bad_site": lambda c: c.write_cache(CT, None, "t", {}),
    "generating_bad_triggered_by": lambda c: c.set_generating(CT, SITE, "t", triggered_by=7),
    "generating_bad_key": lambda c: c.set_generating(CT, SITE, "x" * 600),
    "generating_surrogate_triggered_by": lambda c: c.set_generating(CT, SITE, "t", triggered_by="\udc00"),
    "finalize_id_0": lambda c: c.finalize_cache(0, {}),
    "finalize_id_negative": lambda c: c.finalize_cache(-1, {}),
    "finalize_id_bool": lambda c: c.finalize_cache(True, {}),
    "finalize_id_str": lambda c: c.finalize_cache("1", {}),
    "finalize_list_result": lambda c: c.finalize_cache(1, ["x"]),
    "finalize_score_bool": lambda c: c.finalize_cache(1, {}, score=False),
    "finalize_empty_type": lambda c: c.finalize_cache(1, {}, cache_type=""),
    "invalidate_bad_key": lambda c: c.invalidate(CT, SITE, "a\x00"),
    "invalidate_surrogate_target": lambda c: c.invalidate(CT, SITE, "\udc00"),
    "invalidate_site_str": lambda c: c.invalidate_site("101"),
    "invalidate_site_empty_type": lambda c: c.invalidate_site(SITE, cache_type=""),
    "invalidate_site_surrogate_type": lambda c: c.invalidate_site(SITE, cache_type="\udc00"),
    "keyset_bad": lambda c: c.keyset(CT, SITE, ""),
}


@pytest.mark.parametrize("call", sorted(BAD_CALLS))
def test_bad_input_raises_invalid_input_before_any_io(call: str, cache: TieredCache, r: redis.Redis,
                                                      dsn: str) -> None:
    """Every malformed argument raises InvalidInput before touching Redis (no command at all) or PostgreSQL."""
    assert r.dbsize() == 0
    before = r.info("stats")["total_commands_processed"]
    with pytest.raises(InvalidInput):
        BAD_CALLS[call](cache)
    assert r.info("stats")["total_commands_processed"] - before == 1, "a Redis command was sent"
    assert r.dbsize() == 0
    assert row_count(dsn) == 0
    assert sql(dsn, "SELECT count(*) FROM biz.ai_cache_changes")[0][0] == 0
    assert cache.redis.pending == 0


# -- stats and lifecycle ------------------------------------------------------------------------


def test_stats_and_keyset_report_what_happened(cache: TieredCache, r: redis.Redis) -> None:
    """stats() counts misses, fills, hits and write-throughs; keyset() names the keys actually used in Redis."""
    cache.get_latest(CT, SITE, "s")
    cache.get_latest(CT, SITE, "s")
    cache.write_cache(CT, SITE, "s", {"v": 1})
    s = cache.stats()["redis"]
    assert (s["misses"], s["fills"], s["hits"], s["writes_through"]) == (1, 1, 1, 1)
    assert s["breaker_trips"] == 0 and s["pending_kills"] == 0
    ks = cache.keyset(CT, SITE, "s")
    # the entry, and beside it the id of the transaction that wrote it through (same expiry)
    assert sorted(r.keys("*")) == sorted([ks.entry.encode(), ks.writer.encode()])
    assert_expiry(r, ks.writer, expires_at_ms(r, ks.entry)[0])


# -- Redis failures -----------------------------------------------------------------------------


class CuttableProxy:
    """A TCP relay in front of the real redis-server that can refuse one client's traffic and come back."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.port = s.getsockname()[1]
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Refuse new connections and reset the live ones: to this client Redis is down, to others it is not."""
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.fault
def test_every_method_works_from_postgres_while_redis_is_down(cache: TieredCache, redis_server: Any,
                                                              dsn: str) -> None:
    """With redis-server stopped every method answers from PostgreSQL, each call within 0.3 s."""
    v1 = cache.write_cache(CT, SITE, "k", {"v": 1})
    cache.get_latest(CT, SITE, "k")
    cache.get_history(CT, SITE, "k")
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        return out

    redis_server.stop()
    try:
        assert timed("get_latest", lambda: cache.get_latest(CT, SITE, "k"))["id"] == v1
        v2 = timed("write_cache", lambda: cache.write_cache(CT, SITE, "k", {"v": 2}))
        assert timed("get_latest2", lambda: cache.get_latest(CT, SITE, "k"))["id"] == v2
        assert timed("get_many", lambda: cache.get_many(CT, SITE, ["k", "x"])) == {
            "k": cache.store.get_latest(CT, SITE, "k"), "x": None}
        assert timed("get_history", lambda: cache.get_history(CT, SITE, "k", limit=5)) == cache.store.get_history(
            CT, SITE, "k", limit=5)
        gen = timed("set_generating", lambda: cache.set_generating(CT, SITE, "k"))
        assert timed("get_latest3", lambda: cache.get_latest(CT, SITE, "k"))["id"] == v2
        assert timed("finalize_cache", lambda: cache.finalize_cache(gen, {"v": 3})) is True
        assert timed("get_latest4", lambda: cache.get_latest(CT, SITE, "k"))["id"] == gen
        assert timed("invalidate", lambda: cache.invalidate(CT, SITE, "k")) == 3
        assert timed("get_latest5", lambda: cache.get_latest(CT, SITE, "k")) is None
        cache.store.write_cache(CT2, SITE, "j", {"v": 1})
        assert timed("invalidate_site", lambda: cache.invalidate_site(SITE)) == 1
        assert timed("get_many2", lambda: cache.get_many(CT2, SITE, ["j"])) == {"j": None}
        assert cache.redis.pending == 2  # kills owed for k and j
        statuses = dict(sql(dsn, "SELECT id, status FROM biz.ai_cache"))
        assert statuses == {v1: "invalidated", v2: "invalidated", gen: "invalidated", gen + 1: "invalidated"}
    finally:
        redis_server.start()
    slow = {k: round(v, 3) for k, v in timings.items() if v > 0.3}
    assert not slow, f"calls slower than 0.3 s with Redis down: {slow}"
    assert _wait_for(lambda: cache.redis.pending == 0, 5.0)
    assert cache.get_latest(CT2, SITE, "j") is None


@pytest.mark.fault
def test_no_stale_entry_after_redis_restart(cache: TieredCache, other: TieredCache, redis_server: Any,
                                            r: redis.Redis) -> None:
    """A key rewritten while Redis was down is read at its new value by every process once Redis is back."""
    cache.write_cache(CT, SITE, "k", {"v": 1})
    assert other.get_latest(CT, SITE, "k")["result_json"] == {"v": 1}
    redis_server.stop()
    try:
        v2 = cache.write_cache(CT, SITE, "k", {"v": 2})
        assert cache.redis.pending == 1
    finally:
        redis_server.start()
    assert cache.get_latest(CT, SITE, "k")["id"] == v2
    assert other.get_latest(CT, SITE, "k")["id"] == v2
    assert _wait_for(lambda: cache.redis.pending == 0, 5.0)
    stored = entry_of(r, cache, CT, SITE, "k")
    assert stored == "ABSENT" or stored["id"] == v2
    assert cache.get_latest(CT, SITE, "k")["id"] == v2


@pytest.mark.fault
def test_owed_kill_lands_when_this_process_reaches_redis_again(dsn: str, redis_url: str, redis_server: Any,
                                                               other: TieredCache, r: redis.Redis) -> None:
    """A write made while only this process is cut off from Redis owes a kill; the stale entry goes once it is back."""
    proxy = CuttableProxy(redis_server.port)
    try:
        with TieredCache.connect(dsn, proxy.url) as cut_off:
            v1 = cut_off.write_cache(CT, SITE, "k", {"v": 1})
            assert other.get_latest(CT, SITE, "k")["id"] == v1
            proxy.cut()
            t0 = time.perf_counter()
            v2 = cut_off.write_cache(CT, SITE, "k", {"v": 2})
            assert cut_off.redis.pending == 1
            assert entry_of(r, other, CT, SITE, "k")["id"] == v1  # the old entry is still in Redis
            assert cut_off.get_latest(CT, SITE, "k")["id"] == v2  # this process reads past Redis
            assert cut_off.get_many(CT, SITE, ["k"])["k"]["id"] == v2
            assert time.perf_counter() - t0 < 0.3
            proxy.restore()
            assert _wait_for(lambda: cut_off.redis.pending == 0, 5.0), "the owed kill never landed"
            assert entry_of(r, other, CT, SITE, "k") == "ABSENT"
            assert other.get_latest(CT, SITE, "k")["id"] == v2
            assert cut_off.get_latest(CT, SITE, "k")["id"] == v2
    finally:
        proxy.cut()


def test_open_breaker_still_kills_once_and_reads_skip_redis(cache: TieredCache, other: TieredCache,
                                                              r: redis.Redis) -> None:
    """With the breaker open reads skip Redis, yet a write's kill is still tried once and lands if Redis answers."""
    v1 = cache.write_cache(CT, SITE, "k", {"v": 1})
    cache.get_history(CT, SITE, "k")
    ks = cache.keyset(CT, SITE, "k")
    assert r.exists(ks.entry, ks.history) == 2

    def trip() -> None:
        for _ in range(cache.redis.breaker.threshold):
            cache.redis.breaker.failure()
        assert not cache.redis.breaker.allow()

    trip()
    hits, misses = cache.redis.stats.hits, cache.redis.stats.misses
    sql(cache.store.dsn, """UPDATE biz.ai_cache SET result_json = '{"v": "behind"}'""")
    assert cache.get_latest(CT, SITE, "k")["result_json"] == {"v": "behind"}  # PostgreSQL, not the entry
    assert cache.get_many(CT, SITE, ["k"])["k"]["result_json"] == {"v": "behind"}
    assert (cache.redis.stats.hits, cache.redis.stats.misses) == (hits, misses), "Redis was read while open"
    assert other.get_latest(CT, SITE, "k")["result_json"] == {"v": 1}  # the entry is still there for others

    trip()
    v2 = cache.write_cache(CT, SITE, "k", {"v": 2})
    assert cache.redis.pending == 0, "the kill reached Redis, nothing is owed"
    assert r.exists(ks.entry, ks.history, ks.lease, ks.writer) == 0, "the old entry must not survive the write"
    assert cache.redis.breaker.allow(), "a kill that worked closes the breaker"
    assert other.get_latest(CT, SITE, "k")["id"] == v2  # another process at once
    assert cache.get_latest(CT, SITE, "k")["id"] == v2
    assert [h["id"] for h in cache.get_history(CT, SITE, "k")] == [v2, v1]


# -- after close ----------------------------------------------------------------------------------


CLOSED_CALLS: dict[str, Callable[[TieredCache], Any]] = {
    "get_latest": lambda c: c.get_latest(CT, SITE, "c"),
    "get_latest_new_key": lambda c: c.get_latest(CT, SITE, "never-read"),
    "get_many": lambda c: c.get_many(CT, SITE, ["c", "d"]),
    "get_history": lambda c: c.get_history(CT, SITE, "c"),
    "get_latest_json": lambda c: c.get_latest_json(CT, SITE, "c"),
    "get_many_json": lambda c: c.get_many_json(CT, SITE, ["c", "d"]),
    "get_history_json": lambda c: c.get_history_json(CT, SITE, "c"),
    "write_cache": lambda c: c.write_cache(CT, SITE, "c", {"v": "after close"}),
    "set_generating": lambda c: c.set_generating(CT, SITE, "c"),
    "finalize_cache": lambda c: c.finalize_cache(1, {"v": "after close"}),
    "invalidate": lambda c: c.invalidate(CT, SITE, "c"),
    "invalidate_site": lambda c: c.invalidate_site(SITE),
    "keyset": lambda c: c.keyset(CT, SITE, "c"),
}


@pytest.mark.parametrize("near", [False, True], ids=["redis", "near+redis"])
def test_every_call_after_close_raises_closed_and_sends_nothing(dsn: str, redis_url: str, r: redis.Redis,
                                                                near: bool) -> None:
    """A closed cache refuses every call with Closed before any I/O: no connection to Redis or PostgreSQL, no row."""
    from faultproxy import FaultProxy

    from tiered_cache import Closed, TieredCacheError

    pg_port = int(dsn.rsplit(":", 1)[1].split("/")[0])
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    pg_proxy, redis_proxy = FaultProxy(pg_port).start(), FaultProxy(redis_port).start()
    try:
        c = TieredCache.connect(dsn.replace(f":{pg_port}/", f":{pg_proxy.port}/"),
                                f"redis://127.0.0.1:{redis_proxy.port}/0", redis_timeout=1.0,
                                near_max_entries=100 if near else 0)
        c.write_cache(CT, SITE, "c", {"v": 1})
        assert c.get_latest(CT, SITE, "c")["result_json"] == {"v": 1}
        c.close()
        c.close()  # idempotent
        rows, keys = row_count(dsn), sorted(r.keys("*"))
        accepted = (pg_proxy.accepted, redis_proxy.accepted)
        commands = r.info("stats")["total_commands_processed"]
        for name, call in CLOSED_CALLS.items():
            with pytest.raises(Closed) as caught:
                call(c)
            assert isinstance(caught.value, TieredCacheError) and "closed" in str(caught.value), name
        assert r.info("stats")["total_commands_processed"] - commands == 1, "a Redis command was sent"
        assert (pg_proxy.accepted, redis_proxy.accepted) == accepted, "a connection was opened after close()"
        assert (row_count(dsn), sorted(r.keys("*"))) == (rows, keys)
        assert c.stats()["redis"]["writes_through"] == 1  # counters stay readable
    finally:
        pg_proxy.close()
        redis_proxy.close()
