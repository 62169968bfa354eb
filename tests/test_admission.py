"""TinyLFU admission (tiers/admission.py): estimates, ageing, and that it beats plain LRU on Zipf traffic."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from tiered_cache.tiers.admission import TinyLFU


def test_frequency_counts_accesses_after_the_doorkeeper_and_caps_at_16() -> None:
    t = TinyLFU(1000)
    assert t.frequency("k") == 0
    for n in range(1, 30):
        t.record("k")
        assert t.frequency("k") == min(n, 16)


def test_a_hot_key_is_admitted_over_a_cold_victim_and_not_the_reverse() -> None:
    t = TinyLFU(1000)
    for _ in range(5):
        t.record("hot")
    t.record("cold")
    assert t.admit("hot", "cold")
    assert not t.admit("cold", "hot")
    assert not t.admit("cold", "cold")  # a tie keeps the incumbent


def test_counts_halve_after_ten_accesses_per_entry_so_old_popularity_fades() -> None:
    t = TinyLFU(16)  # sample: 160 accesses
    for _ in range(10):
        t.record("old")
    before = t.frequency("old")
    for i in range(200):
        t.record(f"other-{i}")
    assert t.resets >= 1
    assert t.frequency("old") < before


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TinyLFU(0)


def _hit_rate(capacity: int, stream: list[int], lfu: TinyLFU | None) -> tuple[float, int]:
    """An LRU of `capacity` keys over the stream, with or without TinyLFU admission on each miss: hit rate, puts."""
    lru: OrderedDict[str, None] = OrderedDict()
    hits = puts = 0
    for n in stream:
        key = f"tc:e:{n}"
        if lfu is not None:
            lfu.record(key)
        if key in lru:
            hits += 1
            lru.move_to_end(key)
            continue
        if len(lru) >= capacity:
            victim = next(iter(lru))
            if lfu is not None and not lfu.admit(key, victim):
                continue
            del lru[victim]
        lru[key] = None
        puts += 1
    return hits / len(stream), puts


def test_on_zipf_traffic_over_a_working_set_14x_the_tier_it_hits_more_than_plain_lru() -> None:
    # The full bench's shape: 140,000 keys, Zipf s=1.1, a 10,000-entry tier (scaled down 10x here).
    rng = random.Random(11)
    keys, capacity = 14_000, 1_000
    weights = [1 / (rank ** 1.1) for rank in range(1, keys + 1)]
    stream = rng.choices(range(keys), weights=weights, k=200_000)
    plain, plain_puts = _hit_rate(capacity, stream, None)
    admitted, admitted_puts = _hit_rate(capacity, stream, TinyLFU(capacity))
    print(f"\nnear tier, Zipf 1.1 over 14x the tier, 200k reads: LRU hits {plain:.1%} with {plain_puts} puts; "
          f"LRU + TinyLFU hits {admitted:.1%} with {admitted_puts} puts")
    assert admitted > plain  # more hits
    assert admitted_puts * 2 < plain_puts  # and most of the puts that would not pay are skipped


def test_an_expired_victim_gives_way_to_any_newcomer() -> None:
    """Entries live at most max_age, so a full tier's LRU end is often dead: a newcomer takes its place even if
    the dead key was asked for more often (the doorkeeper would otherwise keep every new key out)."""
    from tiered_cache.contracts import MISS
    from tiered_cache.tiers.near import NearTier

    now = [0.0]
    near = NearTier(max_entries=2, max_bytes=1 << 20, max_age=2.0, timer=lambda: now[0], wall_clock=lambda: 1e9)
    near.active = True
    for key in ("hot", "warm"):
        near.put(key, b"x", None, near.epoch)
    for _ in range(10):
        near.get_raw("hot")
        near.get_raw("warm")
    near.put("cold", b"x", None, near.epoch)  # alive victim, asked for more: rejected
    assert near.stats.puts_rejected == 1 and near.get_raw("cold") is MISS
    now[0] = 5.0  # both entries are past max_age
    near.put("cold", b"y", None, near.epoch)
    assert near.stats.puts_rejected == 1 and near.get_raw("cold") == b"y"
