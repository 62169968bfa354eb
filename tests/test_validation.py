"""Bad input through every PostgresStore method: InvalidInput naming the field, raised before any I/O, nothing written.

"Before any I/O" is proved with a store that was closed before it ever connected: any attempt to
reach PostgreSQL raises Closed at once, before the pool is touched (test_offline_store_really_cannot_do_io
checks that this harness would notice). "Nothing written" is proved on a live store by reading
biz.ai_cache with psycopg directly afterwards.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from tiered_cache import ExpiryPolicy, InvalidInput, Limits, PostgresStore, TieredCacheError
from tiered_cache.errors import Closed

NAN, INF = float("nan"), float("inf")
LIMITS = Limits(max_payload_bytes=200)  # every store here: small payload limit, other limits default
FUTURE = datetime(2999, 1, 1, tzinfo=timezone.utc)


@dataclass
class Point:
    """A dataclass: orjson would serialize it silently."""

    x: float


class Color(enum.Enum):
    RED = 1


Call = Callable[[PostgresStore], Any]


def deep(value: object, depth: int = 30) -> dict[str, Any]:
    """value nested `depth` levels down through alternating dicts and lists."""
    out: Any = value
    for i in range(depth):
        out = {"k": out} if i % 2 else [1, out]
    return {"root": out}


W = dict(cache_type="app3_clue", site_id=1, target_id="t", result_json={"ok": 1})


def write(**over: Any) -> Call:
    """write_cache with one argument replaced."""
    kw = {**W, **over}
    return lambda s: s.write_cache(**kw)


def key_call(method: str, **over: Any) -> Call:
    """A (cache_type, site_id, target_id) method with one argument replaced."""
    kw = {"cache_type": "app3_clue", "site_id": 1, "target_id": "t", **over}
    return lambda s: getattr(s, method)(**kw)


# (id, call, field) -- every case must raise InvalidInput whose .field is `field`.
CASES: list[tuple[str, Call, str]] = []


def case(id_: str, call: Call, field: str) -> None:
    CASES.append((id_, call, field))


# -- key parts, through every keyed method
BAD_KEYS: list[tuple[str, dict[str, Any], str]] = [
    ("site-bool", {"site_id": True}, "site_id"),
    ("site-false", {"site_id": False}, "site_id"),
    ("site-str", {"site_id": "1"}, "site_id"),
    ("site-float", {"site_id": 1.0}, "site_id"),
    ("site-none", {"site_id": None}, "site_id"),
    ("site-over-bigint", {"site_id": 2**63}, "site_id"),
    ("site-under-bigint", {"site_id": -(2**63) - 1}, "site_id"),
    ("type-int", {"cache_type": 3}, "cache_type"),
    ("type-none", {"cache_type": None}, "cache_type"),
    ("type-bytes", {"cache_type": b"app3_clue"}, "cache_type"),
    ("type-empty", {"cache_type": ""}, "cache_type"),
    ("type-too-long", {"cache_type": "x" * 129}, "cache_type"),
    ("type-nul", {"cache_type": "app3\x00clue"}, "cache_type"),
    ("target-int", {"target_id": 42}, "target_id"),
    ("target-empty", {"target_id": ""}, "target_id"),
    ("target-too-long", {"target_id": "t" * 513}, "target_id"),
    ("target-nul", {"target_id": "t\x00"}, "target_id"),
]
for kid, over, field in BAD_KEYS:
    case(f"write_cache-{kid}", write(**over), field)
    case(f"set_generating-{kid}", key_call("set_generating", **over), field)
    case(f"get_latest-{kid}", key_call("get_latest", **over), field)
    case(f"get_history-{kid}", key_call("get_history", **over), field)
    case(f"invalidate-{kid}", key_call("invalidate", **over), field)
    if "target_id" not in over:
        many = {"cache_type": "app3_clue", "site_id": 1, "target_ids": ["t"], **over}
        case(f"get_many-{kid}", lambda s, kw=many: s.get_many(**kw), field)
    if "site_id" in over:
        case(f"invalidate_site-{kid}", lambda s, v=over["site_id"]: s.invalidate_site(v), "site_id")

# -- result_json, through write_cache and finalize_cache
BAD_RESULTS: list[tuple[str, object]] = [
    ("list", [1, 2]),
    ("none", None),
    ("str", '{"a": 1}'),
    ("set", {"a": {1, 2}}),
    ("object", {"a": object()}),
    ("bytes", {"a": b"x"}),
    ("int-key", {1: "x"}),
    ("tuple-key", {("a",): "x"}),
    ("int-over-64-bits", {"a": 2**64}),
    ("int-under-64-bits", {"a": -(2**63) - 1}),
    ("nan", {"a": NAN}),
    ("inf", {"a": INF}),
    ("-inf", {"a": -INF}),
    ("nan-deep", deep(NAN)),
    ("inf-deep-in-tuple", deep((1.0, INF))),
    ("nul-in-value", {"a": "x\x00y"}),
    ("nul-in-key", {"a\x00": 1}),
    ("nul-deep", deep("\x00")),
    ("nul-in-deep-key", deep({"\x00": 1})),
    ("over-payload-limit", {"a": "x" * 300}),
    ("over-payload-limit-cjk", {"a": "中" * 70}),  # 70 chars, 210 UTF-8 bytes
    ("too-deep", deep(1, depth=300)),
]
for rid, value in BAD_RESULTS:
    case(f"write_cache-result-{rid}", write(result_json=value), "result_json")
    case(f"finalize_cache-result-{rid}", lambda s, v=value: s.finalize_cache(1, v), "result_json")

# -- other write arguments
for sid, score in [("bool", True), ("str", "5"), ("float", 1.5), ("over-int32", 2**31), ("under-int32", -(2**31) - 1)]:
    case(f"write_cache-score-{sid}", write(score=score), "score")
    case(f"finalize_cache-score-{sid}", lambda s, v=score: s.finalize_cache(1, {"ok": 1}, score=v), "score")
for tid, trig in [("int", 5), ("empty", ""), ("nul", "cron\x00"), ("too-long", "x" * 129)]:
    case(f"write_cache-triggered_by-{tid}", write(triggered_by=trig), "triggered_by")
    case(f"set_generating-triggered_by-{tid}", key_call("set_generating", triggered_by=trig), "triggered_by")
case("write_cache-expires_at-naive", write(expires_at=datetime(2999, 1, 1)), "expires_at")
case("write_cache-expires_at-str", write(expires_at="2999-01-01T00:00:00+08:00"), "expires_at")
case("write_cache-expires_at-date-number", write(expires_at=1_700_000_000), "expires_at")
# 10000-01-01 04:00 in Asia/Shanghai, the zone rows are rendered in: stored, it could never be read back
case("write_cache-expires_at-year-10000-in-zone", write(expires_at=datetime(9999, 12, 31, 20, tzinfo=timezone.utc)),
     "expires_at")
for cid, cache_id in [("zero", 0), ("negative", -1), ("bool", True), ("str", "1"), ("float", 1.0), ("over-bigint", 2**63)]:
    case(f"finalize_cache-cache_id-{cid}", lambda s, v=cache_id: s.finalize_cache(v, {"ok": 1}), "cache_id")
for tid, ct in [("empty", ""), ("int", 3), ("nul", "a\x00"), ("too-long", "x" * 129)]:
    case(f"finalize_cache-cache_type-{tid}", lambda s, v=ct: s.finalize_cache(1, {"ok": 1}, cache_type=v), "cache_type")
    case(f"invalidate_site-cache_type-{tid}", lambda s, v=ct: s.invalidate_site(1, cache_type=v), "cache_type")

# -- read arguments
for lid, limit in [("zero", 0), ("negative", -1), ("too-big", 101), ("bool", True), ("str", "2"), ("none", None),
                   ("float", 2.0)]:
    case(f"get_history-limit-{lid}", key_call("get_history", limit=limit), "limit")
for gid, ids, field in [
    ("str", "t1", "target_ids"),
    ("bytes", b"t1", "target_ids"),
    ("none", None, "target_ids"),
    ("int", 5, "target_ids"),
    ("item-int", ["t1", 2], "target_ids[]"),
    ("item-empty", ["t1", ""], "target_ids[]"),
    ("item-nul", ["t\x00"], "target_ids[]"),
    ("item-too-long", ["t" * 513], "target_ids[]"),
    ("too-many", [f"t{i}" for i in range(1001)], "target_ids"),
]:
    case(f"get_many-target_ids-{gid}", lambda s, v=ids: s.get_many("app3_clue", 1, v), field)

# -- the strict expiry policy is applied before the INSERT too
STRICT_CASES = [
    ("write_cache-unknown-type-strict", write(cache_type="app99_unknown"), "cache_type"),
]

# Values orjson would silently turn into something else: the stored JSON would not be what was given.
COERCED_RESULTS: list[tuple[str, object]] = [
    ("nan-in-dataclass", {"a": Point(NAN)}),
    ("dataclass", {"a": Point(1.0)}),
    ("datetime", {"at": datetime(2024, 1, 1, tzinfo=timezone.utc)}),
    ("uuid", {"id": uuid.UUID(int=1)}),
    ("enum", {"c": Color.RED}),
]


# ------------------------------------------------------------------------------------------- fixtures


# Nothing listens on port 1; the store is closed before it ever tries it.
OFFLINE_DSN = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"


@pytest.fixture(scope="module", params=["sync", "async"])
def offline_store(request: pytest.FixtureRequest) -> Iterator[PostgresStore]:
    """A store (or a blocking view of an async one) closed before its pool ever opened: any I/O raises Closed at once."""
    from _apis import blocking

    from tiered_cache import AsyncPostgresStore

    build = PostgresStore if request.param == "sync" else blocking(AsyncPostgresStore)
    s = build(OFFLINE_DSN, open=False, limits=LIMITS, policy=ExpiryPolicy(strict=True))
    s.close()
    yield s


@pytest.fixture
def live_store(make_store: Any, dsn: str) -> PostgresStore:
    """A working store with the same limits and policy, on the emptied database."""
    return make_store(dsn, limits=LIMITS, policy=ExpiryPolicy(strict=True))


SENTINEL_SQL = """
INSERT INTO biz.ai_cache (id, cache_type, site_id, target_id, result_json, status)
OVERRIDING SYSTEM VALUE VALUES
    (1, 'app3_clue', 1, 't', '{}', 'generating'),
    (2, 'app3_clue', 1, 't', '{"v": 1}', 'valid')
"""


def table(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """Every row of biz.ai_cache, read with psycopg directly."""
    return conn.execute(
        "SELECT id, cache_type, site_id, target_id, result_json, score, triggered_by, created_at, expires_at,"
        " status FROM biz.ai_cache ORDER BY id"
    ).fetchall()


def count_rows(dsn: str) -> int:
    """Rows in biz.ai_cache."""
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM biz.ai_cache").fetchone()[0]


def check(exc: InvalidInput, field: str) -> None:
    assert isinstance(exc, TieredCacheError)
    assert exc.field == field, f"field {exc.field!r} != {field!r}: {exc}"
    assert str(exc).startswith(field + ":")


ALL = CASES + STRICT_CASES


# ------------------------------------------------------------------------------------------- tests


def test_offline_store_really_cannot_do_io(offline_store: PostgresStore) -> None:
    """Sanity of the harness: a valid call on the closed store fails with Closed, not InvalidInput."""
    calls: list[Call] = [
        write(),
        key_call("set_generating"),
        key_call("get_latest"),
        key_call("get_history"),
        key_call("invalidate"),
        lambda s: s.get_many("app3_clue", 1, ["t"]),
        lambda s: s.invalidate_site(1),
        lambda s: s.finalize_cache(1, {"ok": 1}),
    ]
    for call in calls:
        with pytest.raises(Closed):
            call(offline_store)


@pytest.mark.parametrize(("call", "field"), [(c, f) for _, c, f in ALL], ids=[i for i, _, _ in ALL])
def test_rejected_before_any_io(offline_store: PostgresStore, call: Call, field: str) -> None:
    """Bad input raises InvalidInput naming the field without touching PostgreSQL (the pool is never open)."""
    with pytest.raises(InvalidInput) as info:
        call(offline_store)
    check(info.value, field)


METHODS = sorted({i.split("-", 1)[0] for i, _, _ in ALL})


@pytest.mark.parametrize("method", METHODS)
def test_rejected_with_nothing_written(live_store: PostgresStore, dsn: str, method: str) -> None:
    """On a live store every bad input of a method raises InvalidInput and leaves biz.ai_cache exactly as it was."""
    cases = [(i, c, f) for i, c, f in ALL if i.split("-", 1)[0] == method]
    assert cases
    problems = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SENTINEL_SQL)
        before = table(conn)
        assert len(before) == 2
        for id_, call, field in cases:
            try:
                call(live_store)
            except InvalidInput as exc:
                if exc.field != field:
                    problems.append(f"{id_}: field {exc.field!r}, expected {field!r}")
            except Exception as exc:  # noqa: BLE001 - report every case, not just the first
                problems.append(f"{id_}: raised {exc!r}, expected InvalidInput")
            else:
                problems.append(f"{id_}: no error")
            if table(conn) != before:
                problems.append(f"{id_}: biz.ai_cache changed")
                conn.execute("TRUNCATE biz.ai_cache")
                conn.execute(SENTINEL_SQL)
        assert conn.execute("SELECT count(*) FROM biz.ai_cache WHERE id > 2").fetchone()[0] == 0
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("rid", "value"), COERCED_RESULTS, ids=[r for r, _ in COERCED_RESULTS])
def test_values_json_cannot_hold_are_rejected(offline_store: PostgresStore, rid: str, value: object) -> None:
    """Values that are not JSON (dataclass, datetime, UUID, Enum) are refused, not silently coerced (json.dumps refused them)."""
    with pytest.raises(InvalidInput) as info:
        offline_store.write_cache("app3_clue", 1, "t", value)  # type: ignore[arg-type]
    check(info.value, "result_json")


def test_escaped_nul_text_is_not_a_nul(live_store: PostgresStore) -> None:
    """The six characters backslash-u-0-0-0-0 are ordinary text (jsonb stores them) and must round-trip."""
    value = {"code": "printf('\\u0000')", "\\u0000": "key too"}
    live_store.write_cache("app3_clue", 1, "t", value)
    got = live_store.get_latest("app3_clue", 1, "t")
    assert got is not None and got["result_json"] == value


def test_payload_exactly_at_the_limit_is_accepted(live_store: PostgresStore, dsn: str) -> None:
    """The limit is inclusive and counts encoded bytes: a payload of exactly max_payload_bytes is stored."""
    import orjson

    value = {"a": ""}
    value["a"] = "x" * (LIMITS.max_payload_bytes - len(orjson.dumps(value)))
    assert len(orjson.dumps(value)) == LIMITS.max_payload_bytes
    live_store.write_cache("app3_clue", 1, "t", value)
    assert count_rows(dsn) == 1
    with pytest.raises(InvalidInput):
        live_store.write_cache("app3_clue", 1, "t", {"a": value["a"] + "x"})
    assert count_rows(dsn) == 1


def test_edge_values_that_are_valid_are_accepted(live_store: PostgresStore) -> None:
    """The extremes that fit (bigint site, int32 score, 2**64-1 in JSON, max-length names) are stored exactly."""
    ct, target = "c" * 128, "中" * 512
    site = -(2**63)
    value = {"big": 2**64 - 1, "neg": -(2**63), "f": 1.5e300, "nested": [{"中文": "值"}], "t": [1, 2]}
    live_store.write_cache(ct, site, target, value, score=-(2**31), triggered_by="x" * 128,
                           expires_at=FUTURE)
    got = live_store.get_latest(ct, site, target)
    assert got is not None
    assert got["result_json"] == value
    assert got["score"] == -(2**31)
    assert got["site_id"] == site
    assert live_store.get_history(ct, site, target, limit=100)[0]["id"] == got["id"]
    assert live_store.get_many(ct, site, [target] * 3) == {target: got}


def test_naive_expires_at_is_not_reinterpreted(live_store: PostgresStore) -> None:
    """A naive expires_at is refused rather than read in the server's or host's zone."""
    with pytest.raises(InvalidInput) as info:
        live_store.write_cache("app3_clue", 1, "t", {"a": 1}, expires_at=datetime.now() + timedelta(days=1))
    check(info.value, "expires_at")


@pytest.mark.parametrize("option, value", [("negative_ttl", 0), ("lease_ttl", -1.0), ("history_ttl", True),
                                           ("no_expiry_ttl", "60"), ("negative_ttl", float("nan"))])
def test_a_cache_refuses_a_window_that_is_not_positive_seconds_before_any_io(option: str, value: object) -> None:
    from tiered_cache import TieredCache
    from tiered_cache.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=option):
        TieredCache(None, None, **{option: value})  # type: ignore[arg-type]  # no store, no client: no I/O


def test_a_cache_refuses_unknown_options_by_name() -> None:
    from tiered_cache import TieredCache
    from tiered_cache.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="kill_wiat"):
        TieredCache(None, None, kill_wiat=1.0)  # type: ignore[arg-type]
