"""The async hit-path contenders: each serves get_latest / get_history / get_many of the same rows in one event loop.

Each also builds a board page's response body (page_body: the JSON bytes of {target: row or null}) its
best way: AsyncTieredCache from get_many_json's bytes (orjson.Fragment), the peers by encoding get_many's
rows, the floor by MGET + orjson.loads + orjson.dumps (the decoding floor), the passthrough floor by
joining the MGET bytes. The floors read the very keys and bytes AsyncTieredCache stored, on the very
client (and pool) it uses; the peers (cashews, aiocache) are cache-aside over the same AsyncPostgresStore,
filled with the same rows before anything is timed, each with its own default serializer and client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson

SITE = 9_999_002
APP = "app3_clue"
NAMESPACE = "tcbench-amicro"
HISTORY_LIMIT = 2
PEER_TTL = 3600  # the peers have no per-row expiry: a flat TTL, as in the main bench
_MISSING = object()


class AsyncContender:
    """One compared path: the three reads, by target id(s), on site SITE and app APP."""

    name = "?"
    note = ""

    async def get_latest(self, target: str) -> Any:
        raise NotImplementedError

    async def get_history(self, target: str) -> Any:
        raise NotImplementedError

    async def get_many(self, targets: Sequence[str]) -> Any:
        raise NotImplementedError

    async def page_body(self, targets: Sequence[str]) -> bytes:
        """A board page as a handler sends it: the JSON bytes of {target: row or null}."""
        return orjson.dumps(await self.get_many(targets))

    def as_row(self, answer: Any) -> Any:
        """get_latest's or get_history's answer as rows, to compare contenders (not timed)."""
        return answer

    def as_many(self, answer: Any, targets: Sequence[str]) -> dict[str, Any]:
        """get_many's answer as {target: row}, to compare contenders (not timed)."""
        return dict(answer)

    def tier_errors(self) -> int | None:
        """Reads the contender served around Redis (from PostgreSQL) so far; None where it does not count them."""
        return None

    async def close(self) -> None:
        pass


class RawFloor(AsyncContender):
    """redis.asyncio GET / HGET / MGET of the bytes AsyncTieredCache stores, plus orjson.loads: nothing else."""

    name = "floor: redis.asyncio + orjson"
    note = "AsyncTieredCache's own client and pool; the same keys and bytes"

    def __init__(self, cache: Any, targets: Sequence[str]) -> None:
        self.client = cache.redis.client
        # Key strings are built before timing (AsyncTieredCache memoizes its own): the floor times only I/O and decode.
        self.entry = {t: cache.keys.entry(APP, SITE, t) for t in targets}
        self.history = {t: cache.keys.keyset(APP, SITE, t).history for t in targets}
        self.limit = str(HISTORY_LIMIT)

    async def get_latest(self, target: str) -> Any:
        return orjson.loads(await self.client.get(self.entry[target]))

    async def get_history(self, target: str) -> Any:
        return orjson.loads(await self.client.hget(self.history[target], self.limit))

    async def get_many(self, targets: Sequence[str]) -> Any:
        loads, entry = orjson.loads, self.entry
        return [loads(r) for r in await self.client.mget([entry[t] for t in targets])]

    async def page_body(self, targets: Sequence[str]) -> bytes:
        loads, entry = orjson.loads, self.entry
        rows = [loads(r) for r in await self.client.mget([entry[t] for t in targets])]
        return orjson.dumps(dict(zip(targets, rows)))

    def as_many(self, answer: Any, targets: Sequence[str]) -> dict[str, Any]:
        return dict(zip(targets, answer))


class PassthroughFloor(RawFloor):
    """The same reads with nothing decoded: the bytes as Redis returns them; a page is the MGET bytes joined."""

    name = "floor: redis.asyncio bytes"
    note = "the same client, keys and bytes; no decode (what serving bytes as they are costs at least)"

    def __init__(self, cache: Any, targets: Sequence[str]) -> None:
        super().__init__(cache, targets)
        self.member = {t: orjson.dumps(t) + b":" for t in targets}  # each page key, JSON-encoded before timing

    async def get_latest(self, target: str) -> Any:
        return await self.client.get(self.entry[target])

    async def get_history(self, target: str) -> Any:
        return await self.client.hget(self.history[target], self.limit)

    async def get_many(self, targets: Sequence[str]) -> Any:
        entry = self.entry
        return await self.client.mget([entry[t] for t in targets])

    async def page_body(self, targets: Sequence[str]) -> bytes:
        entry, member = self.entry, self.member
        raws = await self.client.mget([entry[t] for t in targets])
        return b"{" + b",".join([member[t] + raw for t, raw in zip(targets, raws)]) + b"}"

    def as_row(self, answer: Any) -> Any:
        return orjson.loads(answer)

    def as_many(self, answer: Any, targets: Sequence[str]) -> dict[str, Any]:
        return dict(zip(targets, map(orjson.loads, answer)))


class Tiered(AsyncContender):
    """AsyncTieredCache's public calls."""

    def __init__(self, cache: Any, name: str, note: str = "") -> None:
        self.cache, self.name, self.note = cache, name, note

    async def get_latest(self, target: str) -> Any:
        return await self.cache.get_latest(APP, SITE, target)

    async def get_history(self, target: str) -> Any:
        return await self.cache.get_history(APP, SITE, target, HISTORY_LIMIT)

    async def get_many(self, targets: Sequence[str]) -> Any:
        return await self.cache.get_many(APP, SITE, targets)

    async def page_body(self, targets: Sequence[str]) -> bytes:
        page = await self.cache.get_many_json(APP, SITE, targets)
        fragment = orjson.Fragment
        return orjson.dumps({t: None if raw is None else fragment(raw) for t, raw in page.items()})

    def tier_errors(self) -> int | None:
        stats = self.cache.redis.stats
        return int(stats.errors + stats.skipped)  # failed Redis calls, and calls the open breaker sent to PostgreSQL

    async def close(self) -> None:
        await self.cache.close()


class _CacheAside(AsyncContender):
    """A peer's cache-aside reads: its cache first, AsyncPostgresStore on a miss, then set with a flat TTL."""

    prefix = "?"

    def __init__(self, store: Any) -> None:
        self.store = store

    def _latest(self, target: str) -> str:
        return f"{self.prefix}l:{APP}:{SITE}:{target}"

    def _history(self, target: str) -> str:
        return f"{self.prefix}h:{APP}:{SITE}:{target}:{HISTORY_LIMIT}"

    async def _get(self, key: str) -> Any:
        raise NotImplementedError

    async def _get_multi(self, keys: list[str]) -> Sequence[Any]:
        raise NotImplementedError

    async def _set(self, key: str, value: Any) -> None:
        raise NotImplementedError

    async def get_latest(self, target: str) -> Any:
        key = self._latest(target)
        value = await self._get(key)
        if value is _MISSING:
            value = await self.store.get_latest(APP, SITE, target)
            await self._set(key, value)
        return value

    async def get_history(self, target: str) -> Any:
        key = self._history(target)
        value = await self._get(key)
        if value is _MISSING:
            value = await self.store.get_history(APP, SITE, target, HISTORY_LIMIT)
            await self._set(key, value)
        return value

    async def get_many(self, targets: Sequence[str]) -> Any:
        values = await self._get_multi([self._latest(t) for t in targets])
        found = dict(zip(targets, values))
        missing = [t for t, v in found.items() if v is _MISSING]
        if missing:
            rows = await self.store.fetch_many(APP, SITE, missing)
            for t in missing:
                found[t] = rows[t]
                await self._set(self._latest(t), rows[t])
        return found


class CashewsPeer(_CacheAside):
    """cashews' native async API on its Redis backend (get / get_many / set)."""

    name = "cashews redis"
    prefix = f"{NAMESPACE}-cw:"
    note = "its defaults: pickle serializer with check_repr; its own redis.asyncio client"

    def __init__(self, store: Any, redis_url: str) -> None:
        super().__init__(store)
        from cashews import Cache

        self.cache = Cache()
        self.cache.setup(redis_url, suppress=False)

    async def _get(self, key: str) -> Any:
        return await self.cache.get(key, default=_MISSING)

    async def _get_multi(self, keys: list[str]) -> Sequence[Any]:
        return await self.cache.get_many(*keys, default=_MISSING)

    async def _set(self, key: str, value: Any) -> None:
        await self.cache.set(key, value, expire=PEER_TTL)

    async def close(self) -> None:
        await self.cache.close()


class CashewsClientSidePeer(CashewsPeer):
    """cashews with client_side=True: a local copy kept coherent by CLIENT TRACKING BCAST (Redis >= 6)."""

    name = "cashews client-side"
    prefix = ""  # client-side mode prefixes keys itself, with client_side_prefix
    note = "client_side=True: local hits return the cached object itself, not a copy; its defaults otherwise"

    def __init__(self, store: Any, redis_url: str) -> None:
        _CacheAside.__init__(self, store)
        from cashews import Cache

        self.cache = Cache()
        self.backend = self.cache.setup(redis_url, client_side=True, client_side_prefix=f"{NAMESPACE}-cs:",
                                        suppress=False)

    async def started(self) -> None:
        """Wait until tracking is subscribed: before that its local copy is not used."""
        import asyncio

        await self.cache.init()
        for _ in range(500):
            if self.backend._listen_started.is_set():
                return
            await asyncio.sleep(0.01)
        raise RuntimeError("cashews client-side tracking did not start (CLIENT TRACKING BCAST not subscribed)")


class AiocachePeer(_CacheAside):
    """aiocache's RedisCache (get / multi_get / set)."""

    name = "aiocache redis"
    prefix = ""  # aiocache prefixes its namespace itself
    note = "its defaults: JsonSerializer (stdlib json); its own redis.asyncio pool"

    def __init__(self, store: Any, redis_url: str) -> None:
        super().__init__(store)
        from aiocache import RedisCache

        url = urlsplit(redis_url)
        db = int(url.path.strip("/") or 0)
        self.cache = RedisCache(endpoint=url.hostname or "127.0.0.1", port=url.port or 6379, db=db,
                                namespace=f"{NAMESPACE}-ac:")

    async def _get(self, key: str) -> Any:
        return await self.cache.get(key, default=_MISSING)

    async def _get_multi(self, keys: list[str]) -> Sequence[Any]:
        return [_MISSING if v is None else v for v in await self.cache.multi_get(keys)]

    async def _set(self, key: str, value: Any) -> None:
        await self.cache.set(key, value, ttl=PEER_TTL)

    async def close(self) -> None:
        await self.cache.close()


async def build(dsn: str, redis_url: str, targets: Sequence[str], redis_timeout: float = 0.05) -> list[AsyncContender]:
    """Every contender, its data written and read once (so each serves from its cache); the floor first.

    redis_timeout goes to both AsyncTieredCache clients, so the floor (on the first one's client) has it too.
    """
    import asyncio

    from tiered_cache import AsyncTieredCache

    from ._workload import document_pool

    docs = document_pool(1)
    cache = await AsyncTieredCache.connect(dsn, redis_url, namespace=NAMESPACE, redis_timeout=redis_timeout)
    for i, t in enumerate(targets):
        await cache.write_cache(APP, SITE, t, docs[i % len(docs)], "bench-amicro", 80)
        if i % 3 == 0:  # some keys have an older row behind the newest
            await cache.write_cache(APP, SITE, t, docs[(i + 7) % len(docs)], "bench-amicro", 81)
    near = await AsyncTieredCache.connect(dsn, redis_url, namespace=NAMESPACE, redis_timeout=redis_timeout,
                                          near_max_entries=10_000, near_max_age=3600.0)
    if near.listener is not None:  # the near tier serves only once its listener is subscribed
        await asyncio.to_thread(near.listener.subscribed.wait, 5)
    cashews, aiocache = CashewsPeer(cache.store, redis_url), AiocachePeer(cache.store, redis_url)
    cashews_local = CashewsClientSidePeer(cache.store, redis_url)
    await cashews.cache.init()
    await cashews_local.started()
    setting = "connect() defaults" if redis_timeout == 0.05 else f"redis_timeout={redis_timeout:g} s"
    tiered = Tiered(cache, "AsyncTieredCache redis", setting)
    out: list[AsyncContender] = [
        RawFloor(cache, targets),
        PassthroughFloor(cache, targets),
        tiered,
        Tiered(near, "AsyncTieredCache near+redis",
               f"near_max_entries=10000, near_max_age=3600 s (as bench.micro); {setting}"),
        cashews,
        cashews_local,
        aiocache,
    ]
    for c in [tiered, *out]:  # the library fills Redis first (the floor reads its keys), then every other cache
        for t in targets:
            await c.get_latest(t)
            await c.get_history(t)
        await c.get_many(list(targets))
    return out


async def close_all(contenders: Sequence[AsyncContender], dsn: str) -> None:
    """Drop the bench's rows and keys, then close every contender (AsyncTieredCache redis last: it owns the store)."""
    import psycopg

    floor = contenders[0]
    assert isinstance(floor, RawFloor)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM biz.ai_cache WHERE site_id = %s", (SITE,))
        conn.execute("DELETE FROM biz.ai_cache_changes WHERE site_id = %s", (SITE,))
    keys = [k async for k in floor.client.scan_iter(match=f"{NAMESPACE}*", count=1000)]
    if keys:
        await floor.client.unlink(*keys)
    for c in sorted(contenders, key=lambda c: c.name == "AsyncTieredCache redis"):
        await c.close()
