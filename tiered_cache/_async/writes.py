"""The write paths of AsyncTieredCache: commit in PostgreSQL, then every tier gets the change (or owes it).

Hand-written async source (tools/async_to_sync.py generates the sync twin). A base class of the facade, so
the facade module stays one screenful of reads and lifecycle; the order of the tiers is the same in both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ..contracts import Key, Row
from ..errors import Closed, InvalidInput, StoreUnavailable
from ..observe import span, tracing
from ..policy.keys import KeySet
from ..tiers._store_shared import WriteOutcome

if TYPE_CHECKING:
    from .._near_registry import Membership
    from ..policy.keys import KeySpace
    from .redis_tier import AsyncRedisTier
    from .store import AsyncPostgresStore

logger = logging.getLogger("tiered_cache.facade")


class AsyncCacheWrites:
    """write_cache, set_generating, finalize_cache, invalidate, invalidate_site, and the per-call observation."""

    store: AsyncPostgresStore
    redis: AsyncRedisTier
    keys: KeySpace
    metrics: Any
    _share: Membership

    async def _observed(self, op: str, call: Callable[..., Any], *args: Any) -> Any:
        """One public call: its span, and its count and latency by the tier that answered (metrics.CALLS)."""
        metrics = self.metrics
        if metrics is None and not tracing():
            return (await call(*args))[0]
        with span(op) as s:
            start = perf_counter()
            try:
                value, tier, result = await call(*args)
            except InvalidInput:
                if metrics is not None:
                    metrics.observe_call(op, "none", "invalid", perf_counter() - start)
                raise
            except Exception as exc:
                if metrics is not None:
                    where = "postgres" if isinstance(exc, StoreUnavailable) else "none"
                    metrics.observe_call(op, where, "error", perf_counter() - start)
                raise
            s.tier(tier, result)
            if metrics is not None:
                metrics.observe_call(op, tier, result, perf_counter() - start)
            return value

    # -- writes ---------------------------------------------------------------------------------
    # A call cancelled (or timed out, or interrupted) at any await of a write may or may not have committed:
    # its key's kill is then owed at once, with no await (see _abandoned), and the exception goes on.

    async def write_cache(
        self,
        cache_type: str,
        site_id: int,
        target_id: str,
        result_json: dict[str, Any],
        triggered_by: str | None = None,
        score: int | None = None,
        expires_at: datetime | None = None,
    ) -> int:
        """Insert a 'valid' row; once this returns, every process reads the new state."""
        return await self._observed(  # type: ignore[no-any-return]
            "write_cache", self._write_cache, cache_type, site_id, target_id, result_json, triggered_by, score,
            expires_at)

    async def _write_cache(self, cache_type: str, site_id: int, target_id: str, result_json: dict[str, Any],
                           triggered_by: str | None, score: int | None,
                           expires_at: datetime | None) -> tuple[int, str, str]:
        params = self.store.prepare_write(cache_type, site_id, target_id, result_json, triggered_by, score, expires_at)
        ks = self.keys.keyset(params["cache_type"], params["site_id"], params["target_id"])
        token = await self.redis.lease_for_write(ks)
        try:
            outcome = await self.store.write(params)
        except BaseException as exc:
            await self._failed_write(ks, token, exc)
            raise
        await self._through(ks, token, outcome.latest, outcome.txid)
        return outcome.id, "postgres", "ok"  # type: ignore[return-value]

    async def set_generating(self, cache_type: str, site_id: int, target_id: str,
                             triggered_by: str | None = None) -> int:
        """Insert a placeholder; the previous result keeps being served, from cache."""
        return await self._observed(  # type: ignore[no-any-return]
            "set_generating", self._set_generating, cache_type, site_id, target_id, triggered_by)

    async def _set_generating(self, cache_type: str, site_id: int, target_id: str,
                              triggered_by: str | None) -> tuple[int, str, str]:
        params = {
            **dict(zip(("cache_type", "site_id", "target_id"), self.store.validate_key(cache_type, site_id, target_id))),
            "triggered_by": self.store.prepare_triggered_by(triggered_by),
        }
        ks = self.keys.keyset(params["cache_type"], params["site_id"], params["target_id"])
        try:
            row_id = await self.store.insert_generating(params)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                self._abandoned([ks])
                raise
            await self._history_changed(ks)
            raise
        await self._history_changed(ks)
        return row_id, "postgres", "ok"

    async def _history_changed(self, ks: KeySet) -> None:
        """A placeholder changes only the key's history answers; the latest entry is simply read again."""
        try:
            await self.redis.kill([ks], history_only=True)
        except BaseException:
            self._abandoned([ks])
            raise
        self._evict_near(ks)

    async def finalize_cache(
        self, cache_id: int, result_json: dict[str, Any], score: int | None = None, cache_type: str | None = None
    ) -> bool:
        """Fill a 'generating' row (expiry from its own type); True if it did, and then every tier has it."""
        return await self._observed(  # type: ignore[no-any-return]
            "finalize_cache", self._finalize_cache, cache_id, result_json, score, cache_type)

    async def _finalize_cache(self, cache_id: int, result_json: dict[str, Any], score: int | None,
                              cache_type: str | None) -> tuple[bool, str, str]:
        params = self.store.prepare_finalize(cache_id, result_json, score, cache_type)
        found = await self.store.resolve_finalize(params)
        if found is None:
            logger.warning("finalize_cache: row %s does not exist", params["id"])
            return False, "postgres", "miss"
        outcome = await self._finalize_through(params, self.store.finalize)
        return (True, "postgres", "ok") if outcome.changed else (False, "postgres", "miss")

    async def _finalize_through(self, params: dict[str, Any], finalize: Callable[..., Any]) -> WriteOutcome:
        """Run a finalize statement (plain, or fenced by a generation lease) under the key's write lease."""
        ks = self.keys.keyset(params["cache_type"], params["site_id"], params["target_id"])
        token = await self.redis.lease_for_write(ks)
        try:
            outcome: WriteOutcome = await finalize(params)
        except BaseException as exc:
            await self._failed_write(ks, token, exc)
            raise
        if outcome.changed:
            await self._through(ks, token, outcome.latest, outcome.txid)
        else:
            await self.redis.release(ks, token)
        return outcome

    async def invalidate(self, cache_type: str, site_id: int, target_id: str) -> int:
        """Mark a key's valid rows 'invalidated' and cache the resulting 'no row'; returns how many rows."""
        return await self._observed("invalidate", self._invalidate, cache_type, site_id, target_id)  # type: ignore[no-any-return]

    async def _invalidate(self, cache_type: str, site_id: int, target_id: str) -> tuple[int, str, str]:
        key = self.store.validate_key(cache_type, site_id, target_id)
        ks = self.keys.keyset(*key)
        token = await self.redis.lease_for_write(ks)
        try:
            outcome = await self.store.invalidate_outcome(dict(zip(("cache_type", "site_id", "target_id"), key)))
        except BaseException as exc:
            await self._failed_write(ks, token, exc)
            raise
        await self._through(ks, token, None, outcome.txid)
        return outcome.id, "postgres", "ok"  # type: ignore[return-value]

    async def invalidate_site(self, site_id: int, cache_type: str | None = None) -> int:
        """Invalidate a venue's valid rows (optionally of one type) and drop every key that had one."""
        return await self._observed("invalidate_site", self._invalidate_site, site_id, cache_type)  # type: ignore[no-any-return]

    async def _invalidate_site(self, site_id: int, cache_type: str | None) -> tuple[int, str, str]:
        keysets: list[KeySet] = []

        async def lease(keys: list[Key]) -> None:
            # Inside the transaction: a write of one of these keys in flight cannot store its view after us.
            keysets.extend(self.keys.keyset(*key) for key in keys)
            await self.redis.leases_for_write(keysets)

        try:
            changed = await self.store.invalidate_site_keys(site_id, cache_type, before_commit=lease)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                self._abandoned(keysets)
                self._share.flush()
            elif keysets and not (isinstance(exc, StoreUnavailable) and not exc.maybe_committed):
                await self._drop(keysets)  # the commit may have happened before the failure
                self._share.flush()
            raise
        await self._drop(keysets)
        # A key another process had just invalidated is not among ours, but may still be near here (its
        # announcement in flight): read-your-writes in this process means no entry from before us survives.
        self._share.flush()
        return sum(changed.values()), "postgres", "ok"

    async def _through(self, ks: KeySet, token: Any, latest: Row | None, txid: str | None) -> None:
        """After a commit: every tier gets the new state (Redis under the writer's lease, this process's near)."""
        try:
            await self.redis.write_through(ks, token, latest, txid)
        except BaseException:
            self._abandoned([ks])  # cancelled inside the kill: it may not have reached Redis
            raise
        self._evict_near(ks)

    async def _drop(self, keysets: list[KeySet]) -> None:
        """Kill keys in Redis (owed if it fails) and in this process's near tier."""
        try:
            await self.redis.kill(keysets)
        except BaseException:
            self._abandoned(keysets)
            raise
        for ks in keysets:
            self._evict_near(ks)

    async def _failed_write(self, ks: KeySet, token: Any, exc: BaseException) -> None:
        """A write raised: if it may have committed, drop the key everywhere; if it certainly did not, keep the cache."""
        if not isinstance(exc, Exception):  # cancelled, timed out or interrupted: the commit may have happened
            self._abandoned([ks])
        elif isinstance(exc, Closed) or (isinstance(exc, StoreUnavailable) and not exc.maybe_committed):
            await self.redis.release(ks, token)
        else:
            await self._drop([ks])

    def _abandoned(self, keysets: list[KeySet]) -> None:
        """A write stopped at an await: owe its kills (applied before this process reads Redis again, and by
        the drainer for everyone else) and evict near, all without awaiting anything."""
        if keysets:
            self.redis.owe(keysets)
        for ks in keysets:
            self._evict_near(ks)

    def _evict_near(self, ks: KeySet) -> None:
        """Read-your-writes in this process at once, without waiting for our own announcement."""
        self._share.evict(ks.entry)

