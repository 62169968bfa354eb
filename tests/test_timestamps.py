"""Timestamps Python's datetime cannot hold: 'infinity', '-infinity', years past 9999 in the store's zone.

Rows are inserted with raw SQL, as an ETL job or the old service would, and read through every path
(get_latest, get_history, get_many, the rows a write or finalize returns, the cache over Redis).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
import redis

from tiered_cache import ExpiryPolicy, InvalidInput, PostgresStore, TieredCache
from tiered_cache.policy import validation as check
from tiered_cache.policy.entries import expires_at_ms

UTC = timezone.utc
MAX_UTC = "9999-12-31T23:59:59.999999+00:00"  # an infinite or too-late created_at, clamped
MIN_UTC = "0001-01-01T00:00:00+00:00"  # a '-infinity' (or too-early) timestamp, clamped
LAST_SHANGHAI_INSTANT = datetime(9999, 12, 31, 15, 59, 59, 999999, tzinfo=UTC)  # 23:59:59.999999 +08:00


@pytest.fixture
def store(make_store: Any, dsn: str) -> PostgresStore:
    """A PostgresStore, or (api='async') a blocking view of an AsyncPostgresStore, on the emptied database."""
    return make_store(dsn)


def q(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """One autocommit statement with psycopg directly; rows if any."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def etl_row(dsn: str, target_id: str = "t", *, created_at: str = "now()", expires_at: str = "NULL",
            status: str = "valid", value: int = 0) -> int:
    """Insert a row the way ETL does: timestamps as SQL literals, never through Python's datetime."""
    return q(
        dsn,
        "INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, status, created_at, expires_at)"
        f" VALUES ('app3_clue', 1, %s, jsonb_build_object('v', %s::int), %s, {created_at}, {expires_at})"
        " RETURNING id",
        (target_id, value, status),
    )[0][0]


# ============================================================================ reads


def test_an_expiry_of_infinity_is_served_as_no_expiry(store: PostgresStore, dsn: str) -> None:
    """expires_at = 'infinity' reads as expires_at None in get_latest, get_history and a get_many page."""
    rid = etl_row(dsn, "inf", expires_at="'infinity'")
    neighbour = store.write_cache("app3_clue", 1, "ok", {"v": 1})
    got = store.get_latest("app3_clue", 1, "inf")
    assert got is not None and got["id"] == rid and got["expires_at"] is None
    assert got["created_at"].endswith("+08:00")
    assert [h["id"] for h in store.get_history("app3_clue", 1, "inf")] == [rid]
    assert store.get_history("app3_clue", 1, "inf")[0]["expires_at"] is None
    page = store.get_many("app3_clue", 1, ["ok", "inf", "missing"])
    assert page["inf"] == got
    assert page["ok"] is not None and page["ok"]["id"] == neighbour and page["ok"]["expires_at"].endswith("+08:00")
    assert page["missing"] is None


def test_an_expiry_of_minus_infinity_is_never_served_and_sweep_expires_it(store: PostgresStore, dsn: str) -> None:
    """expires_at = '-infinity' is already expired: not served, shown in history as year 1, swept to 'expired'."""
    older = store.write_cache("app3_clue", 1, "t", {"v": "older"})
    rid = etl_row(dsn, "t", expires_at="'-infinity'")
    assert store.get_latest("app3_clue", 1, "t")["id"] == older  # type: ignore[index]
    assert store.get_many("app3_clue", 1, ["t"])["t"]["id"] == older  # type: ignore[index]
    hist = store.get_history("app3_clue", 1, "t")
    assert [h["id"] for h in hist] == [rid, older]
    assert hist[0]["expires_at"] == MIN_UTC
    assert store.sweep().expired == 1
    assert q(dsn, "SELECT status FROM biz.ai_cache WHERE id = %s", (rid,)) == [("expired",)]


def test_infinite_created_at_is_clamped_and_keeps_its_order(store: PostgresStore, dsn: str) -> None:
    """created_at 'infinity' / '-infinity' read as the largest / smallest datetime in UTC, in SQL's order."""
    normal = store.write_cache("app3_clue", 1, "t", {"v": "normal"})
    first = etl_row(dsn, "t", created_at="'-infinity'", value=1)
    last = etl_row(dsn, "t", created_at="'infinity'", value=2)
    got = store.get_latest("app3_clue", 1, "t")
    assert got is not None and got["id"] == last and got["created_at"] == MAX_UTC
    assert store.get_many("app3_clue", 1, ["t"])["t"] == got
    hist = store.get_history("app3_clue", 1, "t", limit=10)
    assert [h["id"] for h in hist] == [last, normal, first]
    assert hist[2]["created_at"] == MIN_UTC
    created = [datetime.fromisoformat(h["created_at"]) for h in hist]
    assert created == sorted(created, reverse=True)


def test_a_row_past_year_9999_in_the_store_zone_is_read_as_its_instant_in_utc(store: PostgresStore, dsn: str) -> None:
    """9999-12-31 20:00 UTC is 10000-01-01 04:00 in Shanghai: read back exactly, rendered in UTC."""
    rid = etl_row(dsn, "t", created_at="'9999-12-31 19:00:00+00'", expires_at="'9999-12-31 20:00:00.5+00'")
    got = store.get_latest("app3_clue", 1, "t")
    assert got is not None and got["id"] == rid
    assert got["created_at"] == "9999-12-31T19:00:00+00:00"
    assert got["expires_at"] == "9999-12-31T20:00:00.500000+00:00"
    assert store.get_history("app3_clue", 1, "t")[0]["expires_at"] == got["expires_at"]
    # a year beyond what even UTC can hold: no expiry, as 'infinity'
    far = etl_row(dsn, "far", expires_at="'20000-06-01 00:00:00+00'")
    assert store.get_many("app3_clue", 1, ["far"])["far"]["id"] == far  # type: ignore[index]
    assert store.get_latest("app3_clue", 1, "far")["expires_at"] is None  # type: ignore[index]


def test_a_normal_read_is_one_statement_and_an_out_of_range_one_is_read_again(
    store: PostgresStore, api: str, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C loader stays on the hot path; only a result it cannot load is fetched again with the safe loader."""
    store.write_cache("app3_clue", 1, "ok", {"v": 1})
    etl_row(dsn, "inf", expires_at="'infinity'")
    store.get_latest("app3_clue", 1, "ok")  # warm the pool
    statements: list[str] = []
    cls: Any = psycopg.Cursor if api == "sync" else psycopg.AsyncCursor
    real = cls.execute

    def counting(self, query, params=None, **kw):  # type: ignore[no-untyped-def]
        statements.append(str(query))
        return real(self, query, params, **kw)  # the async one returns its coroutine

    monkeypatch.setattr(cls, "execute", counting)
    assert store.get_latest("app3_clue", 1, "ok") is not None
    assert len(statements) == 1
    statements.clear()
    assert store.get_latest("app3_clue", 1, "inf") is not None
    assert len(statements) == 2


# ============================================================================ writes


def test_a_write_over_an_infinite_row_returns_its_answer(store: PostgresStore, dsn: str) -> None:
    """write and finalize return (RETURNING) the key's servable row even when it holds infinite timestamps."""
    etl = etl_row(dsn, "t", created_at="'infinity'", expires_at="'infinity'")
    params = store.prepare_write("app3_clue", 1, "t", {"v": "new"})
    outcome = store.write(params)
    assert outcome.changed and outcome.id is not None and outcome.id > etl
    # the ETL row's created_at 'infinity' sorts first in SQL, so it is still what get_latest serves
    assert outcome.latest is not None and outcome.latest["id"] == etl and outcome.latest["expires_at"] is None
    assert outcome.latest == store.get_latest("app3_clue", 1, "t")
    gid = store.set_generating("app3_clue", 1, "t")
    assert store.finalize_cache(gid, {"v": "final"}) is True
    fin = store.prepare_finalize(store.set_generating("app3_clue", 1, "t"), {"v": "again"})
    assert store.resolve_finalize(fin) is not None
    done = store.finalize(fin)
    assert done.changed and done.latest == store.get_latest("app3_clue", 1, "t")


def test_an_expiry_the_store_zone_cannot_render_is_refused_before_io(store: PostgresStore, dsn: str) -> None:
    """expires_at 9999-12-31 20:00 UTC (year 10000 in Shanghai) is InvalidInput('expires_at'); nothing is written."""
    with pytest.raises(InvalidInput) as info:
        store.write_cache("app3_clue", 1, "t", {"v": 1}, expires_at=datetime(9999, 12, 31, 20, 0, tzinfo=UTC))
    assert info.value.field == "expires_at" and "Asia/Shanghai" in str(info.value)
    assert q(dsn, "SELECT count(*) FROM biz.ai_cache") == [(0,)]
    # the last instant Shanghai can render is accepted and read back unchanged
    store.write_cache("app3_clue", 1, "t", {"v": 2}, expires_at=LAST_SHANGHAI_INSTANT)
    assert store.get_latest("app3_clue", 1, "t")["expires_at"] == "9999-12-31T23:59:59.999999+08:00"  # type: ignore[index]


def test_the_earliest_expiry_a_western_zone_cannot_render_is_refused(make_store: Any, dsn: str) -> None:
    """In America/New_York, 0001-01-01 02:00 UTC falls in year 0: refused before I/O as well."""
    with make_store(dsn, policy=ExpiryPolicy(zone="America/New_York")) as s:
        with pytest.raises(InvalidInput) as info:
            s.write_cache("app3_clue", 1, "t", {"v": 1}, expires_at=datetime(1, 1, 1, 2, 0, tzinfo=UTC))
        assert info.value.field == "expires_at"
    assert q(dsn, "SELECT count(*) FROM biz.ai_cache") == [(0,)]


# ============================================================================ through the cache


def test_the_cache_keeps_an_infinite_expiry_in_redis_under_the_no_expiry_cap(dsn: str, redis_url: str) -> None:
    """An 'infinity' row is cached in Redis for no_expiry_ttl; a row past year 9999 in Shanghai for its own expiry."""
    inf = etl_row(dsn, "inf", expires_at="'infinity'")
    far = etl_row(dsn, "far", expires_at="'9999-12-31 20:00:00+00'")
    client = redis.Redis.from_url(redis_url)
    try:
        with TieredCache.connect(dsn, redis_url, no_expiry_ttl=60.0, redis_timeout=1.0) as cache:
            for target, rid in (("inf", inf), ("far", far)):
                first = cache.get_latest("app3_clue", 1, target)
                assert first is not None and first["id"] == rid
                entry = cache.keyset("app3_clue", 1, target).entry
                deadline = time.monotonic() + 10
                while not client.exists(entry) and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert client.exists(entry), f"{target}: no Redis entry"
                assert cache.get_latest("app3_clue", 1, target) == first
            inf_ttl = client.pttl(cache.keyset("app3_clue", 1, "inf").entry)
            far_ttl = client.pttl(cache.keyset("app3_clue", 1, "far").entry)
    finally:
        client.close()
    assert 0 < inf_ttl <= 60_000, inf_ttl
    assert far_ttl > 365 * 24 * 3600 * 1000, far_ttl


# ============================================================================ pure: the fallback and the policy


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("infinity", MAX_UTC),
        ("-infinity", MIN_UTC),
        ("10000-01-01 04:00:00+08", "9999-12-31T20:00:00+00:00"),
        ("10000-01-01 04:05:43.5+08:05:43", "9999-12-31T20:00:00.500000+00:00"),
        ("10000-01-01 08:00:00+08", MAX_UTC),  # 10000-01-01 00:00 UTC: beyond datetime, clamped
        ("10000-02-29 00:00:00+00", MAX_UTC),  # 10000 is a leap year
        ("294276-12-31 23:59:59.999999+08", MAX_UTC),
        ("0001-12-31 20:00:00-08 BC", "0001-01-01T04:00:00+00:00"),  # 1 BC, back in range once in UTC
        ("0001-01-01 00:00:00+08 BC", MIN_UTC),
        ("4714-11-24 00:00:00+00 BC", MIN_UTC),
    ],
)
def test_the_fallback_loads_what_the_fast_loader_refuses(text: str, expected: str) -> None:
    """What the safe loader returns for values psycopg's loader raises DataError on."""
    from tiered_cache.tiers._pg_timestamps import beyond_datetime

    assert beyond_datetime(text.encode()).isoformat() == expected


def test_the_fallback_still_refuses_text_it_cannot_parse() -> None:
    """Not a timestamp in ISO style: the DataError stands."""
    from tiered_cache.tiers._pg_timestamps import beyond_datetime

    with pytest.raises(psycopg.DataError):
        beyond_datetime(b"12/31/10000 04:00:00 CST")


def test_expires_at_ms_copes_with_every_rendering() -> None:
    """The Redis and near tiers' expiry: None for no expiry; far future, clamped past and UTC renderings all work."""
    assert expires_at_ms({"expires_at": None}) is None
    assert expires_at_ms({"expires_at": "9999-12-31T20:00:00+00:00"}) == 253402286400000
    assert expires_at_ms({"expires_at": "9999-12-31T23:59:59.999999+08:00"}) == 253402271999999
    assert expires_at_ms({"expires_at": MIN_UTC}) < 0  # '-infinity': never servable, never cached


def test_validation_refuses_an_aware_datetime_the_zone_cannot_render() -> None:
    """optional_aware_datetime with a zone: OverflowError in the zone becomes InvalidInput naming the field."""
    shanghai = ZoneInfo("Asia/Shanghai")
    assert check.optional_aware_datetime("expires_at", LAST_SHANGHAI_INSTANT, shanghai) == LAST_SHANGHAI_INSTANT
    for bad in (LAST_SHANGHAI_INSTANT + timedelta(microseconds=1), datetime.max.replace(tzinfo=UTC),
                datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))):
        with pytest.raises(InvalidInput) as info:
            check.optional_aware_datetime("expires_at", bad, shanghai)
        assert info.value.field == "expires_at"


def test_the_hot_read_path_keeps_psycopgs_own_loader(dsn: str, figure: Any, request: pytest.FixtureRequest) -> None:
    """Pooled sessions load timestamptz with psycopg's loader (C when installed); the safe one's cost, measured.

    Sync only: the async pool's sessions are set up by the same code (_configure), generated from one source.
    """
    store = PostgresStore(dsn)
    request.addfinalizer(store.close)
    from psycopg.pq import Format

    from tiered_cache.tiers import _sql
    from tiered_cache.tiers._pg_timestamps import TIMESTAMPTZ_OID, safe_cursor

    q(dsn, "INSERT INTO biz.ai_cache (cache_type, site_id, target_id, status, expires_at)"
           " SELECT 'app3_clue', 1, 't' || g, 'valid', now() + interval '1 day' FROM generate_series(1, 1000) g")
    q(dsn, "ANALYZE biz.ai_cache")
    ids = [f"t{i}" for i in range(1, 1001)]
    assert all(store.get_many("app3_clue", 1, ids).values())
    params = {"cache_type": "app3_clue", "site_id": 1, "target_ids": ids}
    with store._pool.connection() as conn:
        default = psycopg.adapters.get_loader(TIMESTAMPTZ_OID, Format.TEXT)
        assert conn.adapters.get_loader(TIMESTAMPTZ_OID, Format.TEXT) is default
        timings: dict[str, list[float]] = {"psycopg": [], "safe": []}
        for _ in range(30):  # interleaved, so load on the machine hits both alike
            for name, cursor in (("psycopg", conn.cursor), ("safe", lambda: safe_cursor(conn))):
                t0 = time.perf_counter()
                rows = cursor().execute(_sql.GET_MANY, params, prepare=True).fetchall()
                timings[name].append(time.perf_counter() - t0)
                assert len(rows) == 1000
    med = {k: sorted(v)[len(v) // 2] * 1000 for k, v in timings.items()}
    figure(f"get_many of 1000 rows (2000 timestamps), median of 30: psycopg's {default.__module__} loader "
           f"{med['psycopg']:.2f} ms, safe loader {med['safe']:.2f} ms "
           f"({(med['safe'] - med['psycopg']) / 2000 * 1e6:+.0f} ns per value); reads keep psycopg's")
