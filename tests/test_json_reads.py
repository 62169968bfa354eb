"""The JSON reads (get_latest_json, get_many_json, get_history_json): the dict answers' orjson bytes, on every tier."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from itertools import count
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiered_cache import Closed, InvalidInput, TieredCache
from tiered_cache.policy.entries import encode_entry, entry_expires_at_ms, expires_at_ms
from tiered_cache.tiers._sql import HISTORY_COLUMNS, LATEST_COLUMNS

UNTYPED = "custom_untyped"  # no expiry policy: expires_at is NULL unless the write gives one
TYPED = "app3_clue"  # 7 days of expiry by policy
SITE = 31

# -- rows -----------------------------------------------------------------------------------------

_TRAPS = st.sampled_from(["expires_at", "status", ',"expires_at":', '"expires_at":null}', "中文", "}", '"'])
_TEXT = st.one_of(_TRAPS, st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12),
                  st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=12))
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False), _TEXT,
)
_JSON = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_TEXT, inner, max_size=4)), max_leaves=12)
RESULTS = st.dictionaries(_TEXT, _JSON, max_size=5)
_ZONES = st.sampled_from([timezone.utc, ZoneInfo("Asia/Shanghai"), timezone(timedelta(hours=-5, minutes=-45))])
# Far enough ahead that no row expires while an example runs, whatever the machine's load.
def _ahead(days: int, micros: int, zone: Any) -> datetime:
    return (datetime.now(timezone.utc) + timedelta(days=days, microseconds=micros)).astimezone(zone)


EXPIRIES = st.one_of(st.none(), st.builds(_ahead, st.integers(1, 3650), st.integers(0, 86_400 * 10**6), _ZONES))
WRITES = st.fixed_dictionaries({
    "result_json": RESULTS,
    "score": st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)),
    "triggered_by": st.one_of(st.none(), _TEXT.filter(bool)),
    "expires_at": EXPIRIES,
})


class Calls:
    """metrics= for a cache: remembers which tier answered each public call."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def observe_call(self, op: str, tier: str, result: str, seconds: float) -> None:
        self.seen.append((op, tier, result))

    def last(self) -> tuple[str, str, str]:
        return self.seen[-1]


def _wait(pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


class Tiers:
    """A near+Redis cache and a Redis-down one over the same PostgreSQL, with the means to pick the answering tier."""

    def __init__(self, make_cache: Callable[..., TieredCache], dsn: str, redis_url: str) -> None:
        self.calls, self.down_calls = Calls(), Calls()
        # 1 s Redis timeout: a stalled reply on a busy runner must not open the breaker mid-example.
        self.cache = make_cache(dsn, redis_url, redis_timeout=1.0, near_max_entries=10_000, near_max_age=3600.0,
                                metrics=self.calls)
        self.down = make_cache(dsn, redis_url, namespace="tc_json_down", breaker_reset=3600.0, metrics=self.down_calls)
        for _ in range(self.down.redis.breaker.threshold):
            self.down.redis.breaker.failure()  # open for an hour: every read of `down` bypasses Redis
        assert self.cache.listener.subscribed.wait(10) and self.cache.near.active
        self.r = redis.Redis.from_url(redis_url)
        self.targets = count()

    def target(self) -> str:
        return f"目标-{next(self.targets)}"

    def write(self, ct: str, target: str, fields: dict[str, Any]) -> int:
        """A write through the near cache, waited for until its own announcement is applied (no late eviction)."""
        heard = self.cache.listener.stats.messages
        row_id = self.cache.write_cache(ct, SITE, target, fields["result_json"], triggered_by=fields["triggered_by"],
                                        score=fields["score"], expires_at=fields["expires_at"])
        _wait(lambda: self.cache.listener.stats.messages > heard, "the write's announcement")
        return row_id

    def forget(self, ct: str, *targets: str, redis_too: bool) -> None:
        """Drop keys from the near tier (and from Redis): the next read is answered one tier lower."""
        for target in targets:
            ks = self.cache.keyset(ct, SITE, target)
            self.cache.near.evict(ks.entry)
            if redis_too:
                self.r.delete(ks.entry, ks.history)

    def read(self, op: str, *args: Any, **kwargs: Any) -> tuple[Any, tuple[str, str]]:
        """One call on the near cache and the tier that answered it (get_many's page gate held open: this test
        picks the answering tier itself; tests/test_policy.py covers the gate)."""
        self.cache._pages.share = 1.0
        value = getattr(self.cache, op)(*args, **kwargs)
        seen = self.calls.last()
        assert seen[0] == op
        return value, seen[1:]

    def read_down(self, op: str, *args: Any, **kwargs: Any) -> tuple[Any, tuple[str, str]]:
        value = getattr(self.down, op)(*args, **kwargs)
        assert self.down_calls.last()[0] == op
        return value, self.down_calls.last()[1:]


@pytest.fixture
def tiers(make_cache: Callable[..., TieredCache], dsn: str, redis_url: str) -> Iterator[Tiers]:
    t = Tiers(make_cache, dsn, redis_url)
    yield t
    t.r.close()


MISS, NEAR, REDIS, BYPASS = ("postgres", "miss"), ("near", "hit"), ("redis", "hit"), ("postgres", "bypass")


def _each_tier(t: Tiers, ct: str, targets: list[str], op: str, *args: Any, **kwargs: Any) -> dict[tuple[str, str], Any]:
    """op's answer from PostgreSQL (after a miss), the near tier, Redis, and PostgreSQL with Redis down."""
    out = {}
    t.forget(ct, *targets, redis_too=True)
    value, tier = t.read(op, *args, **kwargs)
    assert tier == MISS
    out[MISS] = value
    value, tier = t.read(op, *args, **kwargs)
    assert tier == NEAR
    out[NEAR] = value
    t.forget(ct, *targets, redis_too=False)
    value, tier = t.read(op, *args, **kwargs)
    assert tier == REDIS
    out[REDIS] = value
    value, tier = t.read_down(op, *args, **kwargs)
    assert tier == BYPASS
    out[BYPASS] = value
    return out


def _same_bytes(as_json: dict[tuple[str, str], Any], as_dict: dict[tuple[str, str], Any]) -> bytes | None:
    """Every tier's JSON answer is the orjson bytes of every tier's dict answer; returns that one answer."""
    answers = set(as_json.values())
    assert len(answers) == 1, as_json
    (answer,) = answers
    for tier, value in as_dict.items():
        assert (None if value is None else orjson.dumps(value)) == answer, tier
    assert answer is None or type(answer) is bytes
    return answer


_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(fields=WRITES, typed=st.booleans(), absent=st.booleans())
def test_get_latest_json_is_the_dict_answer_as_orjson_bytes_on_every_tier(tiers: Tiers, fields: dict[str, Any],
                                                                          typed: bool, absent: bool) -> None:
    """get_latest_json == orjson.dumps(get_latest) byte for byte, from PostgreSQL, near, Redis and with Redis down."""
    ct, target = (TYPED if typed else UNTYPED), tiers.target()
    row_id = None if absent else tiers.write(ct, target, fields)
    as_json = _each_tier(tiers, ct, [target], "get_latest_json", ct, SITE, target)
    as_dict = _each_tier(tiers, ct, [target], "get_latest", ct, SITE, target)
    answer = _same_bytes(as_json, as_dict)
    if absent:
        assert answer is None
    else:
        row = orjson.loads(answer)
        assert row["id"] == row_id and row["result_json"] == orjson.loads(orjson.dumps(fields["result_json"]))


@_SETTINGS
@given(pages=st.lists(st.tuples(WRITES, st.booleans()), min_size=1, max_size=6), typed=st.booleans())
def test_get_many_json_is_the_dict_page_as_orjson_bytes_on_every_tier(tiers: Tiers, pages: list[Any],
                                                                      typed: bool) -> None:
    """get_many_json maps each target to orjson.dumps of get_many's row (None for none), on every tier, in order."""
    ct = TYPED if typed else UNTYPED
    targets = [tiers.target() for _ in pages]
    for target, (fields, absent) in zip(targets, pages):
        if not absent:
            tiers.write(ct, target, fields)
    as_json = _each_tier(tiers, ct, targets, "get_many_json", ct, SITE, targets)
    as_dict = _each_tier(tiers, ct, targets, "get_many", ct, SITE, targets)
    for page in (*as_json.values(), *as_dict.values()):
        assert list(page) == targets
    for target, (_, absent) in zip(targets, pages):
        answer = _same_bytes({k: v[target] for k, v in as_json.items()}, {k: v[target] for k, v in as_dict.items()})
        assert (answer is None) == absent
    # A page answered partly by each tier: near for the first, Redis for the second, PostgreSQL for the rest.
    tiers.forget(ct, *targets[1:], redis_too=False)
    tiers.forget(ct, *targets[2:], redis_too=True)
    mixed, tier = tiers.read("get_many_json", ct, SITE, targets)
    assert tier == (MISS if len(targets) > 2 else REDIS if len(targets) > 1 else NEAR)
    assert mixed == as_json[MISS]


@_SETTINGS
@given(history=st.lists(st.tuples(WRITES, st.booleans()), max_size=4), limit=st.integers(1, 5))
def test_get_history_json_is_the_dict_list_as_orjson_bytes_on_every_tier(tiers: Tiers, history: list[Any],
                                                                         limit: int) -> None:
    """get_history_json == orjson.dumps(get_history) byte for byte on every tier, placeholders and all."""
    target = tiers.target()
    for fields, generating in history:
        if generating:
            heard = tiers.cache.listener.stats.messages
            tiers.cache.set_generating(UNTYPED, SITE, target, triggered_by=fields["triggered_by"])
            _wait(lambda: tiers.cache.listener.stats.messages > heard, "the placeholder's announcement")
        else:
            tiers.write(UNTYPED, target, fields)
    as_json = _each_tier(tiers, UNTYPED, [target], "get_history_json", UNTYPED, SITE, target, limit=limit)
    as_dict = _each_tier(tiers, UNTYPED, [target], "get_history", UNTYPED, SITE, target, limit=limit)
    answer = _same_bytes(as_json, as_dict)
    assert answer is not None and len(orjson.loads(answer)) == min(limit, len(history))


def test_unobserved_json_reads_answer_the_same_bytes(make_cache: Callable[..., TieredCache], dsn: str,
                                                     redis_url: str) -> None:
    """Without metrics (the fast path) the JSON reads answer the same bytes, and the near tier hands out one object."""
    cache = make_cache(dsn, redis_url, redis_timeout=1.0, near_max_entries=100, near_max_age=3600.0)
    assert cache.listener.subscribed.wait(10)
    cache.write_cache(UNTYPED, SITE, "a", {"名": "值", "n": [1, 2.5, None]}, score=3)
    _wait(lambda: cache.listener.stats.messages >= 1, "the write's announcement")
    first = cache.get_latest_json(UNTYPED, SITE, "a")  # Redis (the write stored it there), then near
    assert first == orjson.dumps(cache.get_latest(UNTYPED, SITE, "a"))
    hits = cache.stats()["near"]["hits"]
    again = cache.get_latest_json(UNTYPED, SITE, "a")
    assert cache.stats()["near"]["hits"] == hits + 1 and again == first
    assert cache.get_latest_json(UNTYPED, SITE, "a") is cache.get_latest_json(UNTYPED, SITE, "a")  # no copy
    assert cache.get_many_json(UNTYPED, SITE, ["a", "b"]) == {"a": first, "b": None}
    assert cache.get_many_json(UNTYPED, SITE, []) == {}
    assert cache.get_many_json(UNTYPED, SITE, ["a", "a"]) == {"a": first}
    assert cache.get_history_json(UNTYPED, SITE, "a", limit=3) == orjson.dumps(cache.get_history(UNTYPED, SITE, "a", 3))
    assert cache.get_history_json(UNTYPED, SITE, "nobody") == b"[]"
    assert cache.get_latest_json(UNTYPED, SITE, "nobody") is None


def test_page_of_fragments_is_the_dict_page(make_cache: Callable[..., TieredCache], dsn: str, redis_url: str) -> None:
    """The README's board pattern: orjson.Fragment of each answer builds the page get_many would have encoded."""
    cache = make_cache(dsn, redis_url)
    for i in range(5):
        cache.write_cache(TYPED, SITE, f"t{i}", {"i": i, "文": "字" * i})
    targets = [f"t{i}" for i in range(6)]
    found = cache.get_many_json(TYPED, SITE, targets)
    page = orjson.dumps({t: None if b is None else orjson.Fragment(b) for t, b in found.items()})
    assert page == orjson.dumps(cache.get_many(TYPED, SITE, targets))


BAD: list[tuple[str, Callable[[Any, str], Any], str]] = [
    ("empty-type", lambda c, m: getattr(c, m)("", SITE, "t"), "cache_type"),
    ("site-str", lambda c, m: getattr(c, m)(TYPED, "1", "t"), "site_id"),
    ("site-bool", lambda c, m: getattr(c, m)(TYPED, True, "t"), "site_id"),
    ("site-overflow", lambda c, m: getattr(c, m)(TYPED, 2**63, "t"), "site_id"),
    ("empty-target", lambda c, m: getattr(c, m)(TYPED, SITE, ""), "target_id"),
    ("nul-target", lambda c, m: getattr(c, m)(TYPED, SITE, "a\x00"), "target_id"),
]
BAD_MANY: list[tuple[str, Any, str]] = [
    ("str", "abc", "target_ids"),
    ("none-item", ["a", None], "target_ids"),
    ("too-many", [str(i) for i in range(1001)], "target_ids"),
]
BAD_LIMITS = [0, 101, True, "2"]


@pytest.mark.parametrize("method", ["get_latest", "get_history"])
@pytest.mark.parametrize(("call", "field"), [(c, f) for _, c, f in BAD], ids=[i for i, _, _ in BAD])
def test_bad_keys_rejected_like_the_dict_reads(cache: TieredCache, method: str, call: Any, field: str) -> None:
    """A bad key raises the same InvalidInput from the JSON read as from the dict one."""
    with pytest.raises(InvalidInput) as of_dict:
        call(cache, method)
    with pytest.raises(InvalidInput) as of_json:
        call(cache, method + "_json")
    assert of_json.value.field == of_dict.value.field == field and str(of_json.value) == str(of_dict.value)


@pytest.mark.parametrize(("ids", "field"), [(v, f) for _, v, f in BAD_MANY], ids=[i for i, _, _ in BAD_MANY])
def test_bad_pages_rejected_like_get_many(cache: TieredCache, ids: Any, field: str) -> None:
    """A bad target list raises the same InvalidInput from get_many_json as from get_many."""
    with pytest.raises(InvalidInput) as of_dict:
        cache.get_many(TYPED, SITE, ids)
    with pytest.raises(InvalidInput) as of_json:
        cache.get_many_json(TYPED, SITE, ids)
    assert str(of_json.value) == str(of_dict.value) and of_json.value.field.startswith(field)


@pytest.mark.parametrize("limit", BAD_LIMITS)
def test_bad_limits_rejected_like_get_history(cache: TieredCache, limit: Any) -> None:
    """A bad history limit raises the same InvalidInput from get_history_json as from get_history."""
    with pytest.raises(InvalidInput) as of_dict:
        cache.get_history(TYPED, SITE, "t", limit=limit)
    with pytest.raises(InvalidInput) as of_json:
        cache.get_history_json(TYPED, SITE, "t", limit=limit)
    assert of_json.value.field == of_dict.value.field == "limit" and str(of_json.value) == str(of_dict.value)


def test_closed_cache_refuses_json_reads(make_cache: Callable[..., TieredCache], dsn: str, redis_url: str) -> None:
    """After close() every JSON read raises Closed, naming the method."""
    cache = make_cache(dsn, redis_url)
    cache.write_cache(TYPED, SITE, "t", {"v": 1})
    assert cache.get_latest_json(TYPED, SITE, "t") is not None
    cache.close()
    for name, call in [("get_latest_json", lambda: cache.get_latest_json(TYPED, SITE, "t")),
                       ("get_many_json", lambda: cache.get_many_json(TYPED, SITE, ["t"])),
                       ("get_history_json", lambda: cache.get_history_json(TYPED, SITE, "t"))]:
        with pytest.raises(Closed, match=name):
            call()


# -- the entry's expiry, read from its tail (pure) ------------------------------------------------------


def _row(columns: tuple[str, ...], result_json: Any, expires_at: datetime | None, status: Any) -> dict[str, Any]:
    values = {"id": 1, "cache_type": TYPED, "site_id": SITE, "target_id": "t", "result_json": result_json,
              "score": None, "triggered_by": None, "created_at": "2024-01-01T00:00:00+08:00",
              "expires_at": None if expires_at is None else expires_at.isoformat(), "status": status}
    return {c: values[c] for c in columns}


@settings(max_examples=300)
@given(result=RESULTS, expires_at=st.one_of(st.none(), st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(9000, 1, 1), timezones=_ZONES)),
    status=st.sampled_from(["valid", None]))
def test_entry_expiry_read_from_the_tail_is_the_rows(result: dict[str, Any], expires_at: datetime | None,
                                                     status: Any) -> None:
    """entry_expires_at_ms(encode_entry(row)) == expires_at_ms(row), even with expires_at keys inside result_json."""
    row = _row(LATEST_COLUMNS, result, expires_at, status)
    assert entry_expires_at_ms(encode_entry(row)) == expires_at_ms(row)
    assert entry_expires_at_ms(encode_entry(None)) is None
    history_row = _row(HISTORY_COLUMNS, result, expires_at, status)  # no status: expires_at is the last key
    assert entry_expires_at_ms(encode_entry(history_row)) == expires_at_ms(history_row)
