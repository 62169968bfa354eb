"""KeyMemo answers exactly what validation and the key layout answer, whatever it remembers (no server needed)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiered_cache import InvalidInput, PostgresStore
from tiered_cache.policy.key_memo import KeyMemo
from tiered_cache.policy.keys import KeySpace
from tiered_cache.policy.validation import Limits

LIMITS = Limits(max_many=6, max_target_id_length=8)
STORE = PostgresStore("postgresql://127.0.0.1:1/nowhere", limits=LIMITS, open=False)  # validation only, no I/O
KEYS = KeySpace("tc")

targets = st.one_of(
    st.sampled_from(["a", "b", "c", "d:e", "{f}", "g%"]),  # remembered or not, with characters the layout escapes
    st.sampled_from(["", "x\x00", "123456789", "\ud800"]),  # each invalid in its own way
    st.integers(0, 3), st.none(),
)


def memo(size: int = 1 << 16) -> KeyMemo:
    return KeyMemo(STORE.validate_key, STORE.validate_many, KEYS.entry, LIMITS, size=size)


def reference(cache_type: Any, site_id: Any, ids: Any) -> Any:
    """What get_many would use without a memo: validate_many, then the layout's entry key per target."""
    try:
        ct, site, valid = STORE.validate_many(cache_type, site_id, ids)
    except InvalidInput as exc:
        return ("raises", exc.field, str(exc))
    return (ct, site, valid, [KEYS.entry(ct, site, t) for t in valid])


def answer(m: KeyMemo, cache_type: Any, site_id: Any, ids: Any) -> Any:
    try:
        return m.entries(cache_type, site_id, ids)
    except InvalidInput as exc:
        return ("raises", exc.field, str(exc))


@settings(max_examples=400, deadline=None)
@given(remembered=st.lists(st.sampled_from(["a", "b", "c", "d:e", "{f}", "g%"]), max_size=6),
       pages=st.lists(st.tuples(st.sampled_from(["app", "", 5]), st.sampled_from([7, -1, True, 2**63]),
                                st.one_of(st.lists(targets, max_size=9), st.tuples(targets, targets), st.just("ab"))),
                      min_size=1, max_size=6),
       size=st.sampled_from([2, 1 << 16]))
def test_entries_match_validation_and_layout(remembered: list[str], pages: list[Any], size: int) -> None:
    """Any mix of remembered and new targets, duplicates, bad ids and bad pages: the same answer or the same error."""
    m = memo(size)
    for t in remembered:
        m.entry("app", 7, t)
    for cache_type, site_id, ids in pages:
        assert answer(m, cache_type, site_id, ids) == reference(cache_type, site_id, ids)


def test_a_new_target_beside_remembered_ones_is_validated_by_name() -> None:
    """The partial path still refuses a bad target, naming the field as validate_many does, and remembers nothing bad."""
    m = memo()
    m.entry("app", 7, "a")
    with pytest.raises(InvalidInput) as info:
        m.entries("app", 7, ["a", "x\x00"])
    assert info.value.field == "target_ids[]"
    assert answer(m, "app", 7, ["x\x00"]) == reference("app", 7, ["x\x00"])


def test_a_full_memo_is_cleared_and_still_right() -> None:
    """Past its size the memo starts again; answers do not change."""
    m = memo(size=2)
    for t in ["a", "b", "c", "d:e"]:
        assert m.entry("app", 7, t) == (("app", 7, t), KEYS.entry("app", 7, t))
    assert m.entries("app", 7, ["a", "b", "c", "a"]) == reference("app", 7, ["a", "b", "c", "a"])
