# Generated from tiered_cache/_async/regenerating.py by tools/async_to_sync.py: do not edit; edit the source and run it again.
"""get_or_generate's regeneration marker in Redis: the previous result, served while one generation runs.

Hand-written async source (tools/async_to_sync.py generates the sync twin). While a lease winner generates a key
that has a previous result, the key set's `regenerating` key holds that row, so the others learn it in the one
read that looks for the entry and never ask PostgreSQL. The marker claims no more than PostgreSQL's peek did
(a live lease, and the previous row): it is stored under the fill lease rule (the lease is taken before the row
is read, see redis_tier.py), so a change committed in between refuses the fill or deletes it with its key set;
every change, and every placeholder that comes or goes (the history kill), deletes it; and it lapses with the
generation lease (refreshed after each heartbeat PostgreSQL granted), so a killed generator's marker ends with
its lease. A lost marker (eviction, restart, a refused write) only sends the others back to PostgreSQL.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from ..contracts import DOWN, MISS
from ..policy.failures import classify
from ..policy.keys import KeySet
from ..tiers.lua_scripts import FILL_SCRIPT
from .lua import evalsha

if TYPE_CHECKING:
    from .redis_tier import RedisTier

logger = logging.getLogger("tiered_cache.generate")


def read(tier: RedisTier, ks: KeySet) -> Any:
    """[entry, marker] in one MGET (each an encoded value or MISS), or DOWN: the tier's read rules apply."""
    raws = tier.get_raws([ks.entry, ks.regenerating])
    if raws is not DOWN:
        # The tier counts entry lookups: the marker is not one.
        if raws[1] is MISS:
            tier.stats.misses -= 1
        else:
            tier.stats.hits -= 1
    return raws


def store(tier: RedisTier, ks: KeySet, token: str, value: bytes, ttl: float) -> bool:
    """Store the marker for ttl seconds if the fill lease `token` (taken before `value` was read) still stands."""
    if tier.refusing:
        return False
    try:
        done = evalsha(tier.client, FILL_SCRIPT, (ks.regenerating, ks.lease),
                             (token, value, "px", max(1, int(ttl * 1000)), ""))
    except RedisError as exc:
        _failed(tier, exc, "store")
        return False
    return bool(done == 1)


def refresh(tier: RedisTier, ks: KeySet, ttl: float) -> None:
    """Extend a marker that still exists by ttl seconds from now (a deleted one stays deleted)."""
    if tier.refusing:
        return
    try:
        tier.client.pexpire(ks.regenerating, max(1, int(ttl * 1000)))
    except RedisError as exc:
        _failed(tier, exc, "refresh")


def _failed(tier: RedisTier, exc: RedisError, what: str) -> None:
    """A marker that is not stored or not extended costs the others a PostgreSQL read, nothing more: count, log."""
    tier.stats.errors += 1
    logger.debug("regeneration marker %s: %s (%s): %s", what, type(exc).__name__, classify(exc), exc)
