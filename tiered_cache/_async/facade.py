"""AsyncTieredCache: the one object callers use; the only module that knows the order of the tiers.

Hand-written async source; tools/async_to_sync.py generates the sync TieredCache from it. Background work
(the coherence listener, the relay) runs in threads shared by both APIs, so announcements keep being
applied while an event loop is busy; the owed-kill drainer is a task here and a thread in the sync twin.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

from .._acompat import arun_blocking
from .._near_registry import REGISTRY
from .._sync_client import relay_tier
from ..coherence import CoherenceListener
from ..contracts import DOWN, MISS, Key, Row
from ..errors import Closed
from ..observe import tracing
from ..policy.breaker import CircuitBreaker
from ..policy.entries import NEGATIVE, decode, encode, encode_entry, entry_expires_at_ms, expires_at_ms
from ..policy.key_memo import KeyMemo
from ..policy.keys import KeySet, KeySpace
from ..policy.page_gate import KeyGate, PageGate
from ..policy.validation import cache_options
from ..relay import Relay
from ..tiers.near import NearTier, check_bounds, history_key
from . import regenerating
from .client import async_redis_client, close_client, ready_client
from .flights import AsyncFlights
from .generate import AsyncGenerations
from .redis_tier import AsyncRedisTier
from .store import AsyncPostgresStore
from .writes import AsyncCacheWrites

logger = logging.getLogger("tiered_cache.facade")
_monotonic = time.monotonic

_STORE_OPTIONS = frozenset({"policy", "clock", "limits", "retention", "generating_timeout", "outbox_retention",
                            "min_size", "max_size", "pool_timeout", "connect_timeout"})
_TIER_OPTIONS = frozenset({"kill_wait", "probe_interval", "hold_down", "max_owed"})


class AsyncTieredCache(AsyncGenerations, AsyncCacheWrites):
    """AsyncPostgresStore's methods and answers (reads also as JSON bytes), from cache, never stale after a write."""

    def __init__(
        self,
        store: AsyncPostgresStore,
        redis_client: Any,
        *,
        namespace: str = "tc",
        negative_ttl: float = 3600.0,
        no_expiry_ttl: float = 3600.0,
        history_ttl: float = 3600.0,
        lease_ttl: float = 5.0,
        breaker_threshold: int = 2,
        breaker_reset: float = 1.0,
        near_max_entries: int = 0,
        near_max_bytes: int = 64 << 20,
        near_max_age: float = 2.0,
        relay: bool = False,
        owns_clients: bool = False,
        metrics: Any = None,
        **tier_options: Any,
    ) -> None:
        cache_options({"negative_ttl": negative_ttl, "no_expiry_ttl": no_expiry_ttl, "history_ttl": history_ttl,
                       "lease_ttl": lease_ttl}, tier_options, _TIER_OPTIONS)
        self.store = store
        #: Told of every public call (tiered_cache.metrics.TieredCacheMetrics, or anything with its observe_call).
        self.metrics = metrics
        self.keys = KeySpace(namespace)
        self.redis = AsyncRedisTier(redis_client, self.keys, negative_ttl=negative_ttl, no_expiry_ttl=no_expiry_ttl,
                                    history_ttl=history_ttl, lease_ttl=lease_ttl,
                                    breaker=CircuitBreaker(breaker_threshold, breaker_reset), **tier_options)
        self._owns_clients = owns_clients
        self._memo = KeyMemo(store.validate_key, store.validate_many, self.keys.entry, store.limits)
        self._latest_reads = AsyncFlights()  # get_latest misses of one key at once share a PostgreSQL read
        self._marker_reads = AsyncFlights()  # and get_or_generate's callers of one key share a Redis read
        self._redis_client = redis_client
        bounds = (near_max_entries, near_max_bytes, near_max_age) if near_max_entries else None
        if bounds is not None:
            check_bounds(*bounds)  # before the relay starts: joining the registry cannot fail after it
        # The relay is a thread with a sync tier of its own on the same Redis (the sync API shares its tier).
        self.relay: Relay | None = Relay(store.dsn, relay_tier(self.redis)).start() if relay else None
        # The process's near tier and listener for this Redis and namespace (see _near_registry).
        self._share = REGISTRY.join(redis_client, namespace, self.keys.channel, bounds)
        self.near: NearTier | None = self._share.near
        self.listener: CoherenceListener | None = self._share.listener
        self._init_generations()
        self._pages = PageGate()  # get_many tries the near tier only while it answers whole pages
        self._reads = KeyGate()  # and get_latest / get_history only while it answers often enough

    @classmethod
    async def connect(cls, dsn: str, redis_url: str, *, redis_timeout: float = 0.05,
                      **options: Any) -> AsyncTieredCache:
        """Build the store and a bounded Redis client from a DSN and a URL; options go to whichever takes them."""
        store_options = {k: options.pop(k) for k in list(options) if k in _STORE_OPTIONS}
        store = await AsyncPostgresStore.connect(dsn, **store_options)
        try:
            client = await ready_client(async_redis_client(redis_url, timeout=redis_timeout))
            return cls(store, client, owns_clients=True, **options)
        except BaseException:
            await store.close()
            raise

    # -- reads ----------------------------------------------------------------------------------

    # Each read has a JSON twin (get_latest_json...) on the same path: same tiers, leases and fills, but it
    # answers the stored bytes, orjson.dumps of what the dict method returns, byte for byte, never decoded.

    async def get_latest(self, cache_type: str, site_id: int, target_id: str) -> Row | None:
        """The newest servable row of a key: near, then Redis, then PostgreSQL (filled upward under a lease)."""
        if self.metrics is None and not tracing():
            return (await self._get_latest(cache_type, site_id, target_id))[0]
        return await self._observed("get_latest", self._get_latest, cache_type, site_id, target_id)

    async def get_latest_json(self, cache_type: str, site_id: int, target_id: str) -> bytes | None:
        """get_latest as JSON bytes (None for no row), for a handler to send without decoding a row."""
        if self.metrics is None and not tracing():
            return (await self._get_latest(cache_type, site_id, target_id, True))[0]
        return await self._observed("get_latest_json", self._get_latest, cache_type, site_id, target_id, True)

    async def _get_latest(self, cache_type: str, site_id: int, target_id: str,
                          as_json: bool = False) -> tuple[Any, str, str]:
        key, entry = self._memo.entry(cache_type, site_id, target_id)
        near = self.near
        if near is not None:
            if self._reads.try_near():  # else no lookup (it rarely answers now), and a put only to keep it warm
                found = near.get_raw(entry) if as_json else near.get(entry)
                self._reads.tried_read(found is not MISS)
                if found is not MISS:
                    return ((None if found == NEGATIVE else found) if as_json else found), "near", "hit"
            elif not self._reads.warm:
                near = None  # neither lookup nor put (policy/page_gate.KeyGate)
            else:
                near.note(entry)  # no lookup counted this ask: the put that follows competes with it
        if near is not None:
            epoch, started = near.epoch, near.timer()  # before Redis: a later change forbids the put
        raw = await self.redis.get_raw(entry)
        if raw is not MISS and raw is not DOWN:
            if as_json:
                if near is not None:
                    near.put(entry, raw, entry_expires_at_ms(raw), epoch, started=started)
                return (None if raw == NEGATIVE else raw), "redis", "hit"
            row = decode(raw)
            if near is not None:
                near.put(entry, raw, expires_at_ms(row), epoch, started=started)
            return row, "redis", "hit"
        return await self._latest_below(key, entry, raw, as_json, (epoch, started) if near is not None else None)

    async def _latest_below(self, key: Key, entry: str, raw: Any, as_json: bool,
                            near_at: tuple[Any, float] | None) -> tuple[Any, str, str]:
        """Redis missed (MISS) or is skipped (DOWN): PostgreSQL's answer, filled upward (near_at: the near tier's
        epoch and time, taken before Redis was asked). Callers of this object missing the key at once share one
        read sent after they got here (see flights.py); each fills Redis only under its own lease, granted before
        that read was sent, and only the one that sent it fills the near tier."""
        after = _monotonic()
        ks = self.keys.keyset(*key) if raw is MISS else None
        token = await self.redis.lease(ks.lease) if ks is not None else None
        if token is not None:
            after = _monotonic()  # the fill lease rule: only a read sent after the lease was granted may fill
        (row, value), mine = await self._latest_reads.ask(key, after, functools.partial(self._read_latest, key))
        if not mine and (token is not None or not as_json):
            row = decode(value)  # the sender's row is its own: every caller gets a dict of its own
        if token is not None:
            await self.redis.fill_entry(ks, token, value, row)  # type: ignore[union-attr]
        if mine and near_at is not None and raw is not DOWN:
            self.near.put(entry, value, expires_at_ms(row), near_at[0], started=near_at[1])  # type: ignore[union-attr]
        answer = (None if value == NEGATIVE else value) if as_json else row
        return answer, "postgres", "miss" if raw is MISS else "bypass"

    async def _read_latest(self, key: Key) -> tuple[Row | None, bytes]:
        """One PostgreSQL read of a key's servable row, with its encoding (what a shared answer hands over)."""
        row = await self.store.get_latest(*key)
        return row, encode_entry(row)

    async def _latest_or_regenerating(self, key: Key, entry: str,
                                      begun: float) -> tuple[tuple[Row | None, Row | None], str, str]:
        """get_or_generate's read: get_latest, and in the same Redis round trip the key's regeneration marker.

        ((row, None), ...) as get_latest would answer, or ((None, previous), ...) when no row is servable and a
        generation under way left its previous result in Redis (see _async/regenerating.py): no PostgreSQL read.
        Callers asking for one key at once share one Redis read sent after they began (see flights.py).
        """
        near = self.near
        near_at = None
        if near is not None:
            found = near.get(entry)
            if found is not MISS and found is not None:  # a cached "no row" here: the marker is in Redis only
                return (found, None), "near", "hit"
            near_at = (near.epoch, near.timer())
        ks = self.keys.keyset(*key)
        raws, mine = await self._marker_reads.ask(entry, begun, functools.partial(regenerating.read, self.redis, ks))
        raw = raws if raws is DOWN else raws[0]
        if raw is not MISS and raw is not DOWN:
            row = decode(raw)
            if mine and near_at is not None:
                near.put(entry, raw, expires_at_ms(row), near_at[0], started=near_at[1])  # type: ignore[union-attr]
            if row is not None or raws[1] is MISS:
                return (row, None), "redis", "hit"
        if raw is not DOWN and raws[1] is not MISS:
            return (None, decode(raws[1])), "redis", "hit"
        row, tier, result = await self._latest_below(key, entry, raw, False, near_at)
        return (row, None), tier, result

    async def get_many(self, cache_type: str, site_id: int, target_ids: Sequence[str]) -> dict[str, Row | None]:
        """get_latest for many targets: near first, one MGET for the rest, one query for Redis's misses, one fill."""
        if self.metrics is None and not tracing():
            return (await self._get_many(cache_type, site_id, target_ids))[0]
        return await self._observed("get_many", self._get_many, cache_type, site_id, target_ids)

    async def get_many_json(self, cache_type: str, site_id: int,
                            target_ids: Sequence[str]) -> dict[str, bytes | None]:
        """get_many as {target: JSON bytes or None}; orjson.dumps of {t: orjson.Fragment(b)} makes one page of it."""
        if self.metrics is None and not tracing():
            return (await self._get_many(cache_type, site_id, target_ids, True))[0]
        return await self._observed("get_many_json", self._get_many, cache_type, site_id, target_ids, True)

    async def _get_many(self, cache_type: str, site_id: int, target_ids: Sequence[str],
                        as_json: bool = False) -> tuple[dict[str, Any], str, str]:
        """Answered by the lowest tier any target needed."""
        ct, site, ids, entries = self._memo.entries(cache_type, site_id, target_ids)
        if not ids:
            return {}, "none", "ok"
        found: dict[str, Any] = {}
        near = self.near
        if near is not None and not self._pages.try_near():
            near = None  # pages are rarely whole in the near tier now: a plain Redis page (see policy/page_gate)
        if near is not None:
            epoch, started = near.epoch, near.timer()
            ask = []
            for target, entry, value in zip(ids, entries, near.get_raws(entries)):
                if value is MISS:
                    ask.append((target, entry))
                elif as_json:
                    found[target] = None if value == NEGATIVE else value
                else:
                    found[target] = decode(value)  # a dict of the caller's own
            self._pages.tried_page(not ask, 1.0 - len(ask) / len(ids))
            if not ask:
                return found, "near", "hit"
        else:
            ask = list(zip(ids, entries))
        raws = await self.redis.get_raws([entry for _, entry in ask])
        if raws is DOWN:
            rows = await self.store.fetch_many(ct, site, [t for t, _ in ask])
            found.update({t: None if r is None else encode(r) for t, r in rows.items()} if as_json else rows)
            return {t: found[t] for t in ids}, "postgres", "bypass"
        missing: list[tuple[str, str]] = []
        for (target, entry), raw in zip(ask, raws):
            if raw is MISS:
                missing.append((target, entry))
            elif as_json:
                found[target] = None if raw == NEGATIVE else raw
                if near is not None:
                    near.put(entry, raw, entry_expires_at_ms(raw), epoch, started=started)
            else:
                row = found[target] = decode(raw)
                if near is not None:
                    near.put(entry, raw, expires_at_ms(row), epoch, started=started)
        if not missing:
            return {t: found[t] for t in ids}, "redis", "hit"
        keysets = [self.keys.keyset(ct, site, t) for t, _ in missing]
        tokens = await self.redis.leases([ks.lease for ks in keysets])
        rows = await self.store.fetch_many(ct, site, [t for t, _ in missing])
        fills = []
        for (target, entry), ks, token in zip(missing, keysets, tokens):
            row = rows[target]
            value = encode_entry(row)
            found[target] = (None if row is None else value) if as_json else row
            if token is not None:
                fills.append((ks, token, value, row))
            if near is not None:
                near.put(entry, value, expires_at_ms(row), epoch, started=started)
        if fills:
            await self.redis.fill_entries(fills)
        return {t: found[t] for t in ids}, "postgres", "miss"

    async def get_history(self, cache_type: str, site_id: int, target_id: str, limit: int = 2) -> list[Row]:
        """The newest `limit` rows of a key, any status; cached per limit, dropped on every change of the key."""
        return await self._observed("get_history", self._get_history, cache_type, site_id, target_id, limit)

    async def get_history_json(self, cache_type: str, site_id: int, target_id: str, limit: int = 2) -> bytes:
        """get_history as the bytes of its JSON list."""
        return await self._observed(  # type: ignore[no-any-return]
            "get_history_json", self._get_history, cache_type, site_id, target_id, limit, True)

    async def _get_history(self, cache_type: str, site_id: int, target_id: str, limit: int,
                           as_json: bool = False) -> tuple[Any, str, str]:
        key, entry = self._memo.entry(cache_type, site_id, target_id)
        limit = self.store.validate_limit(limit)
        near = self.near
        if near is not None:
            if self._reads.try_near():
                found = near.get_raw(history_key(entry, limit)) if as_json else near.get(history_key(entry, limit))
                self._reads.tried_read(found is not MISS)
                if found is not MISS:
                    return found, "near", "hit"
            elif not self._reads.warm:
                near = None
            else:
                near.note(history_key(entry, limit))
        if near is not None:
            epoch, started = near.epoch, near.timer()
        ks = self.keys.keyset(*key)
        raw = await self.redis.get_history(ks, limit)
        if raw is not MISS and raw is not DOWN:
            if near is not None:
                near.put_history(entry, limit, raw, epoch, started)
            return raw if as_json else decode(raw), "redis", "hit"
        token = await self.redis.lease(ks.history_lease) if raw is MISS else None
        rows = await self.store.get_history(*key, limit=limit)
        value = None
        if token is not None or (near is not None and raw is not DOWN) or as_json:
            value = encode(rows)
            if token is not None:
                await self.redis.fill_history(ks, token, limit, value)
            if near is not None and raw is not DOWN:
                near.put_history(entry, limit, value, epoch, started)
        return value if as_json else rows, "postgres", "miss" if raw is MISS else "bypass"

    # -- lifecycle ------------------------------------------------------------------------------

    def keyset(self, cache_type: str, site_id: int, target_id: str) -> KeySet:
        """The Redis keys of one cache key (for tools and tests)."""
        return self.keys.keyset(*self.store.validate_key(cache_type, site_id, target_id))

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters of every tier and background worker, for metrics export."""
        from dataclasses import asdict

        out = {"redis": asdict(self.redis.stats)}
        out["redis"]["breaker_trips"] = self.redis.breaker.trips
        if self.near is not None:
            out["near"] = {**asdict(self.near.stats), "entries": len(self.near), "bytes": self.near.size_bytes,
                           # this object's gates (policy/page_gate): reads and pages that tried the tier or skipped it
                           "reads_tried": self._reads.tried, "reads_skipped": self._reads.skipped,
                           "pages_tried": self._pages.tried, "pages_skipped": self._pages.skipped}
        if self.listener is not None:
            out["listener"] = asdict(self.listener.stats)
        if self.relay is not None:
            out["relay"] = asdict(self.relay.stats)
        out["generations"] = asdict(self.generation_stats)
        return out

    async def health(self, **options: Any) -> Any:
        """Readiness: each tier reachable, listener subscribed, relay lag, owed kills (see tiered_cache.health)."""
        from ..health import ahealth

        return await ahealth(self, **options)

    async def close(self) -> None:
        """Stop background work; close the pool and client if connect() made them. Every later call raises Closed."""
        self.__class__ = _closed_class(type(self))  # first: no call of this object sends anything from now on
        sync = getattr(self.metrics, "sync", None)
        if sync is not None:
            sync(self)  # the last counts, before this cache goes
        if self.relay is not None:
            await arun_blocking(self.relay.stop)  # joins a thread: off the event loop
        await arun_blocking(self._share.leave)  # the last cache on this near tier stops its listener
        await self.redis.close()
        if self._owns_clients:
            await self.store.close()
            await close_client(self._redis_client)

    async def __aenter__(self) -> AsyncTieredCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _refused(name: str) -> Any:
    async def refuse(self: AsyncTieredCache, *args: Any, **kwargs: Any) -> Any:
        raise Closed(f"{type(self).__mro__[1].__name__}.{name}: the cache is closed; nothing was sent")

    refuse.__name__ = name
    return refuse


def _refused_now(name: str) -> Any:
    def refuse(self: AsyncTieredCache, *args: Any, **kwargs: Any) -> Any:
        raise Closed(f"{type(self).__mro__[1].__name__}.{name}: the cache is closed; nothing was sent")

    refuse.__name__ = name
    return refuse


async def _closed_noop(self: Any) -> None:
    """close() of a closed cache: nothing to do."""


@functools.cache
def _closed_class(cls: type) -> type:
    """What a cache of class cls becomes on close(): every call raises Closed before any I/O, at no cost while open."""
    calls = ("get_latest", "get_many", "get_history", "get_latest_json", "get_many_json", "get_history_json",
             "write_cache", "set_generating", "finalize_cache",
             "invalidate", "invalidate_site", "health", "get_or_generate")
    return type(f"Closed{cls.__name__}", (cls,), {"close": _closed_noop, "keyset": _refused_now("keyset"),
                                                  **{n: _refused(n) for n in calls}})
