"""A FastAPI service on AsyncTieredCache: the lifespan owns the cache, a dependency hands it to handlers.

Run it: `python examples/fastapi_app.py` (uvicorn on 127.0.0.1:8000). It uses TIERED_CACHE_DSN and
TIERED_CACHE_REDIS_URL when set, and otherwise starts throwaway PostgreSQL and Redis servers.
TIERED_CACHE_NEAR_MAX_ENTRIES (default 10000; 0 turns the near tier off) and TIERED_CACHE_RELAY
(default 1) tune the cache. TIERED_CACHE_BACKEND=store serves the same endpoints from the pooled
AsyncPostgresStore alone, no cache (the baseline of `tiered-cache bench --http`).

    curl -X POST localhost:8000/results/7/t1 -H 'content-type: application/json' -d '{"clue": "x"}'
    curl 'localhost:8000/board/7?targets=t1,t2'
    curl localhost:8000/chat/7/t1
    curl -X DELETE localhost:8000/results/7/t1
    curl localhost:8000/healthz
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from tiered_cache import AsyncPostgresStore, AsyncTieredCache, ConfigurationError, InvalidInput, migrate

DEFAULT_TYPE = "app3_clue"


def _options() -> dict[str, Any]:
    """The cache's options from the environment, so one image serves every deployment."""
    return {
        "near_max_entries": int(os.environ.get("TIERED_CACHE_NEAR_MAX_ENTRIES", "10000")),
        "relay": os.environ.get("TIERED_CACHE_RELAY", "1") not in ("0", "false", "no", ""),
    }


class StoreOnly:
    """The pooled store behind the cache's JSON read names: orjson.dumps of its dict answers, no cache."""

    def __init__(self, store: AsyncPostgresStore) -> None:
        self.store = store

    async def get_many_json(self, cache_type: str, site_id: int, target_ids: list[str]) -> dict[str, bytes | None]:
        page = await self.store.get_many(cache_type, site_id, target_ids)
        return {t: None if row is None else orjson.dumps(row) for t, row in page.items()}

    async def get_latest_json(self, cache_type: str, site_id: int, target_id: str) -> bytes | None:
        row = await self.store.get_latest(cache_type, site_id, target_id)
        return None if row is None else orjson.dumps(row)

    async def get_history_json(self, cache_type: str, site_id: int, target_id: str, limit: int = 2) -> bytes:
        return orjson.dumps(await self.store.get_history(cache_type, site_id, target_id, limit))

    async def write_cache(self, *args: Any, **kwargs: Any) -> int:
        return await self.store.write_cache(*args, **kwargs)

    async def invalidate(self, cache_type: str, site_id: int, target_id: str) -> int:
        return await self.store.invalidate(cache_type, site_id, target_id)

    async def health(self) -> StoreHealth:
        """Ready while PostgreSQL answers (ping raises StoreUnavailable otherwise)."""
        await self.store.ping()
        return StoreHealth()


class StoreHealth:
    """StoreOnly's answer to /healthz, in the shape of the cache's health report."""

    ok = True

    def as_dict(self) -> dict[str, Any]:
        return {"ok": True, "backend": "store"}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One cache per process: created before the first request, closed after the last."""
    dsn = os.environ.get("TIERED_CACHE_DSN")
    url = os.environ.get("TIERED_CACHE_REDIS_URL")
    backend = os.environ.get("TIERED_CACHE_BACKEND", "cache")
    if backend not in ("cache", "store"):
        raise ConfigurationError(f"TIERED_CACHE_BACKEND: expected cache or store, got {backend!r}")
    if not dsn or (not url and backend == "cache"):
        raise ConfigurationError("set TIERED_CACHE_DSN and TIERED_CACHE_REDIS_URL")
    await asyncio.to_thread(migrate, dsn)  # migrate is sync: off the event loop
    if backend == "store":
        async with await AsyncPostgresStore.connect(dsn) as store:
            app.state.cache = StoreOnly(store)
            yield
        return
    async with await AsyncTieredCache.connect(dsn, url, **_options()) as cache:
        app.state.cache = cache
        yield


app = FastAPI(title="tiered_cache example", lifespan=lifespan)


async def get_cache(request: Request) -> AsyncTieredCache:
    """The process's cache, for handlers (tests may override this dependency); async, so FastAPI calls it inline.

    A plain `def` dependency runs in Starlette's thread pool: a thread hop on every request (~10% of a worker's CPU).
    """
    return request.app.state.cache  # type: ignore[no-any-return]


Cache = Annotated[AsyncTieredCache, Depends(get_cache)]
CacheType = Annotated[str, Query(alias="type")]


@app.exception_handler(InvalidInput)
async def invalid_input(request: Request, exc: InvalidInput) -> JSONResponse:
    """The library rejected an argument before any I/O: the client's fault, said in its words."""
    return JSONResponse(status_code=422, content={"detail": str(exc), "field": exc.field})


def json_response(body: bytes) -> Response:
    """A response of JSON bytes as they are: FastAPI neither validates nor re-encodes them."""
    return Response(content=body, media_type="application/json")


def fragment(answer: bytes | None) -> orjson.Fragment | None:
    """A cached answer to embed in a larger document without decoding it."""
    return None if answer is None else orjson.Fragment(answer)


@app.get("/board/{site_id}")
async def board(site_id: int, cache: Cache, targets: str = "", type: CacheType = DEFAULT_TYPE) -> Response:
    """A page of targets in one round trip: {target: row or null}, the cached bytes passed through."""
    ids = [t for t in targets.split(",") if t]
    page = await cache.get_many_json(type, site_id, ids)
    return json_response(orjson.dumps({t: fragment(answer) for t, answer in page.items()}))


@app.get("/chat/{site_id}/{target_id}")
async def chat(site_id: int, target_id: str, cache: Cache, type: CacheType = DEFAULT_TYPE) -> Response:
    """What a chat turn needs: the latest result and the few before it (no row decoded on a hit)."""
    latest = await cache.get_latest_json(type, site_id, target_id)
    history = await cache.get_history_json(type, site_id, target_id, limit=3)
    return json_response(orjson.dumps({"latest": fragment(latest), "history": orjson.Fragment(history)}))


@app.post("/results/{site_id}/{target_id}", status_code=201)
async def write(
    site_id: int, target_id: str, cache: Cache, result: Annotated[dict[str, Any], Body()],
    type: CacheType = DEFAULT_TYPE, triggered_by: str | None = None, score: int | None = None,
) -> dict[str, int]:
    """Store a new result; every process reads it from the moment this returns."""
    row_id = await cache.write_cache(type, site_id, target_id, result, triggered_by=triggered_by, score=score)
    return {"id": row_id}


@app.delete("/results/{site_id}/{target_id}")
async def invalidate(site_id: int, target_id: str, cache: Cache, type: CacheType = DEFAULT_TYPE) -> dict[str, int]:
    """Retire a key's valid results; reads answer null from now on."""
    return {"invalidated": await cache.invalidate(type, site_id, target_id)}


@app.get("/healthz")
async def healthz(cache: Cache) -> JSONResponse:
    """Readiness probe: 200 while PostgreSQL answers (degraded still serves right answers), else 503."""
    report = await cache.health()
    return JSONResponse(status_code=200 if report.ok else 503, content=report.as_dict())


def main() -> None:
    """Serve on 127.0.0.1:8000, on throwaway servers unless the environment names real ones."""
    import uvicorn

    from tiered_cache.testing import embedded_servers

    with embedded_servers() as (dsn, url):
        os.environ["TIERED_CACHE_DSN"], os.environ["TIERED_CACHE_REDIS_URL"] = dsn, url
        uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))


if __name__ == "__main__":
    main()
