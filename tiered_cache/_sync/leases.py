# Generated from tiered_cache/_async/leases.py by tools/async_to_sync.py: do not edit; edit the source and run it again.
"""get_or_generate's generation leases in PostgreSQL: acquire, heartbeat, fenced finalize, release on failure.

Hand-written async source (tools/async_to_sync.py generates the sync twin). PostgreSQL arbitrates, not
Redis: a lease survives a Redis restart or failover, and single flight holds with Redis down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..tiers import _sql, _sql_leases
from ..tiers._store_shared import Key, WriteOutcome
from .store import PostgresStore

logger = logging.getLogger("tiered_cache.generate")


@dataclass(frozen=True)
class Grant:
    """What biz.ai_cache_acquire answered (see migrations/0004): the outcome and what goes with it."""

    outcome: str  # current | busy | failed | won | taken_over
    token: int
    placeholder: int | None
    current_id: int | None
    failed: str | None


def _key_params(key: Key) -> dict[str, Any]:
    return {"cache_type": key[0], "site_id": key[1], "target_id": key[2]}


class Leases:
    """The lease statements, run on the store's pool (its retries, timeouts and failure classes)."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    def acquire(self, key: Key, *, seen: int | None, waited: int | None, holder: str, ttl: float,
                      triggered_by: str | None) -> Grant:
        """Try for the key's lease in one round trip: granted, or why not."""
        params = {**_key_params(key), "seen": seen, "waited": waited, "holder": holder,
                  "ttl": timedelta(seconds=ttl), "triggered_by": triggered_by}
        rows, _ = self.store._write(_sql_leases.ACQUIRE, params, "get_or_generate")
        outcome, token, placeholder, current_id, failed = rows[0]
        return Grant(outcome, token, placeholder, current_id, failed)

    def heartbeat(self, key: Key, token: int, holder: str, ttl: float) -> bool:
        """Extend the lease by ttl from now; False if it was taken over (or released) meanwhile."""
        params = {**_key_params(key), "token": token, "holder": holder, "ttl": timedelta(seconds=ttl)}
        rows, _ = self.store._write(_sql_leases.HEARTBEAT, params, "get_or_generate")
        return bool(rows)

    def release_failed(self, key: Key, token: int, holder: str, error: str) -> None:
        """generate() raised: retire the placeholder, release the lease, leave the error for the waiters."""
        params = {**_key_params(key), "token": token, "holder": holder, "failed": error[:1000]}
        self.store._write(_sql_leases.RELEASE_FAILED, params, "get_or_generate")

    def finalize(self, params: dict[str, Any]) -> WriteOutcome:
        """store.finalize fenced by params' token and holder: changed is False if the lease moved on."""
        rows, _ = self.store._write(_sql_leases.FINALIZE_FENCED, params, "get_or_generate")
        key = (params["cache_type"], params["site_id"], params["target_id"])
        if not rows:
            logger.warning("get_or_generate: lease %s of %s was taken over or its placeholder reclaimed; "
                           "this result was not stored", params["token"], key)
            return WriteOutcome(params["id"], key, None, False)
        return WriteOutcome(params["id"], key, _sql.pick_servable(rows), True, rows[0][-1])

    def previous(self, key: Key) -> dict[str, Any] | None:
        """The row served while a key regenerates: past its expiry, never invalidated, not yet swept."""
        rows = self.store._read(_sql_leases.PREVIOUS, _key_params(key), "get_or_generate")
        return _sql.row_dict(_sql.LATEST_COLUMNS, rows[0]) if rows else None

    def peek(self, key: Key) -> tuple[bool, dict[str, Any] | None]:
        """Whether a live lease is held on the key, and its previous result: one read, no lock."""
        rows = self.store._read(_sql_leases.PEEK, _key_params(key), "get_or_generate")
        busy, *previous = rows[0]
        return bool(busy), _sql.row_dict(_sql.LATEST_COLUMNS, tuple(previous)) if previous[0] is not None else None

    def row(self, key: Key) -> dict[str, Any] | None:
        """The key's servable row, from PostgreSQL itself (a generation finished; Redis may not have it yet)."""
        return self.store.get_latest(*key)
