"""PostgresStore on a real PostgreSQL: every operation, its return shape, and each defect of the old service."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from tiered_cache import InvalidInput, PostgresStore, StoreUnavailable, SweepReport, TieredCacheError
from tiered_cache.testing import PostgresServer
from tiered_cache.tiers import _sql

SHANGHAI = ZoneInfo("Asia/Shanghai")
UTC = timezone.utc
SEED_LATEST_KEYS = ["id", "cache_type", "site_id", "target_id", "result_json", "score", "triggered_by",
                    "created_at", "expires_at", "status"]
SEED_HISTORY_KEYS = SEED_LATEST_KEYS[:-1]
PAST = datetime(2000, 1, 1, tzinfo=UTC)
FUTURE = datetime(2999, 1, 1, tzinfo=UTC)
# A fixed clock safely in the future, so rows whose expiry derives from it are servable today.
FIXED_NOW = datetime(2031, 5, 17, 2, 0, 0, tzinfo=UTC)  # 10:00 in Shanghai


@pytest.fixture
def store(make_store: Any, dsn: str) -> PostgresStore:
    """A PostgresStore, or (api='async') a blocking view of an AsyncPostgresStore, on the emptied database."""
    return make_store(dsn)


def fixed(now: datetime):  # type: ignore[no-untyped-def]
    """A clock that always says `now`."""
    return lambda: now


def q(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement with psycopg directly (autocommit); rows if it returns any."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def insert(dsn: str, *, cache_type: str = "app3_clue", site_id: int = 1, target_id: str = "t",
           result_json: str = '{"raw": true}', status: str | None = "valid", created_at: Any = None,
           expires_at: datetime | None = None) -> int:
    """Insert a row as another writer (ETL, the old service) would; created_at may be an SQL interval ago."""
    created = "now()" if created_at is None else "now() - %(ago)s::interval"
    return q(
        dsn,
        f"INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, status, created_at, expires_at)"
        f" VALUES (%(ct)s, %(site)s, %(tid)s, %(rj)s::jsonb, %(st)s, {created}, %(exp)s) RETURNING id",
        {"ct": cache_type, "site": site_id, "tid": target_id, "rj": result_json, "st": status, "ago": created_at,
         "exp": expires_at},
    )[0][0]


def status_of(dsn: str, row_id: int) -> str | None:
    return q(dsn, "SELECT status FROM biz.ai_cache WHERE id = %s", (row_id,))[0][0]


def ids(dsn: str, where: str = "true", params: Any = None) -> set[int]:
    return {r[0] for r in q(dsn, f"SELECT id FROM biz.ai_cache WHERE {where}", params)}


def full_row(dsn: str, row_id: int) -> tuple[Any, ...]:
    return q(dsn, "SELECT * FROM biz.ai_cache WHERE id = %s", (row_id,))[0]


def count(dsn: str) -> int:
    return q(dsn, "SELECT count(*) FROM biz.ai_cache")[0][0]


def iso(value: str) -> datetime:
    return datetime.fromisoformat(value)


# ============================================================================ shapes


def test_write_then_get_latest_returns_the_seed_shape(store: PostgresStore) -> None:
    """get_latest returns exactly the seed's 10 keys, decoded JSON (Chinese, nesting), ISO +08:00 datetimes."""
    payload = {"summary": "会员活跃度高", "nested": {"list": [1, 2.5, {"深": [True, None]}], "empty": {}}, "n": -3}
    new_id = store.write_cache("app3_clue", 7, "member:42", payload, triggered_by="scheduler")
    assert type(new_id) is int and new_id > 0
    got = store.get_latest("app3_clue", 7, "member:42")
    assert got is not None
    assert list(got) == SEED_LATEST_KEYS
    assert got["id"] == new_id
    assert (got["cache_type"], got["site_id"], got["target_id"]) == ("app3_clue", 7, "member:42")
    assert got["result_json"] == payload
    assert got["score"] is None
    assert got["triggered_by"] == "scheduler"
    assert got["status"] == "valid"
    for col in ("created_at", "expires_at"):
        assert isinstance(got[col], str) and got[col].endswith("+08:00"), got[col]
    # expiry from the policy: 7 days after the write (host clock vs server clock: a few seconds apart at most)
    lifetime = iso(got["expires_at"]) - iso(got["created_at"])
    assert abs(lifetime - timedelta(days=7)) < timedelta(seconds=30)


def test_score_and_explicit_expiry_are_stored(store: PostgresStore) -> None:
    """A given score and aware expires_at are stored as given (expires_at rendered in +08:00)."""
    exp = datetime(2999, 1, 1, 0, 0, tzinfo=UTC)
    store.write_cache("app2_finance", 1, "t", {"a": 1}, score=87, expires_at=exp)
    got = store.get_latest("app2_finance", 1, "t")
    assert got is not None
    assert got["score"] == 87
    assert got["expires_at"] == "2999-01-01T08:00:00+08:00"
    assert iso(got["expires_at"]) == exp


def test_unknown_type_is_stored_without_expiry(store: PostgresStore) -> None:
    """A cache_type missing from the policy is stored with expires_at None (never expires)."""
    store.write_cache("app99_new", 1, "t", {"a": 1})
    got = store.get_latest("app99_new", 1, "t")
    assert got is not None and got["expires_at"] is None


def test_get_history_returns_the_seed_shape_without_status(store: PostgresStore) -> None:
    """get_history rows have the seed's 9 keys (no status), decoded JSON and +08:00 datetimes."""
    store.write_cache("app4_analysis", 1, "t", {"文本": "你好"}, score=3)
    hist = store.get_history("app4_analysis", 1, "t")
    assert len(hist) == 1
    assert list(hist[0]) == SEED_HISTORY_KEYS
    assert hist[0]["result_json"] == {"文本": "你好"}
    assert hist[0]["score"] == 3
    assert hist[0]["created_at"].endswith("+08:00")


def test_set_generating_inserts_an_empty_placeholder(store: PostgresStore, dsn: str) -> None:
    """set_generating returns the id of a 'generating' row with result {} that get_latest does not serve."""
    gid = store.set_generating("app5_tactics", 1, "t", triggered_by="chat")
    assert type(gid) is int
    assert q(dsn, "SELECT status, result_json, triggered_by, expires_at FROM biz.ai_cache WHERE id = %s", (gid,)) == [
        ("generating", {}, "chat", None)
    ]
    assert store.get_latest("app5_tactics", 1, "t") is None
    assert store.get_many("app5_tactics", 1, ["t"]) == {"t": None}
    hist = store.get_history("app5_tactics", 1, "t")
    assert [h["id"] for h in hist] == [gid] and hist[0]["result_json"] == {}


def test_missing_key_reads_are_empty(store: PostgresStore) -> None:
    """Nothing stored: get_latest None, get_history [], get_many maps every id to None."""
    assert store.get_latest("app3_clue", 1, "nope") is None
    assert store.get_history("app3_clue", 1, "nope") == []
    assert store.get_many("app3_clue", 1, ["a", "b"]) == {"a": None, "b": None}
    assert store.get_many("app3_clue", 1, []) == {}


# ============================================================================ get_latest semantics


def test_get_latest_is_the_newest_by_created_at_not_by_id(store: PostgresStore, dsn: str) -> None:
    """get_latest orders by created_at: a row with a lower id but a later created_at wins."""
    a = store.write_cache("app3_clue", 1, "t", {"v": "a"})
    b = store.write_cache("app3_clue", 1, "t", {"v": "b"})
    assert store.get_latest("app3_clue", 1, "t")["id"] == b  # type: ignore[index]
    q(dsn, "UPDATE biz.ai_cache SET created_at = created_at - interval '1 hour' WHERE id = %s", (b,))
    got = store.get_latest("app3_clue", 1, "t")
    assert got is not None and got["id"] == a and got["result_json"] == {"v": "a"}


def test_get_latest_breaks_created_at_ties_by_id(store: PostgresStore, dsn: str) -> None:
    """Rows with the same created_at: the higher id wins, in get_latest and get_many alike."""
    first = store.write_cache("app3_clue", 1, "t", {"v": 1})
    second = store.write_cache("app3_clue", 1, "t", {"v": 2})
    q(dsn, "UPDATE biz.ai_cache SET created_at = '2030-01-01T00:00:00Z' WHERE id IN (%s, %s)", (first, second))
    assert store.get_latest("app3_clue", 1, "t")["id"] == second  # type: ignore[index]
    assert store.get_many("app3_clue", 1, ["t"])["t"]["id"] == second  # type: ignore[index]
    hist = store.get_history("app3_clue", 1, "t")
    assert [h["id"] for h in hist] == [second, first]


def test_newer_generating_row_does_not_hide_the_older_valid_one(store: PostgresStore) -> None:
    """While a result is regenerated, readers keep getting the previous valid row."""
    old = store.write_cache("app3_clue", 1, "t", {"v": "old"})
    gid = store.set_generating("app3_clue", 1, "t")
    assert gid > old
    assert store.get_latest("app3_clue", 1, "t")["id"] == old  # type: ignore[index]
    assert store.get_many("app3_clue", 1, ["t"])["t"]["id"] == old  # type: ignore[index]
    assert [h["id"] for h in store.get_history("app3_clue", 1, "t")] == [gid, old]


def test_expired_rows_are_not_served(store: PostgresStore) -> None:
    """A row whose expires_at is past is never served; an older unexpired row is served instead."""
    store.write_cache("app3_clue", 1, "only-expired", {"v": 1}, expires_at=PAST)
    assert store.get_latest("app3_clue", 1, "only-expired") is None
    old = store.write_cache("app3_clue", 1, "t", {"v": "old"}, expires_at=FUTURE)
    store.write_cache("app3_clue", 1, "t", {"v": "new"}, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert store.get_latest("app3_clue", 1, "t")["id"] == old  # type: ignore[index]
    assert store.get_many("app3_clue", 1, ["t", "only-expired"]) == {
        "t": store.get_latest("app3_clue", 1, "t"),
        "only-expired": None,
    }


@pytest.mark.parametrize("status", ["invalidated", "expired", "generating"])
def test_rows_of_other_statuses_are_not_served(store: PostgresStore, dsn: str, status: str) -> None:
    """Only 'valid' (or legacy NULL) rows are served: an '{status}' row alone gives None."""
    insert(dsn, status=status, expires_at=FUTURE)
    assert store.get_latest("app3_clue", 1, "t") is None
    assert store.get_many("app3_clue", 1, ["t"]) == {"t": None}
    assert len(store.get_history("app3_clue", 1, "t")) == 1


def test_legacy_null_status_row_is_served_as_valid(store: PostgresStore, dsn: str) -> None:
    """A row with status NULL (written before statuses existed) is served, by get_latest and get_many."""
    rid = insert(dsn, status=None, result_json='{"legacy": "旧"}')
    got = store.get_latest("app3_clue", 1, "t")
    assert got is not None and got["id"] == rid and got["status"] is None and got["result_json"] == {"legacy": "旧"}
    assert store.get_many("app3_clue", 1, ["t"]) == {"t": got}


def test_legacy_null_status_row_past_expiry_is_not_served(store: PostgresStore, dsn: str) -> None:
    """Status NULL does not bypass expiry: a legacy row with expires_at past is not served."""
    insert(dsn, status=None, expires_at=PAST)
    assert store.get_latest("app3_clue", 1, "t") is None


# ============================================================================ get_history / get_many


def test_get_history_is_any_status_newest_first_with_limit(store: PostgresStore, dsn: str) -> None:
    """get_history returns rows of every status, newest created_at first, `limit` of them (default 2)."""
    made = [
        insert(dsn, status="expired", created_at="5 min"),
        insert(dsn, status=None, created_at="4 min"),
        insert(dsn, status="invalidated", created_at="3 min"),
        insert(dsn, status="valid", created_at="2 min", expires_at=PAST),
        store.write_cache("app3_clue", 1, "t", {"v": "valid"}),
        store.set_generating("app3_clue", 1, "t"),
    ]
    newest_first = made[::-1]
    assert [h["id"] for h in store.get_history("app3_clue", 1, "t")] == newest_first[:2]
    assert [h["id"] for h in store.get_history("app3_clue", 1, "t", limit=4)] == newest_first[:4]
    assert [h["id"] for h in store.get_history("app3_clue", 1, "t", limit=100)] == newest_first
    assert [h["id"] for h in store.get_history("app3_clue", 1, "t", limit=1)] == newest_first[:1]


def test_get_many_is_one_query(store: PostgresStore, api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """get_many of 50 targets sends exactly one statement to PostgreSQL."""
    for i in range(50):
        store.write_cache("app3_clue", 1, f"t{i}", {"i": i})
    store.get_many("app3_clue", 1, ["t0"])  # warm: the pool's first connection is not the point here
    statements: list[str] = []
    cls: Any = psycopg.Connection if api == "sync" else psycopg.AsyncConnection
    real_execute = cls.execute

    def counting_execute(self, query, params=None, **kw):  # type: ignore[no-untyped-def]
        statements.append(str(query))
        return real_execute(self, query, params, **kw)  # the async one returns its coroutine

    monkeypatch.setattr(cls, "execute", counting_execute)
    got = store.get_many("app3_clue", 1, [f"t{i}" for i in range(50)])
    monkeypatch.undo()
    assert len(statements) == 1, statements
    assert all(got[f"t{i}"]["result_json"] == {"i": i} for i in range(50))  # type: ignore[index]


def test_get_many_keys_every_asked_id_dedupes_and_matches_get_latest(store: PostgresStore) -> None:
    """Every asked id is a key (missing ones None), duplicates collapse, values equal get_latest's."""
    store.write_cache("app3_clue", 1, "a", {"v": "a1"})
    store.write_cache("app3_clue", 1, "a", {"v": "a2"})
    store.write_cache("app3_clue", 1, "b", {"v": "b"})
    store.set_generating("app3_clue", 1, "b")
    got = store.get_many("app3_clue", 1, ["b", "missing", "a", "b", "a"])
    assert list(got) == ["b", "missing", "a"]
    assert got["missing"] is None
    assert got["a"] == store.get_latest("app3_clue", 1, "a")
    assert got["a"]["result_json"] == {"v": "a2"}  # type: ignore[index]
    assert got["b"] == store.get_latest("app3_clue", 1, "b")
    assert list(got["a"]) == SEED_LATEST_KEYS  # type: ignore[arg-type]
    assert store.get_many("app3_clue", 1, ("a",)) == {"a": got["a"]}


# ============================================================================ isolation


def test_sites_never_see_each_others_rows(store: PostgresStore) -> None:
    """Same cache_type/target_id in two sites: every read returns only the asked site's rows."""
    one = store.write_cache("app3_clue", 1, "t", {"site": 1})
    two = store.write_cache("app3_clue", 2, "t", {"site": 2})
    neg = store.write_cache("app3_clue", -1, "t", {"site": -1})
    assert store.get_latest("app3_clue", 1, "t")["id"] == one  # type: ignore[index]
    assert store.get_latest("app3_clue", 2, "t")["id"] == two  # type: ignore[index]
    assert store.get_latest("app3_clue", -1, "t")["id"] == neg  # type: ignore[index]
    assert store.get_latest("app3_clue", 3, "t") is None
    assert [h["id"] for h in store.get_history("app3_clue", 1, "t", limit=10)] == [one]
    assert [h["id"] for h in store.get_history("app3_clue", 2, "t", limit=10)] == [two]
    assert store.get_many("app3_clue", 1, ["t"])["t"]["id"] == one  # type: ignore[index]
    assert store.get_many("app3_clue", 3, ["t"]) == {"t": None}
    # and types never cross either
    assert store.get_latest("app4_analysis", 1, "t") is None


def test_invalidate_touches_only_its_site(store: PostgresStore, dsn: str) -> None:
    """invalidate(ct, 1, t) leaves site 2's row of the same ct/target valid and served."""
    one = store.write_cache("app3_clue", 1, "t", {"site": 1})
    two = store.write_cache("app3_clue", 2, "t", {"site": 2})
    assert store.invalidate("app3_clue", 1, "t") == 1
    assert store.get_latest("app3_clue", 1, "t") is None
    assert store.get_latest("app3_clue", 2, "t")["id"] == two  # type: ignore[index]
    assert (status_of(dsn, one), status_of(dsn, two)) == ("invalidated", "valid")


def test_invalidate_site_touches_only_its_site(store: PostgresStore, dsn: str) -> None:
    """invalidate_site(1), with or without a type, never touches site 2."""
    store.write_cache("app3_clue", 1, "t", {"site": 1})
    store.write_cache("app4_analysis", 1, "t", {"site": 1})
    two = {store.write_cache("app3_clue", 2, "t", {"site": 2}), store.write_cache("app4_analysis", 2, "t", {})}
    assert store.invalidate_site(1, "app3_clue") == 1
    assert store.invalidate_site(1) == 1
    assert ids(dsn, "status = 'valid'") == two
    assert store.get_latest("app3_clue", 2, "t") is not None
    assert store.get_latest("app4_analysis", 2, "t") is not None


# ============================================================================ finalize


def test_finalize_returns_true_once_then_false_and_changes_nothing(store: PostgresStore, dsn: str) -> None:
    """The first finalize turns the row valid (True); a second one is a reported no-op (False), row unchanged."""
    gid = store.set_generating("app3_clue", 1, "t")
    assert store.finalize_cache(gid, {"v": "first", "中": "文"}, score=5) is True
    got = store.get_latest("app3_clue", 1, "t")
    assert got is not None and got["id"] == gid and got["status"] == "valid"
    assert got["result_json"] == {"v": "first", "中": "文"} and got["score"] == 5
    before = full_row(dsn, gid)
    assert store.finalize_cache(gid, {"v": "second"}, score=9) is False
    assert full_row(dsn, gid) == before


def test_finalize_of_a_row_that_was_never_generating_is_a_noop(store: PostgresStore, dsn: str) -> None:
    """finalize on a 'valid' row from write_cache returns False and leaves it as written."""
    rid = store.write_cache("app3_clue", 1, "t", {"v": 1})
    before = full_row(dsn, rid)
    assert store.finalize_cache(rid, {"v": 2}) is False
    assert full_row(dsn, rid) == before


@pytest.mark.parametrize(
    ("cache_type", "expected"),
    [
        ("app6_note_analysis", FIXED_NOW + timedelta(days=30)),
        ("app3_clue", FIXED_NOW + timedelta(days=7)),
        ("app2_finance", datetime(2031, 5, 18, 0, 0, tzinfo=SHANGHAI)),
        ("app99_unknown", None),
    ],
)
def test_finalize_without_cache_type_uses_the_rows_own_type(make_store: Any, dsn: str, cache_type: str,
                                                             expected: datetime | None) -> None:
    """finalize_cache(id, result) with no cache_type gives the row the expiry of its own type."""
    with make_store(dsn, clock=fixed(FIXED_NOW)) as s:
        gid = s.set_generating(cache_type, 1, "t")
        assert s.finalize_cache(gid, {"done": True}) is True
        got = s.get_latest(cache_type, 1, "t")
    assert got is not None and got["id"] == gid
    if expected is None:
        assert got["expires_at"] is None
    else:
        assert iso(got["expires_at"]) == expected
        assert got["expires_at"].endswith("+08:00")


def test_finalize_with_matching_cache_type_works(make_store: Any, dsn: str) -> None:
    """Passing the row's own cache_type is accepted and gives the same expiry."""
    with make_store(dsn, clock=fixed(FIXED_NOW)) as s:
        gid = s.set_generating("app6_note_analysis", 1, "t")
        assert s.finalize_cache(gid, {"ok": 1}, cache_type="app6_note_analysis") is True
        assert iso(s.get_latest("app6_note_analysis", 1, "t")["expires_at"]) == FIXED_NOW + timedelta(days=30)  # type: ignore[index]


def test_finalize_with_a_mismatching_cache_type_raises_and_writes_nothing(store: PostgresStore, dsn: str) -> None:
    """finalize_cache(id, ..., cache_type=other) raises InvalidInput('cache_type'); the row stays 'generating'."""
    gid = store.set_generating("app3_clue", 1, "t")
    before = full_row(dsn, gid)
    with pytest.raises(InvalidInput) as info:
        store.finalize_cache(gid, {"v": 1}, cache_type="app6_note_analysis")
    assert info.value.field == "cache_type"
    assert full_row(dsn, gid) == before
    assert status_of(dsn, gid) == "generating"
    assert count(dsn) == 1


def test_finalize_of_an_unknown_id_returns_false(store: PostgresStore, dsn: str) -> None:
    """finalize_cache of an id that does not exist returns False and inserts nothing."""
    assert store.finalize_cache(987654, {"v": 1}) is False
    assert count(dsn) == 0


def test_finalized_row_becomes_the_latest_over_an_older_valid_one(store: PostgresStore) -> None:
    """After finalize, readers switch from the previous result to the new one."""
    old = store.write_cache("app3_clue", 1, "t", {"v": "old"})
    gid = store.set_generating("app3_clue", 1, "t")
    assert store.get_latest("app3_clue", 1, "t")["id"] == old  # type: ignore[index]
    store.finalize_cache(gid, {"v": "new"})
    assert store.get_latest("app3_clue", 1, "t")["id"] == gid  # type: ignore[index]


# ============================================================================ invalidate


def test_invalidate_returns_the_count_and_hides_the_key(store: PostgresStore, dsn: str) -> None:
    """invalidate marks the key's valid and legacy rows 'invalidated', returns how many, leaves placeholders."""
    a = store.write_cache("app3_clue", 1, "t", {"v": 1})
    b = store.write_cache("app3_clue", 1, "t", {"v": 2})
    legacy = insert(dsn, status=None)
    gid = store.set_generating("app3_clue", 1, "t")
    other = store.write_cache("app3_clue", 1, "other", {"v": 3})
    assert store.invalidate("app3_clue", 1, "t") == 3
    assert store.get_latest("app3_clue", 1, "t") is None
    assert {status_of(dsn, i) for i in (a, b, legacy)} == {"invalidated"}
    assert status_of(dsn, gid) == "generating"
    assert status_of(dsn, other) == "valid"
    assert store.invalidate("app3_clue", 1, "t") == 0
    assert store.invalidate("app3_clue", 1, "never-written") == 0


def test_invalidate_site_with_and_without_type(store: PostgresStore, dsn: str) -> None:
    """invalidate_site(site, type) counts and hides that type's rows; invalidate_site(site) all the rest."""
    for t in ("a", "b", "c"):
        store.write_cache("app3_clue", 5, t, {"t": t})
    store.write_cache("app4_analysis", 5, "a", {})
    insert(dsn, cache_type="app6_note_analysis", site_id=5, target_id="x", status=None)
    assert store.invalidate_site(5, "app3_clue") == 3
    assert store.get_many("app3_clue", 5, ["a", "b", "c"]) == {"a": None, "b": None, "c": None}
    assert store.get_latest("app4_analysis", 5, "a") is not None
    assert store.invalidate_site(5) == 2
    assert store.get_latest("app4_analysis", 5, "a") is None
    assert store.get_latest("app6_note_analysis", 5, "x") is None
    assert store.invalidate_site(5) == 0


# ============================================================================ sweep


def test_sweep_marks_expired_rows_expired(store: PostgresStore, dsn: str) -> None:
    """sweep() sets status 'expired' on valid/legacy rows past expires_at and leaves live rows alone."""
    gone = [store.write_cache("app3_clue", 1, f"t{i}", {}, expires_at=PAST) for i in range(3)]
    legacy_gone = insert(dsn, status=None, expires_at=PAST)
    live = store.write_cache("app3_clue", 1, "live", {}, expires_at=FUTURE)
    forever = store.write_cache("app99_unknown", 1, "live", {})
    report = store.sweep()
    assert isinstance(report, SweepReport)
    assert report.expired == 4
    assert {status_of(dsn, i) for i in (*gone, legacy_gone)} == {"expired"}
    assert status_of(dsn, live) == "valid" and status_of(dsn, forever) == "valid"
    assert store.sweep().expired == 0


def test_sweep_reclaims_only_stale_generating_rows(make_store: Any, dsn: str) -> None:
    """A 'generating' row older than generating_timeout becomes 'expired'; a fresh one stays 'generating'."""
    with make_store(dsn, generating_timeout=timedelta(minutes=1)) as s:
        stale = s.set_generating("app3_clue", 1, "t")
        fresh = s.set_generating("app3_clue", 1, "u")
        q(dsn, "UPDATE biz.ai_cache SET created_at = now() - interval '2 minutes' WHERE id = %s", (stale,))
        report = s.sweep()
        assert report.reclaimed == 1
        assert status_of(dsn, stale) == "expired"
        assert status_of(dsn, fresh) == "generating"
        assert s.finalize_cache(stale, {"late": True}) is False  # the dead worker's late result is refused
        assert s.finalize_cache(fresh, {"ok": True}) is True


# ============================================================================ retention


def test_retention_keeps_the_newest_n_per_type_and_site_only_in_sweep(make_store: Any, dsn: str) -> None:
    """With retention=N, writes never delete; sweep keeps the newest N rows of the (type, site) group."""
    with make_store(dsn, retention=3) as s:
        made = [s.write_cache("app3_clue", 1, "t", {"i": i}) for i in range(8)]
        assert count(dsn) == 8  # nothing deleted on write
        report = s.sweep()
        assert report.deleted == 5 and report.groups == 1
        assert ids(dsn) == set(made[-3:])
        assert s.get_latest("app3_clue", 1, "t")["id"] == made[-1]  # type: ignore[index]
        assert s.sweep().deleted == 0


def test_retention_leaves_other_sites_and_types_alone(make_store: Any, dsn: str) -> None:
    """Trimming (app3_clue, 1) counts only that group: older rows of site 2 and of another type survive."""
    with make_store(dsn, retention=3) as s:
        other_site = [s.write_cache("app3_clue", 2, "x", {"i": i}) for i in range(3)]
        other_type = [s.write_cache("app4_analysis", 1, "x", {"i": i}) for i in range(3)]
        mine = [s.write_cache("app3_clue", 1, "x", {"i": i}) for i in range(6)]
        s.sweep()
        assert ids(dsn) == set(other_site) | set(other_type) | set(mine[-3:])


def test_retention_never_deletes_the_row_get_latest_serves(make_store: Any, dsn: str) -> None:
    """An old key's served row survives retention even beyond N; its superseded and unservable rows do not."""
    with make_store(dsn, retention=2) as s:
        old_only = s.write_cache("app3_clue", 1, "old", {"v": "old"})
        served = s.write_cache("app3_clue", 1, "old2", {"v": "served"})
        expired_newer = s.write_cache("app3_clue", 1, "old2", {"v": "x"}, expires_at=PAST)
        invalid = s.write_cache("app3_clue", 1, "old3", {"v": "x"})
        s.invalidate("app3_clue", 1, "old3")
        recent = [s.write_cache("app3_clue", 1, f"new{i}", {"i": i}) for i in range(4)]
        before = {t: s.get_latest("app3_clue", 1, t) for t in ("old", "old2")}
        s.sweep()
        kept = ids(dsn)
        assert old_only in kept and served in kept
        assert expired_newer not in kept and invalid not in kept
        assert kept == {old_only, served, *recent}  # the 4 recent are each the served row of their key
        assert {t: s.get_latest("app3_clue", 1, t) for t in ("old", "old2")} == before


def test_retention_keeps_live_generating_rows_on_top_of_n(make_store: Any, dsn: str) -> None:
    """A live 'generating' placeholder beyond the newest N is kept; a stale one is reclaimed and deleted."""
    with make_store(dsn, retention=2, generating_timeout=timedelta(minutes=1)) as s:
        live = s.set_generating("app3_clue", 1, "t")
        stale = s.set_generating("app3_clue", 1, "u")
        q(dsn, "UPDATE biz.ai_cache SET created_at = now() - interval '2 minutes' WHERE id = %s", (stale,))
        superseded = [s.write_cache("app3_clue", 1, "t", {"i": i}) for i in range(3)]
        newest = [s.write_cache("app3_clue", 1, "t", {"i": i}) for i in range(3, 5)]
        s.sweep()
        assert ids(dsn) == {live, *newest}
        assert status_of(dsn, live) == "generating"
        assert s.finalize_cache(live, {"done": 1}) is True
        assert not set(superseded) & ids(dsn)


def test_retention_counts_legacy_null_status_rows(make_store: Any, dsn: str) -> None:
    """Legacy rows (status NULL) beyond the newest N are trimmed like valid ones, however recent they are."""
    with make_store(dsn, retention=2) as s:
        legacy = [insert(dsn, status=None, result_json=f'{{"i": {i}}}') for i in range(5)]
        s.sweep()
        assert ids(dsn) == set(legacy[-2:])
        assert s.get_latest("app3_clue", 1, "t")["id"] == legacy[-1]  # type: ignore[index]


def group_size(dsn: str, cache_type: str = "app3_clue", site_id: int = 1) -> int | None:
    """What sweep last recorded of a group (biz.ai_cache_group_sizes), None before its first pass."""
    rows = q(dsn, "SELECT rows FROM biz.ai_cache_group_sizes WHERE cache_type = %s AND site_id = %s",
             (cache_type, site_id))
    return rows[0][0] if rows else None


def test_retention_trims_once_a_group_holds_a_tenth_more(make_store: Any, dsn: str) -> None:
    """retention=10: a group of 11 is left as it is (only counted), one of 12 is trimmed back to the newest 10."""
    with make_store(dsn, retention=10) as s:
        made = [s.write_cache("app3_clue", 1, "t", {"i": i}) for i in range(10)]
        assert s.sweep().deleted == 0 and group_size(dsn) == 10  # the first pass counts exactly
        made.append(s.write_cache("app3_clue", 1, "t", {"i": 10}))
        assert s.sweep().deleted == 0 and group_size(dsn) == 11  # within the slack: counted, not walked
        made.append(s.write_cache("app3_clue", 1, "t", {"i": 11}))
        report = s.sweep()
        assert report.deleted == 2 and ids(dsn) == set(made[-10:]) and group_size(dsn) == 10


def test_retention_slack_is_counted_from_the_rows_retention_must_spare(make_store: Any, dsn: str) -> None:
    """15 keys with one served row each and retention=10: nothing can go, and the next write does not walk again."""
    with make_store(dsn, retention=10) as s:
        made = [s.write_cache("app3_clue", 1, f"k{i}", {"i": i}) for i in range(15)]
        assert s.sweep().deleted == 0 and ids(dsn) == set(made)
        assert group_size(dsn) == 10  # capped at retention: the 5 spared rows are not growth
        s.write_cache("app3_clue", 1, "k15", {"i": 15})
        s.sweep()
        assert group_size(dsn) == 11  # counted from the estimate (a walk would have stored min(16, 10))


def test_retention_counts_rows_written_by_others(make_store: Any, dsn: str) -> None:
    """Rows an ETL job inserts count toward the group's size like the store's own."""
    with make_store(dsn, retention=10) as s:
        s.write_cache("app3_clue", 1, "t", {"i": 0})
        s.sweep()
        for i in range(12):
            q(dsn, "INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, status) "
                   "VALUES ('app3_clue', 1, 't', %s, 'valid')", (f'{{"etl": {i}}}',))
        assert s.sweep().deleted == 3 and count(dsn) == 10


def test_rows_the_estimate_cannot_see_are_found_by_the_hourly_recount(make_store: Any, dsn: str) -> None:
    """ETL rows with their own (old) created_at are not in the estimate; the exact count an hour on trims them."""
    with make_store(dsn, retention=10) as s:
        s.write_cache("app3_clue", 1, "t", {"i": 0})
        s.sweep()
        for i in range(12):  # a backfill: its source's timestamps, not now()
            q(dsn, "INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, status, created_at) "
                   "VALUES ('app3_clue', 1, 't', %s, 'valid', now() - interval '1 day')", (f'{{"etl": {i}}}',))
        assert s.sweep().deleted == 0 and count(dsn) == 13  # within the hour: not seen
        q(dsn, "UPDATE biz.ai_cache_group_sizes SET exact_at = exact_at - interval '61 minutes'")
        s.write_cache("app3_clue", 1, "t", {"i": 1})  # the group is written again: sweep visits it
        assert s.sweep().deleted == 4 and count(dsn) == 10


def test_a_truncate_forgets_the_counted_sizes(make_store: Any, dsn: str) -> None:
    """TRUNCATE ... RESTART IDENTITY reuses ids, so counts above the old newest id would miss every new row."""
    with make_store(dsn, retention=3) as s:
        for i in range(3):
            s.write_cache("app3_clue", 1, "t", {"i": i})
        s.sweep()
        assert group_size(dsn) == 3
        q(dsn, "TRUNCATE biz.ai_cache RESTART IDENTITY")
        assert group_size(dsn) is None
        for i in range(5):
            s.write_cache("app3_clue", 1, "t", {"i": i})
        assert s.sweep().deleted == 2 and count(dsn) == 3


# ============================================================================ defects 1-7 of the old service


def test_defect_1_reads_reuse_pooled_connections(make_store: Any, dsn: str) -> None:
    """200 reads open at most max_size connections (the old code opened one per call)."""
    started = q(dsn, "SELECT now()")[0][0]
    # Its own application_name, so sessions that other tests' stores are still closing are not counted.
    with make_store(psycopg.conninfo.make_conninfo(dsn, application_name="defect_1"), min_size=1, max_size=2) as s:
        s.write_cache("app3_clue", 1, "t", {"v": 1})
        backends: set[int] = set()
        for i in range(200):
            assert s.get_latest("app3_clue", 1, "t") is not None
            if i % 50 == 0:
                backends |= {r[0] for r in q(
                    dsn, "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                         " AND backend_type = 'client backend' AND application_name = 'defect_1'"
                         " AND backend_start >= %s", (started,))}
        stats = s._pool.get_stats()
        assert stats["requests_num"] >= 200
        assert stats["connections_num"] <= 2, stats
        assert 1 <= len(backends) <= 2, backends


def test_defect_2_retention_is_per_app_and_site_not_per_target(make_store: Any, dsn: str) -> None:
    """Retention N counts the whole (type, site), across targets, and runs in sweep, not after each write."""
    with make_store(dsn, retention=5) as s:
        targets = "abcde"
        first = {t: s.write_cache("app3_clue", 1, t, {"gen": 1}) for t in targets}
        second = {t: s.write_cache("app3_clue", 1, t, {"gen": 2}) for t in targets}
        # the old per-target rule (keep 5 per target) would keep all 10; and it would have run on each write
        assert count(dsn) == 10
        assert s.sweep().deleted == 5
        assert ids(dsn) == set(second.values())
        assert not set(first.values()) & ids(dsn)
        assert all(s.get_latest("app3_clue", 1, t)["result_json"] == {"gen": 2} for t in targets)  # type: ignore[index]


def test_defect_3_finalize_without_type_still_expires_and_noop_is_reported(make_store: Any, dsn: str) -> None:
    """finalize_cache without cache_type stores the row type's expiry (not NULL); a repeat says False."""
    with make_store(dsn, clock=fixed(FIXED_NOW)) as s:
        gid = s.set_generating("app4_analysis", 1, "t")
        assert s.finalize_cache(gid, {"v": 1}) is True
        expires = q(dsn, "SELECT expires_at FROM biz.ai_cache WHERE id = %s", (gid,))[0][0]
        assert expires is not None
        assert expires == FIXED_NOW + timedelta(days=7)
        assert s.finalize_cache(gid, {"v": 2}) is False


def test_defect_4_end_of_day_just_before_midnight_is_in_the_future(make_store: Any, dsn: str) -> None:
    """app2_finance written at 23:59:59.999 Shanghai expires at the next midnight, so the row is served."""
    day = datetime.now(SHANGHAI).date() + timedelta(days=1)
    now = datetime(day.year, day.month, day.day, 23, 59, 59, 999000, tzinfo=SHANGHAI)
    old_service_value = (now.astimezone(UTC) + timedelta(hours=8)).replace(hour=23, minute=59, second=59,
                                                                            microsecond=0) - timedelta(hours=8)
    assert old_service_value.replace(tzinfo=UTC) < now  # what the old code computed: already past
    with make_store(dsn, clock=fixed(now.astimezone(UTC))) as s:
        s.write_cache("app2_finance", 1, "t", {"v": 1})
        got = s.get_latest("app2_finance", 1, "t")
    assert got is not None
    nxt = day + timedelta(days=1)
    assert got["expires_at"] == f"{nxt.isoformat()}T00:00:00+08:00"
    assert iso(got["expires_at"]) > now


def test_defect_5_invalidate_and_sweep_set_their_statuses(store: PostgresStore, dsn: str) -> None:
    """invalidate sets 'invalidated' and sweep sets 'expired': both statuses are actually used."""
    a = store.write_cache("app3_clue", 1, "t", {"v": 1})
    b = store.write_cache("app3_clue", 1, "u", {"v": 1}, expires_at=PAST)
    assert store.invalidate("app3_clue", 1, "t") == 1
    assert store.sweep().expired == 1
    assert (status_of(dsn, a), status_of(dsn, b)) == ("invalidated", "expired")


def test_defect_6_abandoned_generating_row_is_reclaimed(make_store: Any, dsn: str) -> None:
    """A 'generating' row whose worker died (older than generating_timeout) does not stay 'generating'."""
    with make_store(dsn, generating_timeout=timedelta(seconds=30)) as s:
        gid = s.set_generating("app3_clue", 1, "t")
        q(dsn, "UPDATE biz.ai_cache SET created_at = now() - interval '1 hour' WHERE id = %s", (gid,))
        assert s.sweep().reclaimed == 1
        assert status_of(dsn, gid) != "generating"
        assert q(dsn, "SELECT count(*) FROM biz.ai_cache WHERE status = 'generating'")[0][0] == 0


def test_defect_7_the_key_index_exists_and_get_latest_uses_it(dsn: str) -> None:
    """The migration creates (cache_type, site_id, target_id, created_at DESC, id DESC) and get_latest's plan uses it."""
    defs = dict(q(dsn, "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'biz' AND tablename = 'ai_cache'"))
    matching = [n for n, d in defs.items() if "(cache_type, site_id, target_id, created_at DESC, id DESC)" in d]
    assert matching, defs
    params = {"cache_type": "app3_clue", "site_id": 1, "target_id": "t1", "limit": 2, "target_ids": ["t1", "t601"]}
    with psycopg.connect(dsn, autocommit=True) as conn:
        # ~8 rows per key, ~170 per (type, site): realistic enough for the planner to have a choice
        conn.execute(
            "INSERT INTO biz.ai_cache (cache_type, site_id, target_id, status)"
            " SELECT (ARRAY['app3_clue', 'app4_analysis', 'app6_note_analysis'])[g % 3 + 1], g % 10, 't' || (g % 200),"
            " 'valid' FROM generate_series(1, 5000) g"
        )
        conn.execute("ANALYZE biz.ai_cache")
        conn.execute("SET enable_seqscan = off")
        cur = psycopg.ClientCursor(conn)
        for name, sql in (("get_latest", _sql.GET_LATEST), ("get_history", _sql.GET_HISTORY),
                          ("get_many", _sql.GET_MANY)):
            plan = "\n".join(r[0] for r in cur.execute("EXPLAIN " + sql, params).fetchall())
            assert any(n in plan for n in matching), f"{name} does not use the key index:\n{plan}"
            assert "Sort" not in plan, f"{name} sorts instead of reading the index in order:\n{plan}"


# ============================================================================ outage


@pytest.mark.fault
def test_read_fails_fast_while_postgres_is_down_and_the_pool_recovers(make_store: Any, pg_server: PostgresServer, dsn: str) -> None:
    """With the server stopped a read raises StoreUnavailable within pool_timeout; after start the same store works."""
    with make_store(dsn, pool_timeout=1) as s:
        rid = s.write_cache("app3_clue", 1, "t", {"v": 1})
        assert s.get_latest("app3_clue", 1, "t")["id"] == rid  # type: ignore[index]
        try:
            pg_server.stop()
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                s.get_latest("app3_clue", 1, "t")
            elapsed = time.monotonic() - t0
            assert isinstance(info.value, TieredCacheError)
            assert elapsed < 1 + 1.0, f"took {elapsed:.2f}s"
        finally:
            pg_server.start()
        got = s.get_latest("app3_clue", 1, "t")  # the very first call after the restart must succeed
        assert got is not None and got["id"] == rid
        assert s.write_cache("app3_clue", 1, "t", {"v": 2}) > rid
        assert s.get_many("app3_clue", 1, ["t"])["t"]["result_json"] == {"v": 2}  # type: ignore[index]


@pytest.mark.fault
def test_every_call_while_postgres_is_down_fails_within_pool_timeout(make_store: Any, pg_server: PostgresServer, dsn: str) -> None:
    """Not only the first: each read and write during an outage raises StoreUnavailable within pool_timeout + 0.5s."""
    with make_store(dsn, pool_timeout=1) as s:
        s.write_cache("app3_clue", 1, "t", {"v": 1})
        slow = []
        try:
            pg_server.stop()
            calls = [
                ("get_latest#1", lambda: s.get_latest("app3_clue", 1, "t")),
                ("get_latest#2", lambda: s.get_latest("app3_clue", 1, "t")),
                ("write_cache", lambda: s.write_cache("app3_clue", 1, "t", {"v": 2})),
            ]
            for name, call in calls:
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    call()
                elapsed = time.monotonic() - t0
                if elapsed > 1 + 0.5:
                    slow.append(f"{name}: {elapsed:.2f}s")
        finally:
            pg_server.start()
        assert not slow, f"pool_timeout=1 but: {slow}"


def test_a_write_that_lost_a_deadlock_is_run_again(store: PostgresStore, api: str, dsn: str) -> None:
    """A write PostgreSQL rolled back to break a deadlock (or a serialization race) is retried, at most 3 tries."""
    from tiered_cache.tiers._store_shared import _Conflict

    db = getattr(store, "_target", store)._db  # the async store's own object, not its blocking view
    real = db._write_once
    tries: list[str] = []

    def losing(times: int) -> Any:
        """_write_once, but the first `times` tries lose a deadlock (rolled back: nothing was written)."""
        if api == "sync":
            def once(op: str, work: Any) -> Any:
                tries.append(op)
                if len(tries) <= times:
                    raise _Conflict("deadlock detected")
                return real(op, work)
            return once

        async def aonce(op: str, work: Any) -> Any:
            tries.append(op)
            if len(tries) <= times:
                raise _Conflict("deadlock detected")
            return await real(op, work)
        return aonce

    db._write_once = losing(2)
    rid = store.write_cache("app3_clue", 1, "t", {"v": 1})
    assert len(tries) == 3 and ids(dsn) == {rid}
    tries.clear()
    db._write_once = losing(99)
    with pytest.raises(StoreUnavailable):
        store.write_cache("app3_clue", 1, "t", {"v": 2})
    assert len(tries) == 3 and ids(dsn) == {rid}
