"""Pure policy: expiry table, Redis key layout and glob patterns, refusal watch. No I/O; every clock is fixed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tiered_cache import DEFAULT_EXPIRY_DAYS, ConfigurationError, ExpiryPolicy, InvalidInput, TieredCacheError
from tiered_cache.policy.failures import RefusalWatch
from tiered_cache.policy.keys import KeySet, KeySpace, escape, glob_escape, namespace_pattern, validate_namespace

SHANGHAI = ZoneInfo("Asia/Shanghai")
UTC = timezone.utc


def local(*args: int) -> datetime:
    """An aware datetime on the Shanghai wall clock."""
    return datetime(*args, tzinfo=SHANGHAI)


# ------------------------------------------------------------------------------------- expiry table


def test_default_table_matches_the_seed() -> None:
    """The per-type lifetimes are exactly the old service's CACHE_EXPIRY_DAYS."""
    assert dict(DEFAULT_EXPIRY_DAYS) == {
        "app2_finance": 0,
        "app3_clue": 7,
        "app4_analysis": 7,
        "app5_tactics": 7,
        "app6_note_analysis": 30,
        "app7_customer_analysis": 7,
        "app8_clue_consolidated": 7,
    }


@pytest.mark.parametrize(
    ("cache_type", "days"),
    [
        ("app3_clue", 7),
        ("app4_analysis", 7),
        ("app5_tactics", 7),
        ("app6_note_analysis", 30),
        ("app7_customer_analysis", 7),
        ("app8_clue_consolidated", 7),
    ],
)
def test_day_based_types_expire_that_many_days_later(cache_type: str, days: int) -> None:
    """A N-day type written at `now` expires exactly N*24h later, returned as aware UTC."""
    now = datetime(2024, 5, 17, 9, 30, 15, 123456, tzinfo=UTC)
    got = ExpiryPolicy().expires_at(cache_type, now)
    assert got == now + timedelta(days=days)
    assert got is not None and got.utcoffset() == timedelta(0)


def test_finance_expires_at_next_local_midnight_in_shanghai() -> None:
    """app2_finance written mid-day expires at the next 00:00 Asia/Shanghai (16:00 UTC)."""
    now = local(2024, 5, 17, 10, 0, 0)
    got = ExpiryPolicy().expires_at("app2_finance", now)
    assert got == local(2024, 5, 18, 0, 0, 0)
    assert got == datetime(2024, 5, 17, 16, 0, 0, tzinfo=UTC)


def test_finance_one_millisecond_before_local_midnight_is_still_in_the_future() -> None:
    """At 23:59:59.999 local the expiry is the midnight 1 ms ahead, not 23:59:59 of that day (old defect 4)."""
    now = local(2024, 5, 17, 23, 59, 59, 999000)
    got = ExpiryPolicy().expires_at("app2_finance", now)
    assert got == local(2024, 5, 18, 0, 0, 0)
    assert got > now
    assert got - now == timedelta(milliseconds=1)


def test_finance_given_as_utc_just_before_local_midnight() -> None:
    """The same instant given in UTC (15:59:59.999Z) gives the same next Shanghai midnight."""
    now = datetime(2024, 5, 17, 15, 59, 59, 999000, tzinfo=UTC)
    got = ExpiryPolicy().expires_at("app2_finance", now)
    assert got == datetime(2024, 5, 17, 16, 0, 0, tzinfo=UTC)
    assert got > now


def test_finance_exactly_at_local_midnight_expires_at_the_following_midnight() -> None:
    """At 00:00:00 local the day has just begun: expiry is 24h later, never `now` itself."""
    now = local(2024, 5, 18, 0, 0, 0)
    got = ExpiryPolicy().expires_at("app2_finance", now)
    assert got == local(2024, 5, 19, 0, 0, 0)
    assert got - now == timedelta(hours=24)


def test_finance_at_utc_midnight_uses_the_local_date_not_the_utc_date() -> None:
    """23:30 UTC is 07:30 next day in Shanghai: expiry is the midnight after that local day."""
    now = datetime(2024, 12, 31, 23, 30, tzinfo=UTC)
    got = ExpiryPolicy().expires_at("app2_finance", now)
    assert got == local(2025, 1, 2, 0, 0, 0)


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)))
@example(datetime(2024, 5, 17, 15, 59, 59, 999999, tzinfo=UTC))
@example(datetime(2024, 5, 17, 16, 0, 0, tzinfo=UTC))
def test_finance_expiry_is_always_a_future_local_midnight_within_a_day(now: datetime) -> None:
    """For any instant, app2_finance expiry is a local 00:00:00, strictly after now, at most 24h away."""
    got = ExpiryPolicy().expires_at("app2_finance", now)
    assert got is not None
    assert now < got <= now + timedelta(hours=24)
    wall = got.astimezone(SHANGHAI)
    assert (wall.hour, wall.minute, wall.second, wall.microsecond) == (0, 0, 0, 0)
    assert wall.date() == now.astimezone(SHANGHAI).date() + timedelta(days=1)


def test_finance_in_a_custom_zone() -> None:
    """With zone='America/New_York' end of day is New York's next midnight, not Shanghai's."""
    ny = ZoneInfo("America/New_York")
    now = datetime(2024, 7, 1, 23, 59, 59, 999000, tzinfo=ny)
    got = ExpiryPolicy(zone="America/New_York").expires_at("app2_finance", now)
    assert got == datetime(2024, 7, 2, 0, 0, tzinfo=ny)
    assert got == datetime(2024, 7, 2, 4, 0, tzinfo=UTC)  # EDT is UTC-4
    assert ExpiryPolicy(zone="America/New_York").tzinfo == ny


def test_finance_in_a_zone_with_dst_uses_the_real_midnight_not_a_fixed_offset() -> None:
    """On Berlin's 23-hour spring-forward day the next midnight is 23h after the previous one."""
    berlin = ZoneInfo("Europe/Berlin")
    now = datetime(2024, 3, 31, 0, 0, tzinfo=berlin)  # CET, +01:00; clocks jump at 02:00
    got = ExpiryPolicy(zone="Europe/Berlin").expires_at("app2_finance", now)
    assert got == datetime(2024, 4, 1, 0, 0, tzinfo=berlin)
    assert got - now == timedelta(hours=23)
    assert got == datetime(2024, 3, 31, 22, 0, tzinfo=UTC)  # CEST, +02:00


def test_custom_table() -> None:
    """A custom days_by_type replaces the table: its types expire as given, others have no expiry."""
    policy = ExpiryPolicy(days_by_type={"mine": 3, "today": 0})
    now = datetime(2024, 1, 1, 12, tzinfo=UTC)
    assert policy.expires_at("mine", now) == now + timedelta(days=3)
    assert policy.expires_at("today", now) == local(2024, 1, 2)
    assert policy.expires_at("app3_clue", now) is None


def test_policy_table_cannot_be_mutated_through_the_policy() -> None:
    """The table is frozen: changing the dict passed in later does not change the policy."""
    table = {"mine": 3}
    policy = ExpiryPolicy(days_by_type=table)
    table["mine"] = 0
    table["other"] = 1
    now = datetime(2024, 1, 1, tzinfo=UTC)
    assert policy.expires_at("mine", now) == now + timedelta(days=3)
    assert policy.expires_at("other", now) is None
    with pytest.raises(TypeError):
        policy.days_by_type["mine"] = 5  # type: ignore[index]


def test_expiry_depends_only_on_the_instant_not_on_the_zone_of_now() -> None:
    """The same instant given in UTC or in a DST zone gives the same 7-day expiry (7*24h of real time)."""
    berlin = ZoneInfo("Europe/Berlin")
    instant = datetime(2024, 3, 28, 12, 0, tzinfo=UTC)  # 3 days before Berlin's spring-forward
    policy = ExpiryPolicy()
    in_utc = policy.expires_at("app3_clue", instant)
    in_berlin = policy.expires_at("app3_clue", instant.astimezone(berlin))
    assert in_utc == instant + timedelta(days=7)
    assert in_berlin == in_utc


# ------------------------------------------------------------------------------------- unknown / bad input


def test_unknown_type_has_no_expiry() -> None:
    """A type missing from the table never expires (None), as in the old service."""
    assert ExpiryPolicy().expires_at("app99_unknown", datetime(2024, 1, 1, tzinfo=UTC)) is None


def test_strict_policy_rejects_an_unknown_type_naming_cache_type() -> None:
    """strict=True turns an unknown type into InvalidInput with field 'cache_type'."""
    policy = ExpiryPolicy(strict=True)
    with pytest.raises(InvalidInput) as info:
        policy.expires_at("app99_unknown", datetime(2024, 1, 1, tzinfo=UTC))
    assert info.value.field == "cache_type"
    assert isinstance(info.value, TieredCacheError)
    assert "app99_unknown" in str(info.value)
    # known types still work under strict
    assert policy.expires_at("app3_clue", datetime(2024, 1, 1, tzinfo=UTC)) is not None


@pytest.mark.parametrize("cache_type", ["app2_finance", "app3_clue", "unknown"])
def test_naive_now_is_rejected(cache_type: str) -> None:
    """A naive `now` is ambiguous across zones: InvalidInput naming 'now', for every type."""
    with pytest.raises(InvalidInput) as info:
        ExpiryPolicy().expires_at(cache_type, datetime(2024, 1, 1, 12, 0))
    assert info.value.field == "now"


@pytest.mark.parametrize(
    "zone",
    ["Mars/Olympus_Mons", "", "../etc/passwd", "Asia", "America", "x\x00y", None, 8],
    ids=["unknown", "empty", "traversal", "dir-Asia", "dir-America", "nul", "none", "int"],
)
def test_unknown_zone_is_a_configuration_error(zone: object) -> None:
    """Any zone that is not an IANA zone (typo, a region folder, a path, not a str) raises ConfigurationError."""
    with pytest.raises(ConfigurationError):
        ExpiryPolicy(zone=zone)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "days",
    [-1, True, False, 7.0, "7", None],
    ids=["negative", "bool-true", "bool-false", "float", "str", "none"],
)
def test_bad_days_are_a_configuration_error(days: object) -> None:
    """Negative, bool, float, str or None days raise ConfigurationError naming the type."""
    with pytest.raises(ConfigurationError) as info:
        ExpiryPolicy(days_by_type={"app3_clue": days})  # type: ignore[dict-item]
    assert "app3_clue" in str(info.value)
    assert isinstance(info.value, TieredCacheError)


# ------------------------------------------------------------------------------------- keys


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes: the text between the first '{' and the next '}', if non-empty."""
    start = key.find("{")
    if start == -1:
        return key
    end = key.find("}", start + 1)
    if end == -1 or end == start + 1:
        return key
    return key[start + 1 : end]


ADVERSARIAL = st.text(
    alphabet=st.sampled_from([":", "{", "}", "%", "*", "\n", "\r", " ", "a", "1", "-", "3", "A", "中", "é", "\x00", "\\"]),
    max_size=12,
)
TEXT = st.one_of(ADVERSARIAL, st.text(max_size=20))
SITE = st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.integers(-3, 3))
NAMESPACE = st.text(
    alphabet=st.characters(blacklist_characters="{}\x00", blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")),
    min_size=1,
    max_size=64,
).filter(lambda s: not any(c.isspace() for c in s))
KEY = st.tuples(TEXT, SITE, TEXT)


@settings(max_examples=300)
@given(ns=NAMESPACE, key=KEY)
@example(ns="tc", key=("a:1", 2, "b"))
@example(ns="tc", key=("%3A", -1, "%25"))
@example(ns="tc", key=("}", 0, "{"))
@example(ns="a:e", key=("x", 1, "y"))
def test_entry_key_round_trips(ns: str, key: tuple[str, int, str]) -> None:
    """parse_entry(entry(ct, site, target)) gives back exactly (ct, site, target), whatever the text."""
    space = KeySpace(ns)
    assert space.parse_entry(space.entry(*key)) == key


@settings(max_examples=300)
@given(a=KEY, b=KEY)
@example(a=("a:1", 2, "b"), b=("a", 1, "2:b"))
@example(a=("a", 1, "2:b"), b=("a:1", 2, "b"))
@example(a=("%3A", 1, "x"), b=(":", 1, "x"))
@example(a=("%", 1, "x"), b=("%25", 1, "x"))
@example(a=("x", -1, "y"), b=("x-", 1, "y"))
@example(a=("x", 1, "y}"), b=("x", 1, "y%7D"))
@example(a=("", 1, ""), b=("", 10, ""))
def test_different_keys_never_share_a_redis_key(a: tuple[str, int, str], b: tuple[str, int, str]) -> None:
    """Two different (cache_type, site_id, target_id) map to different keys of every kind."""
    space = KeySpace()
    if a == b:
        assert space.keyset(*a) == space.keyset(*b)
        return
    ka, kb = space.keyset(*a), space.keyset(*b)
    assert set(ka.all).isdisjoint(kb.all)
    assert space.entry(*a) != space.entry(*b)
    assert space.tag(*a) != space.tag(*b)


@settings(max_examples=300)
@given(ns=NAMESPACE, key=KEY)
def test_all_keys_of_a_keyset_share_one_hash_tag(ns: str, key: tuple[str, int, str]) -> None:
    """entry/history/lease/history_lease (and entry(), lease()) hash to the same non-empty tag: one cluster slot."""
    space = KeySpace(ns)
    ks = space.keyset(*key)
    assert isinstance(ks, KeySet)
    keys = (*ks.all, space.entry(*key))
    tags = {hash_tag(k) for k in keys}
    assert len(tags) == 1
    (tag,) = tags
    assert tag, "empty hash tag: the whole key would be hashed"
    assert all(k.index("{") > 0 and k[k.index("{") + 1 : k.index("}", k.index("{"))] == tag for k in keys)
    assert tag == space.tag(*key).strip("{}")
    assert ks.entry == space.entry(*key)
    assert ks.entry == space.entry(*key)
    assert len(set(ks.all)) == 6


@given(TEXT)
def test_escape_removes_every_special_character(part: str) -> None:
    """An escaped part contains none of ':', '{', '}' and only '%' that start a %XX escape."""
    out = escape(part)
    assert not set(out) & set(":{}")
    from urllib.parse import unquote

    assert unquote(out) == part


def test_parse_entry_rejects_foreign_keys() -> None:
    """parse_entry refuses keys of another namespace or kind."""
    space = KeySpace("tc")
    with pytest.raises(ValueError):
        space.parse_entry(KeySpace("other").entry("a", 1, "b"))
    with pytest.raises(ValueError):
        space.parse_entry(space.keyset("a", 1, "b").lease)


@pytest.mark.parametrize(
    "namespace",
    ["", "a{b", "a}b", "{tc}", "a b", "a\tb", "a\nb", "a\x00b", "x" * 65, None, 5, b"tc"],
    ids=["empty", "open-brace", "close-brace", "braces", "space", "tab", "newline", "nul", "too-long", "none",
         "int", "bytes"],
)
def test_bad_namespace_is_rejected(namespace: object) -> None:
    """A namespace that is empty, too long, not a str, or holds braces/whitespace/NUL raises ConfigurationError."""
    with pytest.raises(ConfigurationError):
        KeySpace(namespace)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        validate_namespace(namespace)  # type: ignore[arg-type]


def test_good_namespace_is_used_as_prefix() -> None:
    """Keys and the change channel all start with the namespace."""
    space = KeySpace("prod:cache")
    assert space.entry("a", 1, "b").startswith("prod:cache:e:{")
    assert space.channel.startswith("prod:cache:")
    assert KeySpace("x" * 64).namespace == "x" * 64


# ------------------------------------------------------------------------------------- glob patterns


@pytest.mark.parametrize(
    ("namespace", "pattern"),
    [("tc", "tc:*"), ("tc[prod]", r"tc\[prod\]:*"), ("a*b", r"a\*b:*"), ("q?", r"q\?:*"),
     ("back\\slash", r"back\\slash:*"), ("[]*?\\", r"\[\]\*\?\\:*")],
)
def test_namespace_pattern_escapes_every_glob_character(namespace: str, pattern: str) -> None:
    """SCAN MATCH on a namespace's keys: '*', '?', '[', ']' and backslash are escaped, so they match themselves."""
    assert namespace_pattern(namespace) == pattern
    assert KeySpace(namespace).pattern == pattern


@given(st.text(min_size=1, max_size=64))
def test_glob_escape_leaves_no_glob_character_unescaped(literal: str) -> None:
    """Reading the escaped pattern back (a backslash makes the next character literal) gives the literal again."""
    escaped = glob_escape(literal)
    out, i = [], 0
    while i < len(escaped):
        c = escaped[i]
        assert c not in "*?[]", f"unescaped {c!r} in {escaped!r}"
        if c == "\\":
            i += 1
            c = escaped[i]
        out.append(c)
        i += 1
    assert "".join(out) == literal


def test_probe_key_is_in_the_namespace_and_no_entry() -> None:
    """The write probe's key is the namespace's own (a flush drops it) and never one of a cache key's."""
    space = KeySpace("tc")
    assert space.probe == "tc:probe" and space.probe.startswith("tc:")
    assert space.probe not in space.keyset("probe", 1, "x").all


# ------------------------------------------------------------------------------------- refusal watch


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_refusal_watch_clears_only_after_writes_were_accepted_for_the_hold_down() -> None:
    """A refusal holds until writes were accepted for hold_down without a refusal in between; an outage restarts it."""
    clock = Clock()
    watch = RefusalWatch(probe_interval=0.5, hold_down=2.0, clock=clock)
    assert not watch.refusing and watch.due(clock.now), "a new tier probes on its first read"
    assert not watch.due(clock.now + 0.49) and watch.due(clock.now + 0.5)
    assert watch.refused() and watch.refusing and watch.episodes == 1
    assert not watch.refused(), "already refusing: not a new episode"
    clock.now += 1
    assert not watch.accepted()  # the first accepted write starts the hold-down
    clock.now += 1.9
    assert not watch.accepted() and watch.refusing
    watch.refused()  # refused again: start over
    clock.now += 0.1
    assert not watch.accepted()
    clock.now += 1.0
    watch.unanswered()  # no answer proves nothing: start over
    assert not watch.accepted()
    clock.now += 2.0
    assert watch.accepted() and not watch.refusing
    assert not watch.accepted(), "not refusing: nothing to clear"


@pytest.mark.parametrize(("interval", "hold"), [(0, 1.0), (-1, 1.0), (0.5, -0.1), ("0.5", 1.0), (0.5, True)])
def test_refusal_watch_rejects_unusable_settings(interval: float, hold: float) -> None:
    """A probe that never runs, or a negative hold-down, is a configuration error."""
    with pytest.raises(ConfigurationError):
        RefusalWatch(interval, hold)


# -- get_many's page gate (policy/page_gate.py) -------------------------------------------------------


def _answer_then_shut(gate: Any, tried: Callable[[bool], None], answered: int) -> None:
    """An open gate whose near tier answered `answered` tries in a row, then missed until the gate shut."""
    for _ in range(answered):
        assert gate.try_near()
        tried(True)
    while gate.share >= gate.threshold:
        assert gate.try_near()
        tried(False)


def test_page_gate_stays_open_while_pages_are_whole_and_closes_when_they_are_not() -> None:
    from tiered_cache.policy.page_gate import PageGate

    gate = PageGate(threshold=0.5, burst=2, max_burst=2, interval=8, alpha=0.25)
    _answer_then_shut(gate, gate.tried_page, 20)
    tries = []
    for _ in range(16):
        tries.append(gate.try_near())
        if tries[-1]:
            gate.tried_page(False, near_share=0.9)  # much of each page near, not all: keep sampling at the base rate
    assert tries == ([False] * 6 + [True] * 2) * 2  # a burst of 2 in every 8 pages
    for _ in range(10):  # the hot set fits again: the burst's pages are whole, the gate reopens at once
        while not gate.try_near():
            pass
        gate.tried_page(True)
    assert gate.share >= 0.5 and gate.try_near()


def test_a_burst_goes_on_while_its_pages_find_half_their_keys_near_and_reopens_on_whole_pages() -> None:
    """A hot set filling the near tier: the burst outlasts `burst` pages, and whole pages reopen the gate."""
    from tiered_cache.policy.page_gate import PageGate

    gate = PageGate(threshold=0.5, burst=4, max_burst=100, interval=16, alpha=0.25)
    while gate.share >= 0.5:
        gate.try_near()
        gate.tried_page(False)
    while not gate.try_near():
        pass
    found = [0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9]  # pages of a burst as the tier fills with a repeating set
    for share in found:
        gate.tried_page(False, near_share=share)
        assert gate.try_near()  # 7 pages in: still trying, past the burst's 4
    for _ in range(5):
        gate.tried_page(True)
        assert gate.try_near()
    assert gate.share >= 0.5  # reopened: every page tries from now on, as long as they stay whole


def test_a_closed_page_gate_bursts_less_often_while_bursts_find_little_near() -> None:
    """Tried pages cost a lookup and a put per key: the interval doubles to max_interval, and resets on a better burst."""
    from tiered_cache.policy.page_gate import PageGate

    gate = PageGate(threshold=0.5, burst=2, interval=4, max_interval=32, alpha=0.5)
    while gate.share >= 0.5:
        assert gate.try_near()
        gate.tried_page(False)
    cycles = []
    for _ in range(6):
        n = 1
        while not gate.try_near():
            n += 1
        gate.tried_page(False, near_share=0.1)
        assert gate.try_near()  # the burst's second page
        gate.tried_page(False, near_share=0.1)
        cycles.append(n + 1)
    assert cycles == [4, 8, 16, 32, 32, 32]  # pages from one burst's end to the next one's
    while not gate.try_near():
        pass
    gate.tried_page(False, near_share=0.9)  # the hot set is coming to fit (half near on average over the burst):
    assert gate.try_near()
    gate.tried_page(False, near_share=0.2)  # burst at the base rate again
    assert [gate.try_near() for _ in range(3)] == [False, False, True]


def test_key_gate_closes_when_single_reads_rarely_hit_and_bursts_less_often_while_they_still_do_not() -> None:
    from tiered_cache.policy.page_gate import KeyGate

    gate = KeyGate(threshold=0.2, burst=4, interval=8, max_interval=32, alpha=0.5)
    _answer_then_shut(gate, gate.tried_read, 10)
    cycles = []
    for _ in range(5):
        n = 1
        while not gate.try_near():
            n += 1
        gate.tried_read(False)
        for _ in range(3):  # the rest of the burst tries too
            assert gate.try_near()
            gate.tried_read(False)
        cycles.append(n)
    assert cycles == [8, 16, 32, 32, 32]  # reads skipped before each burst, doubling while bursts miss
    assert gate.skipped == sum(cycles) - len(cycles) and gate.tried >= 20


def test_key_gate_reopens_when_a_burst_finds_the_near_tier_answering() -> None:
    """A hot set that fits again: the burst's reads hit, the gate opens, and every read tries from then on."""
    from tiered_cache.policy.page_gate import KeyGate

    gate = KeyGate(threshold=0.2, burst=8, interval=4, alpha=0.25)
    while gate.share >= 0.2:
        gate.try_near()
        gate.tried_read(False)
    while not gate.try_near():
        pass
    gate.tried_read(False)  # the first read of the burst fills the tier
    for _ in range(3):
        assert gate.try_near()
        gate.tried_read(True)
    assert gate.share >= 0.2
    assert all(gate.try_near() for _ in range(50))  # open: no burst needed


def test_a_closed_key_gate_marks_one_skipped_read_in_put_every_as_warm() -> None:
    from tiered_cache.policy.page_gate import KeyGate

    gate = KeyGate(threshold=0.2, burst=4, interval=1 << 30, put_every=4)
    gate.share = 0.0  # closed
    warm = []
    for _ in range(12):
        assert not gate.try_near()
        warm.append(gate.warm)
    assert warm == [False, False, False, True] * 3


def test_a_burst_that_hits_half_the_threshold_goes_straight_on_and_reopens_as_the_tier_warms() -> None:
    """The tier is only partly warm while closed: a burst hitting 10% (threshold 20%) keeps trying, without
    waiting an interval, until the share reaches the threshold; one hitting less waits twice as long."""
    from tiered_cache.policy.page_gate import KeyGate

    gate = KeyGate(threshold=0.2, burst=10, interval=8, max_interval=64, alpha=0.1)
    gate.share = 0.0
    while not gate.try_near():
        pass
    for i in range(10):  # 1 hit in 10: half the threshold
        gate.tried_read(i == 0)
    assert gate.try_near(), "a burst at half the threshold goes on at once"
    n = 0
    while gate.share < 0.2:  # the tier warms: 3 hits in 10 from now on
        assert gate.try_near() and n < 100
        gate.tried_read(n % 10 < 3)
        n += 1
    assert all(gate.try_near() for _ in range(20))  # reopened
    gate.share = 0.0
    gate._burst_left = 0
    skipped = 0
    while not gate.try_near():
        skipped += 1
    for _ in range(10):
        gate.tried_read(False)  # a burst that found nothing
    assert gate.interval == 16 and not gate.try_near()  # no burst straight on: the next one waits 16 reads
