"""The compared paths, each behind one small interface, and the list that names them.

To add a contender, write a class with get_latest/get_history/get_many (and the writes if it
takes part in the mixed profile) and add one `Entry` to `ENTRIES`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from ._workload import READS, Op

#: Flat TTL the peers get (they have no per-row expiry); TieredCache expires each entry at its row's expires_at.
PEER_TTL = 3600
#: Size of the TieredCache near tier, as the README example uses (cashews client-side defaults to the same).
NEAR_ENTRIES = 10_000


@dataclass
class Env:
    """What every contender is built from."""

    dsn: str
    redis_url: str
    docs: list[dict[str, Any]]
    prefix: str = "tcbench"  # every Redis key the bench writes starts with this
    #: Floor key -> the exact bytes TieredCache stores for it (prefilled into Redis and the cachetools floors).
    floor_bytes: dict[str, bytes] = field(default_factory=dict)
    #: Contenders take turns, so each runs 1/time_scale of the wall clock: wall-clock windows are stretched by it.
    time_scale: float = 1.0


@dataclass
class Counters:
    """Client-side counts: PostgreSQL statements sent, and cache keys that had to be loaded from PostgreSQL."""

    queries: int = 0
    loaded_keys: int = 0


class Contender:
    """One compared path. Subclasses implement the operations; run_slice is the timed loop."""

    name = "?"
    writes = True  # takes part in the mixed profile
    cached = False  # has a cache to prewarm

    def __init__(self, env: Env) -> None:
        self.env = env
        self.counters = Counters()
        self.note = ""

    # the operations (same arguments as the library's) ------------------------------------------
    def get_latest(self, cache_type: str, site_id: int, target_id: str) -> Any:
        raise NotImplementedError

    def get_history(self, cache_type: str, site_id: int, target_id: str, limit: int) -> Any:
        raise NotImplementedError

    def get_many(self, cache_type: str, site_id: int, target_ids: Sequence[str]) -> Any:
        raise NotImplementedError

    def write_cache(self, cache_type: str, site_id: int, target_id: str, doc: dict[str, Any]) -> int:
        raise NotImplementedError

    def set_generating(self, cache_type: str, site_id: int, target_id: str) -> int:
        raise NotImplementedError

    def finalize_cache(self, cache_id: int, doc: dict[str, Any], cache_type: str) -> Any:
        raise NotImplementedError

    def invalidate(self, cache_type: str, site_id: int, target_id: str) -> Any:
        raise NotImplementedError

    # the timed loop ----------------------------------------------------------------------------
    def run_slice(self, ops: Sequence[Op], cursor: int, deadline_ns: int, lat: list[int], ids: dict[int, int],
                  limit: int = 1 << 62) -> tuple[int, int, int, int]:
        """Run ops from `cursor` until the deadline or `limit` ops (at least one); returns (cursor, ops, keys, read keys)."""
        return _run_ops(self, ops, cursor, deadline_ns, lat, ids, limit)

    def prewarm(self, groups: dict[tuple[str, int], list[str]], history: list[tuple[str, int, str, int]]) -> None:
        """Load what a long-running service would hold: latest entries in bulk (get_many), histories one by one."""
        for (cache_type, site_id), targets in groups.items():
            for i in range(0, len(targets), 500):
                self.get_many(cache_type, site_id, targets[i : i + 500])
        for cache_type, site_id, target_id, limit in history:
            self.get_history(cache_type, site_id, target_id, limit)

    def take_turns(self, n: int) -> str:
        """n contenders take turns in the next workload: stretch wall-clock windows by n (a note, or "")."""
        return ""

    def tier_stats(self) -> dict[str, int]:
        """Cumulative per-tier hit/miss counters, where the contender exposes them."""
        return {}

    def close(self) -> None:
        pass


def _run_ops(c: Any, ops: Sequence[Op], cursor: int, deadline_ns: int, lat: list[int], ids: dict[int, int],
             limit: int) -> tuple[int, int, int, int]:
    pc = time.perf_counter_ns
    docs = c.env.docs
    n = len(ops)
    done = keys = reads = 0
    append = lat.append
    while True:
        i = cursor
        kind, ct, site, target, arg = ops[i]
        cursor = i + 1 if i + 1 < n else 0
        t0 = pc()
        if kind == "L":
            c.get_latest(ct, site, target)
        elif kind == "M":
            c.get_many(ct, site, target)
        elif kind == "H":
            c.get_history(ct, site, target, arg)
        elif kind == "W":
            c.write_cache(ct, site, target, docs[arg])
        elif kind == "G":
            ids[i] = c.set_generating(ct, site, target)
        elif kind == "F":
            cache_id = ids.pop(arg[0], None)
            if cache_id is None:  # its set_generating ran before this contender started here
                continue
            c.finalize_cache(cache_id, docs[arg[1]], ct)
        elif kind == "I":
            c.invalidate(ct, site, target)
        t1 = pc()
        append(t1 - t0)
        done += 1
        k = len(target) if kind == "M" else 1
        keys += k
        if kind in READS:
            reads += k
        if t1 >= deadline_ns or done >= limit:
            return cursor, done, keys, reads


def instrument(store: Any, counters: Counters) -> Any:
    """Count a PostgresStore's statements and the keys it loads, by wrapping its methods on the instance."""

    def count_queries(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            counters.queries += 1
            return fn(*args, **kwargs)

        return wrapped

    def count_one(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            counters.loaded_keys += 1
            return fn(*args, **kwargs)

        return wrapped

    def count_many(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(cache_type: str, site_id: int, target_ids: list[str]) -> Any:
            counters.loaded_keys += len(target_ids)
            return fn(cache_type, site_id, target_ids)

        return wrapped

    store._read = count_queries(store._read)
    store._write = count_queries(store._write)
    store.get_latest = count_one(store.get_latest)
    store.get_history = count_one(store.get_history)
    store.fetch_many = count_many(store.fetch_many)
    return store


# -- the old service --------------------------------------------------------------------------------

_OLD_LATEST = """
SELECT id, cache_type, site_id, target_id,
result_json, score, triggered_by,
created_at, expires_at, status
FROM biz.ai_cache
WHERE cache_type = %s AND site_id = %s AND target_id = %s
AND (status = 'valid' OR status IS NULL)
AND (expires_at IS NULL OR expires_at > now())
ORDER BY created_at DESC
LIMIT 1
"""
_OLD_HISTORY = """
SELECT id, cache_type, site_id, target_id,
result_json, score, triggered_by,
created_at, expires_at
FROM biz.ai_cache
WHERE cache_type = %s AND site_id = %s AND target_id = %s
ORDER BY created_at DESC
LIMIT %s
"""
_OLD_WRITE = """
INSERT INTO biz.ai_cache
(cache_type, site_id, target_id, result_json,
triggered_by, score, expires_at, status)
VALUES (%s, %s, %s, %s, %s, %s, %s, 'valid')
RETURNING id
"""
_OLD_CLEANUP = """
DELETE FROM biz.ai_cache
WHERE id IN (
SELECT id FROM biz.ai_cache
WHERE cache_type = %s AND site_id = %s AND target_id = %s
ORDER BY created_at DESC
OFFSET %s
)
"""
_OLD_GENERATING = """
INSERT INTO biz.ai_cache
(cache_type, site_id, target_id, result_json, status, triggered_by)
VALUES (%s, %s, %s, '{}', 'generating', %s)
RETURNING id
"""
_OLD_FINALIZE = """
UPDATE biz.ai_cache
SET result_json = %s, score = %s, status = 'valid', expires_at = %s
WHERE id = %s AND status = 'generating'
"""
# The old service had no invalidate; this is the one statement it would have needed.
_OLD_INVALIDATE = """
UPDATE biz.ai_cache SET status = 'invalidated'
WHERE cache_type = %s AND site_id = %s AND target_id = %s AND (status = 'valid' OR status IS NULL)
"""
_OLD_EXPIRY_DAYS = {"app2_finance": 0, "app3_clue": 7, "app4_analysis": 7, "app5_tactics": 7,
                    "app6_note_analysis": 30, "app7_customer_analysis": 7, "app8_clue_consolidated": 7}


class OldService(Contender):
    """AICacheService as delivered: a new psycopg connection per call, its SQL, its row conversion."""

    name = "old service (connection per call)"

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        import psycopg

        self._connect = lambda: psycopg.connect(env.dsn)
        self.note = "new connection per call; a board page = one get_latest per target"

    def _query(self, sql: str, params: tuple[Any, ...], many: bool) -> Any:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                self.counters.queries += 1
                cur.execute(sql, params)
                columns = [d[0] for d in cur.description]
                if many:
                    return [_old_row(columns, r) for r in cur.fetchall()]
                row = cur.fetchone()
                return None if row is None else _old_row(columns, row)
        finally:
            conn.close()

    def _execute(self, sql: str, params: tuple[Any, ...]) -> Any:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                self.counters.queries += 1
                cur.execute(sql, params)
                out = cur.fetchone()[0] if cur.description else cur.rowcount
            conn.commit()
            return out
        except Exception:
            conn.rollback()
            raise
        finally:
            conn.close()

    def get_latest(self, cache_type: str, site_id: int, target_id: str) -> Any:
        self.counters.loaded_keys += 1
        return self._query(_OLD_LATEST, (cache_type, site_id, target_id), False)

    def get_history(self, cache_type: str, site_id: int, target_id: str, limit: int) -> Any:
        self.counters.loaded_keys += 1
        return self._query(_OLD_HISTORY, (cache_type, site_id, target_id, limit), True)

    def get_many(self, cache_type: str, site_id: int, target_ids: Sequence[str]) -> Any:
        return {t: self.get_latest(cache_type, site_id, t) for t in target_ids}

    def write_cache(self, cache_type: str, site_id: int, target_id: str, doc: dict[str, Any]) -> int:
        cache_id = self._execute(_OLD_WRITE, (cache_type, site_id, target_id, json.dumps(doc, ensure_ascii=False),
                                              "bench-worker", 80, _old_expires_at(cache_type)))
        self._execute(_OLD_CLEANUP, (cache_type, site_id, target_id, 20_000))
        return cache_id

    def set_generating(self, cache_type: str, site_id: int, target_id: str) -> int:
        return self._execute(_OLD_GENERATING, (cache_type, site_id, target_id, "bench-worker"))

    def finalize_cache(self, cache_id: int, doc: dict[str, Any], cache_type: str) -> Any:
        self._execute(_OLD_FINALIZE, (json.dumps(doc, ensure_ascii=False), 80, _old_expires_at(cache_type), cache_id))

    def invalidate(self, cache_type: str, site_id: int, target_id: str) -> Any:
        return self._execute(_OLD_INVALIDATE, (cache_type, site_id, target_id))


def _old_row(columns: list[str], row: tuple[Any, ...]) -> dict[str, Any]:
    return {c: v.isoformat() if isinstance(v, datetime) else v for c, v in zip(columns, row)}


def _old_expires_at(cache_type: str | None) -> datetime | None:
    """The old _calc_expires_at, fixed +8 offset and all."""
    days = _OLD_EXPIRY_DAYS.get(cache_type) if cache_type else None
    if days is None:
        return None
    now = datetime.now(timezone.utc)
    if days == 0:
        local_now = now + timedelta(hours=8)
        return local_now.replace(hour=23, minute=59, second=59, microsecond=0) - timedelta(hours=8)
    return now + timedelta(days=days)


# -- the library ------------------------------------------------------------------------------------


class StoreContender(Contender):
    """tiered_cache.PostgresStore: the seed's operations over a connection pool, no cache."""

    name = "PostgresStore (pooled)"

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        from tiered_cache import PostgresStore

        self.store = instrument(PostgresStore(env.dsn), self.counters)
        self.store._pool.wait(timeout=10)

    def get_latest(self, cache_type: str, site_id: int, target_id: str) -> Any:
        return self.store.get_latest(cache_type, site_id, target_id)

    def get_history(self, cache_type: str, site_id: int, target_id: str, limit: int) -> Any:
        return self.store.get_history(cache_type, site_id, target_id, limit)

    def get_many(self, cache_type: str, site_id: int, target_ids: Sequence[str]) -> Any:
        return self.store.get_many(cache_type, site_id, target_ids)

    def write_cache(self, cache_type: str, site_id: int, target_id: str, doc: dict[str, Any]) -> int:
        return self.store.write_cache(cache_type, site_id, target_id, doc, "bench-worker", 80)

    def set_generating(self, cache_type: str, site_id: int, target_id: str) -> int:
        return self.store.set_generating(cache_type, site_id, target_id, "bench-worker")

    def finalize_cache(self, cache_id: int, doc: dict[str, Any], cache_type: str) -> Any:
        return self.store.finalize_cache(cache_id, doc, 80, cache_type)

    def invalidate(self, cache_type: str, site_id: int, target_id: str) -> Any:
        return self.store.invalidate(cache_type, site_id, target_id)

    def close(self) -> None:
        self.store.close()


def near_option() -> str | None:
    """The name of TieredCache's near-tier size option, or None while the facade has none."""
    from tiered_cache import TieredCache

    params = inspect.signature(TieredCache).parameters
    return next((p for p in ("near_max_entries", "near_maxsize", "near") if p in params), None)


class TieredContender(StoreContender):
    """tiered_cache.TieredCache over Redis (and the near tier when `near` is set)."""

    name = "TieredCache redis"
    near = False
    cached = True

    def __init__(self, env: Env) -> None:
        Contender.__init__(self, env)
        from tiered_cache import PostgresStore, TieredCache, redis_client

        store = instrument(PostgresStore(env.dsn), self.counters)
        store._pool.wait(timeout=10)
        options: dict[str, Any] = {"namespace": f"{env.prefix}-tc{'n' if self.near else 'r'}"}
        params = inspect.signature(TieredCache).parameters
        scaled = [p for p in ("negative_ttl", "near_max_age") if p in params and (p != "near_max_age" or self.near)]
        for p in scaled:  # wall-clock windows, stretched so they match the defaults per unit of own running time
            options[p] = params[p].default * env.time_scale
        if self.near:
            option = near_option()
            if option is None:
                store.close()
                raise RuntimeError("TieredCache has no near-tier option")
            options[option] = NEAR_ENTRIES
        if scaled and env.time_scale != 1:
            self.note = ", ".join(f"{p}={options[p]:g} s" for p in scaled) + f" (defaults x {env.time_scale:g})"
        self.store = self.cache = TieredCache(store, redis_client(env.redis_url), owns_clients=True, **options)
        if self.cache.listener is not None:  # the near tier serves only once its listener is subscribed
            self.cache.listener.subscribed.wait(5)

    def take_turns(self, n: int) -> str:
        """The near tier's max_age is a wall-clock window: mixed has fewer contenders taking turns than chat."""
        near = self.cache.near
        want = inspect.signature(type(self.cache)).parameters["near_max_age"].default * n
        if near is None or near.max_age == want:
            return ""
        near.max_age = want
        near.flush()  # entries stored under the old window go
        return f"near_max_age={want:g} s (default x {n} contenders taking turns)"

    def tier_stats(self) -> dict[str, int]:
        s = self.cache.stats()
        out = {"redis_hits": s["redis"]["hits"], "redis_misses": s["redis"]["misses"],
               "redis_errors": s["redis"]["errors"], "breaker_trips": s["redis"]["breaker_trips"]}
        if "near" in s:
            out.update(near_hits=s["near"]["hits"], near_misses=s["near"]["misses"],
                       near_puts_skipped=s["near"]["puts_skipped"],
                       **{f"near_{k}": s["near"][k] for k in ("reads_tried", "reads_skipped", "pages_tried",
                                                              "pages_skipped") if k in s["near"]})
        return out

    def close(self) -> None:
        self.cache.close()


class TieredNearContender(TieredContender):
    name = "TieredCache near+redis"
    near = True


# -- peers ------------------------------------------------------------------------------------------


class _CacheAside(Contender):
    """What the peers share: PostgresStore as the loader and for writes, then delete the cached keys."""

    cached = True

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        from tiered_cache import PostgresStore

        self.store = instrument(PostgresStore(env.dsn), self.counters)
        self.store._pool.wait(timeout=10)

    def _delete(self, keys: list[str]) -> None:
        raise NotImplementedError

    def _keys(self, cache_type: str, site_id: int, target_id: str, limit: int = 2) -> list[str]:
        return [f"l:{cache_type}:{site_id}:{target_id}", f"h:{cache_type}:{site_id}:{target_id}:{limit}"]

    def write_cache(self, cache_type: str, site_id: int, target_id: str, doc: dict[str, Any]) -> int:
        cache_id = self.store.write_cache(cache_type, site_id, target_id, doc, "bench-worker", 80)
        self._delete(self._keys(cache_type, site_id, target_id))
        return cache_id

    def set_generating(self, cache_type: str, site_id: int, target_id: str) -> int:
        cache_id = self.store.set_generating(cache_type, site_id, target_id, "bench-worker")
        self._delete(self._keys(cache_type, site_id, target_id)[1:])  # the history changed, the latest did not
        return cache_id

    def finalize_cache(self, cache_id: int, doc: dict[str, Any], cache_type: str) -> Any:
        found = self.store.key_of(cache_id)
        done = self.store.finalize_cache(cache_id, doc, 80, cache_type)
        if found is not None:
            self._delete(self._keys(*found[0]))
        return done

    def invalidate(self, cache_type: str, site_id: int, target_id: str) -> Any:
        n = self.store.invalidate(cache_type, site_id, target_id)
        self._delete(self._keys(cache_type, site_id, target_id))
        return n

    def close(self) -> None:
        self.store.close()


class DogpileContender(_CacheAside):
    """dogpile.cache region on its redis backend: get_or_create / get_or_create_multi with PostgresStore loading."""

    name = "dogpile.cache redis"

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        from dogpile.cache import make_region

        prefix = f"{env.prefix}-dp:"
        self.region = make_region(key_mangler=lambda k: prefix + k).configure(
            "dogpile.cache.redis",
            expiration_time=PEER_TTL,
            arguments={"url": env.redis_url, "redis_expiration_time": PEER_TTL + 60, "distributed_lock": False},
        )
        self.note = "default serializer (pickle); flat TTL"

    def get_latest(self, cache_type: str, site_id: int, target_id: str) -> Any:
        return self.region.get_or_create(
            f"l:{cache_type}:{site_id}:{target_id}", lambda: self.store.get_latest(cache_type, site_id, target_id)
        )

    def get_history(self, cache_type: str, site_id: int, target_id: str, limit: int) -> Any:
        return self.region.get_or_create(
            f"h:{cache_type}:{site_id}:{target_id}:{limit}",
            lambda: self.store.get_history(cache_type, site_id, target_id, limit),
        )

    def get_many(self, cache_type: str, site_id: int, target_ids: Sequence[str]) -> Any:
        keys = [f"l:{cache_type}:{site_id}:{t}" for t in target_ids]
        by_key = dict(zip(keys, target_ids))

        def create(*missing: str) -> list[Any]:
            rows = self.store.fetch_many(cache_type, site_id, [by_key[k] for k in missing])
            return [rows[by_key[k]] for k in missing]

        return dict(zip(target_ids, self.region.get_or_create_multi(keys, create)))

    def _delete(self, keys: list[str]) -> None:
        self.region.delete_multi(keys)


class _Loop:
    """One asyncio event loop in a dedicated thread; a whole slice of ops runs as one coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-asyncio", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float | None = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


_MISSING = object()


class CashewsContender(_CacheAside):
    """cashews on its Redis backend, driven from sync code: see _Loop."""

    name = "cashews redis"
    client_side = False

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        from cashews import Cache

        self.runner = _Loop()
        self.cache = Cache()
        self.prefix = f"{env.prefix}-{'cs' if self.client_side else 'cw'}:"

        async def setup() -> Any:
            if self.client_side:
                backend = self.cache.setup(env.redis_url, client_side=True, client_side_prefix=self.prefix,
                                           suppress=False)
            else:
                backend = self.cache.setup(env.redis_url, suppress=False)
            await self.cache.init()
            return backend

        self.backend = self.runner.run(setup())
        self.note = "default serializer (pickle, check_repr); flat TTL; asyncio loop in a thread, one coroutine per slice"
        if self.client_side:
            started = self.backend._listen_started.is_set()
            if not started:
                raise RuntimeError("client-side tracking did not start (CLIENT TRACKING BCAST not subscribed)")
            self.note = ("CLIENT TRACKING BCAST (Redis >= 6) keeps its local copy coherent; local hits return "
                         "the cached object itself, not a copy (a caller's mutation changes what the next read "
                         "returns); " + self.note)

    def _k(self, key: str) -> str:
        return key if self.client_side else self.prefix + key  # client-side mode prefixes by itself

    async def _get_latest(self, cache_type: str, site_id: int, target_id: str) -> Any:
        key = self._k(f"l:{cache_type}:{site_id}:{target_id}")
        value = await self.cache.get(key, default=_MISSING)
        if value is _MISSING:
            value = self.store.get_latest(cache_type, site_id, target_id)
            await self.cache.set(key, value, expire=PEER_TTL)
        return value

    async def _get_history(self, cache_type: str, site_id: int, target_id: str, limit: int) -> Any:
        key = self._k(f"h:{cache_type}:{site_id}:{target_id}:{limit}")
        value = await self.cache.get(key, default=_MISSING)
        if value is _MISSING:
            value = self.store.get_history(cache_type, site_id, target_id, limit)
            await self.cache.set(key, value, expire=PEER_TTL)
        return value

    async def _get_many(self, cache_type: str, site_id: int, target_ids: Sequence[str]) -> Any:
        keys = [self._k(f"l:{cache_type}:{site_id}:{t}") for t in target_ids]
        values = await self.cache.get_many(*keys, default=_MISSING)
        found = dict(zip(target_ids, values))
        missing = [t for t, v in found.items() if v is _MISSING]
        if missing:
            rows = self.store.fetch_many(cache_type, site_id, missing)
            found.update(rows)
            await self.cache.set_many({self._k(f"l:{cache_type}:{site_id}:{t}"): rows[t] for t in missing},
                                      expire=PEER_TTL)
        return found

    def get_latest(self, cache_type: str, site_id: int, target_id: str) -> Any:
        return self.runner.run(self._get_latest(cache_type, site_id, target_id))

    def get_history(self, cache_type: str, site_id: int, target_id: str, limit: int) -> Any:
        return self.runner.run(self._get_history(cache_type, site_id, target_id, limit))

    def get_many(self, cache_type: str, site_id: int, target_ids: Sequence[str]) -> Any:
        return self.runner.run(self._get_many(cache_type, site_id, target_ids))

    def _delete(self, keys: list[str]) -> None:
        self.runner.run(self.cache.delete_many(*(self._k(k) for k in keys)))

    def run_slice(self, ops: Sequence[Op], cursor: int, deadline_ns: int, lat: list[int], ids: dict[int, int],
                  limit: int = 1 << 62) -> tuple[int, int, int, int]:
        """The whole slice runs inside the loop thread; the sync writes call the pooled store directly there."""
        async def slice_() -> tuple[int, int, int, int]:
            return await _run_ops_async(self, ops, cursor, deadline_ns, lat, ids, limit)

        return self.runner.run(slice_())

    def close(self) -> None:
        try:
            self.runner.run(self.cache.close(), timeout=10)
        finally:
            self.runner.close()
            super().close()


class CashewsClientSideContender(CashewsContender):
    name = "cashews client-side"
    client_side = True


async def _run_ops_async(c: CashewsContender, ops: Sequence[Op], cursor: int, deadline_ns: int, lat: list[int],
                         ids: dict[int, int], limit: int) -> tuple[int, int, int, int]:
    pc = time.perf_counter_ns
    docs = c.env.docs
    n = len(ops)
    done = keys = reads = 0
    while True:
        i = cursor
        kind, ct, site, target, arg = ops[i]
        cursor = i + 1 if i + 1 < n else 0
        t0 = pc()
        if kind == "L":
            await c._get_latest(ct, site, target)
        elif kind == "M":
            await c._get_many(ct, site, target)
        elif kind == "H":
            await c._get_history(ct, site, target, arg)
        elif kind in "WGI":
            cache_id, keys_ = _sync_write(c, kind, ct, site, target, docs, arg)
            if kind == "G":
                ids[i] = cache_id
            await c.cache.delete_many(*(c._k(k) for k in keys_))
        elif kind == "F":
            cache_id = ids.pop(arg[0], None)
            if cache_id is None:
                continue
            found = c.store.key_of(cache_id)
            c.store.finalize_cache(cache_id, docs[arg[1]], 80, ct)
            if found is not None:
                await c.cache.delete_many(*(c._k(k) for k in c._keys(*found[0])))
        t1 = pc()
        lat.append(t1 - t0)
        done += 1
        k = len(target) if kind == "M" else 1
        keys += k
        if kind in READS:
            reads += k
        if t1 >= deadline_ns or done >= limit:
            return cursor, done, keys, reads


def _sync_write(c: _CacheAside, kind: str, ct: str, site: int, target: str, docs: list[Any], arg: Any) -> tuple[Any, list[str]]:
    """A write's PostgreSQL part and the cache keys it must delete afterwards."""
    keys = c._keys(ct, site, target)
    if kind == "W":
        return c.store.write_cache(ct, site, target, docs[arg], "bench-worker", 80), keys
    if kind == "G":
        return c.store.set_generating(ct, site, target, "bench-worker"), keys[1:]
    return c.store.invalidate(ct, site, target), keys


# -- floors: the least any implementation of each path can cost -------------------------------------


class _Floor(Contender):
    writes = False

    def _entry(self, cache_type: str, site_id: int, target_id: str) -> str:
        return f"{self.env.prefix}-floor:e:{cache_type}:{site_id}:{target_id}"

    def _history(self, cache_type: str, site_id: int, target_id: str, limit: int) -> str:
        return f"{self.env.prefix}-floor:h:{cache_type}:{site_id}:{target_id}:{limit}"


class FloorRedis(_Floor):
    """redis-py GET / MGET of the bytes TieredCache stores, plus orjson.loads: nothing else."""

    name = "floor: redis GET/MGET + orjson"

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        from tiered_cache import redis_client

        self.client = redis_client(env.redis_url)  # the same bounded client TieredCache is given
        self.note = "same client settings as TieredCache.connect"

    def get_latest(self, cache_type: str, site_id: int, target_id: str) -> Any:
        return orjson.loads(self.client.get(self._entry(cache_type, site_id, target_id)))

    def get_history(self, cache_type: str, site_id: int, target_id: str, limit: int) -> Any:
        return orjson.loads(self.client.get(self._history(cache_type, site_id, target_id, limit)))

    def get_many(self, cache_type: str, site_id: int, target_ids: Sequence[str]) -> Any:
        raws = self.client.mget([self._entry(cache_type, site_id, t) for t in target_ids])
        return [orjson.loads(r) for r in raws]

    def close(self) -> None:
        self.client.close()


class FloorCachetools(_Floor):
    """A bare cachetools LRUCache lookup of the same bytes (optionally decoded: the copy a safe near cache needs)."""

    name = "floor: cachetools get"
    copy = False

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        from cachetools import LRUCache

        entries = env.floor_bytes
        self.cache: LRUCache[str, bytes] = LRUCache(maxsize=max(1, len(entries)))
        self.cache.update(entries)

    def get_latest(self, cache_type: str, site_id: int, target_id: str) -> Any:
        raw = self.cache[self._entry(cache_type, site_id, target_id)]
        return orjson.loads(raw) if self.copy else raw

    def get_history(self, cache_type: str, site_id: int, target_id: str, limit: int) -> Any:
        raw = self.cache[self._history(cache_type, site_id, target_id, limit)]
        return orjson.loads(raw) if self.copy else raw

    def get_many(self, cache_type: str, site_id: int, target_ids: Sequence[str]) -> Any:
        get = self.cache.__getitem__
        if self.copy:
            return [orjson.loads(get(self._entry(cache_type, site_id, t))) for t in target_ids]
        return [get(self._entry(cache_type, site_id, t)) for t in target_ids]


class FloorCachetoolsCopy(FloorCachetools):
    name = "floor: cachetools get + orjson copy"
    copy = True


class FloorPostgres(_Floor):
    """One pooled, autocommit psycopg SELECT of the same rows (the library's statements, prepared), no row shaping."""

    name = "floor: pooled psycopg SELECT"

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        import psycopg_pool
        from psycopg.types.json import set_json_loads

        from tiered_cache.tiers import _sql

        self.sql = _sql
        self.pool = psycopg_pool.ConnectionPool(
            env.dsn, min_size=1, max_size=10, kwargs={"autocommit": True, "options": "-c TimeZone=Asia/Shanghai"},
            configure=lambda conn: set_json_loads(orjson.loads, conn), open=True,
        )
        self.pool.wait(timeout=10)

    def _select(self, sql: str, params: dict[str, Any]) -> Any:
        self.counters.queries += 1
        with self.pool.connection() as conn:
            return conn.execute(sql, params, prepare=True).fetchall()

    def get_latest(self, cache_type: str, site_id: int, target_id: str) -> Any:
        self.counters.loaded_keys += 1
        return self._select(self.sql.GET_LATEST, {"cache_type": cache_type, "site_id": site_id, "target_id": target_id})

    def get_history(self, cache_type: str, site_id: int, target_id: str, limit: int) -> Any:
        self.counters.loaded_keys += 1
        return self._select(self.sql.GET_HISTORY, {"cache_type": cache_type, "site_id": site_id,
                                                    "target_id": target_id, "limit": limit})

    def get_many(self, cache_type: str, site_id: int, target_ids: Sequence[str]) -> Any:
        self.counters.loaded_keys += len(target_ids)
        return self._select(self.sql.GET_MANY, {"cache_type": cache_type, "site_id": site_id,
                                                 "target_ids": list(target_ids)})

    def close(self) -> None:
        self.pool.close()


# -- the list ---------------------------------------------------------------------------------------

OLD = OldService.name


@dataclass(frozen=True)
class Entry:
    """One row of the comparison: how to build it, what it is compared with, where it takes part."""

    cls: type[Contender]
    role: str  # "old" | "library" | "peer" | "floor"
    floor: str | None = None  # name of the floor its cost is divided by
    sweep: bool = False  # in the concurrency sweep
    available: Callable[[], str | None] = field(default=lambda: None)  # None, or why it cannot run

    @property
    def name(self) -> str:
        return self.cls.name


def _needs(module: str) -> Callable[[], str | None]:
    def check() -> str | None:
        import importlib.util

        return None if importlib.util.find_spec(module) else f"{module} is not installed (pip install -e '.[bench]')"

    return check


def _near_available() -> str | None:
    return None if near_option() else "TieredCache has no near-tier option yet"


FLOOR_PG, FLOOR_REDIS = FloorPostgres.name, FloorRedis.name
FLOOR_NEAR, FLOOR_NEAR_BARE = FloorCachetoolsCopy.name, FloorCachetools.name

ENTRIES: list[Entry] = [
    Entry(OldService, "old", FLOOR_PG, sweep=True),
    Entry(StoreContender, "library", FLOOR_PG, sweep=True),
    Entry(TieredContender, "library", FLOOR_REDIS, sweep=True),
    Entry(TieredNearContender, "library", FLOOR_NEAR, sweep=True, available=_near_available),
    Entry(DogpileContender, "peer", FLOOR_REDIS, available=_needs("dogpile")),
    Entry(CashewsContender, "peer", FLOOR_REDIS, available=_needs("cashews")),
    Entry(CashewsClientSideContender, "peer", FLOOR_NEAR, available=_needs("cashews")),
    Entry(FloorRedis, "floor"),
    Entry(FloorCachetools, "floor"),
    Entry(FloorCachetoolsCopy, "floor"),
    Entry(FloorPostgres, "floor"),
]
