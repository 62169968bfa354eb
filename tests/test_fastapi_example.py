"""examples/fastapi_app.py against the real test servers, through its own lifespan and httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import httpx  # the `web` extra, which ./dev installs
import orjson
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"


def _load_example() -> ModuleType:
    """A fresh copy of the example module (its own FastAPI app), imported by path: examples/ is no package."""
    spec = importlib.util.spec_from_file_location("fastapi_app_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def example(dsn: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The example module, configured for the emptied test database and flushed test Redis."""
    monkeypatch.setenv("TIERED_CACHE_DSN", dsn)
    monkeypatch.setenv("TIERED_CACHE_REDIS_URL", redis_url)
    return _load_example()


def _serve(module: ModuleType, scenario: Callable[[Any, Any], Awaitable[None]]) -> None:
    """Run scenario(client, app) inside the app's lifespan, in a fresh event loop."""
    app = module.app

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
                await scenario(client, app)
        assert _is_closed(app.state.cache)  # the lifespan's exit closed it

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def _is_closed(cache: Any) -> bool:
    """close() swaps the cache's class for one whose every call raises Closed."""
    from tiered_cache import Closed

    try:
        cache.keyset("t", 1, "x")
    except Closed:
        return True
    return False


async def _passed_through(r: Any, expected: Any) -> None:
    """A reply of cached JSON bytes: served as application/json, exactly orjson.dumps of the dict reads' answer."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.content == orjson.dumps(expected)
    assert r.json() == orjson.loads(orjson.dumps(expected))


def test_write_board_chat_delete_health(example: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoints' round trip: written rows are served (the repeat from Redis), deleted ones are null."""
    monkeypatch.setenv("TIERED_CACHE_NEAR_MAX_ENTRIES", "0")  # no near tier: a repeat read must be a Redis hit

    async def scenario(client: Any, app: Any) -> None:
        r = await client.post("/results/7/t1", json={"clue": "red door"}, params={"score": 5})
        assert r.status_code == 201, r.text
        row_id = r.json()["id"]
        assert isinstance(row_id, int)
        r = await client.post("/results/7/t2", json={"clue": "blue door"})
        assert r.status_code == 201, r.text

        r = await client.get("/board/7", params={"type": "app3_clue", "targets": "t1,t2,nobody"})
        assert r.status_code == 200, r.text
        cache = app.state.cache
        await _passed_through(r, await cache.get_many("app3_clue", 7, ["t1", "t2", "nobody"]))
        board = r.json()
        assert list(board) == ["t1", "t2", "nobody"]
        assert board["t1"]["result_json"] == {"clue": "red door"} and board["t1"]["id"] == row_id
        assert board["t2"]["result_json"] == {"clue": "blue door"}
        assert board["nobody"] is None

        hits = app.state.cache.stats()["redis"]["hits"]
        r = await client.get("/board/7", params={"targets": "t1,t2"})
        assert r.status_code == 200 and r.json()["t1"]["id"] == row_id
        assert app.state.cache.stats()["redis"]["hits"] > hits, app.state.cache.stats()
        await _passed_through(r, await cache.get_many("app3_clue", 7, ["t1", "t2"]))

        r = await client.get("/chat/7/t1", params={"type": "app3_clue"})
        assert r.status_code == 200, r.text
        await _passed_through(r, {"latest": await cache.get_latest("app3_clue", 7, "t1"),
                                  "history": await cache.get_history("app3_clue", 7, "t1", limit=3)})
        chat = r.json()
        assert chat["latest"]["id"] == row_id and chat["latest"]["result_json"] == {"clue": "red door"}
        assert [h["id"] for h in chat["history"]] == [row_id]

        r = await client.delete("/results/7/t1")
        assert r.status_code == 200 and r.json() == {"invalidated": 1}, r.text
        r = await client.get("/chat/7/t1")
        assert r.status_code == 200 and r.json()["latest"] is None, r.text
        assert [h["id"] for h in r.json()["history"]] == [row_id]  # history keeps the retired row
        r = await client.get("/board/7", params={"targets": "t1,t2"})
        assert r.json()["t1"] is None and r.json()["t2"]["result_json"] == {"clue": "blue door"}

        r = await client.get("/healthz")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ok", r.json()

    _serve(example, scenario)


def test_bad_input_is_422(example: ModuleType) -> None:
    """Arguments the library rejects (before any I/O) come back as 422 with the library's message."""

    async def scenario(client: Any, app: Any) -> None:
        r = await client.get(f"/chat/{2**70}/t1")  # an int to HTTP, too big for the bigint column
        assert r.status_code == 422, r.text
        assert "site_id" in r.text and "64-bit" in r.text, r.text
        r = await client.get("/chat/not-a-number/t1")  # FastAPI's own path validation
        assert r.status_code == 422, r.text
        r = await client.get("/board/7", params={"type": "", "targets": "a"})
        assert r.status_code == 422 and "must not be empty" in r.json()["detail"], r.text
        r = await client.post("/results/7/t1", json={"x": 1}, params={"score": 2**40})
        assert r.status_code == 422 and "score" in r.json()["detail"], r.text
        r = await client.get("/chat/7/t1")
        assert r.json()["latest"] is None  # the rejected write wrote nothing

    _serve(example, scenario)


def test_concurrent_board_reads(example: ModuleType) -> None:
    """50 board reads at once on one event loop (near tier on, the default) all answer the written rows."""

    async def scenario(client: Any, app: Any) -> None:
        targets = [f"t{i}" for i in range(10)]
        ids = {}
        for t in targets:
            r = await client.post(f"/results/9/{t}", json={"target": t})
            assert r.status_code == 201, r.text
            ids[t] = r.json()["id"]
        query = {"targets": ",".join(targets + ["missing"])}
        replies = await asyncio.gather(*(client.get("/board/9", params=query) for _ in range(50)))
        assert [r.status_code for r in replies] == [200] * 50
        expected = orjson.dumps(await app.state.cache.get_many("app3_clue", 9, targets + ["missing"]))
        assert {r.content for r in replies} == {expected}
        for r in replies:
            board = r.json()
            assert board["missing"] is None
            assert {t: board[t]["id"] for t in targets} == ids
            assert all(board[t]["result_json"] == {"target": t} for t in targets)

    _serve(example, scenario)


def test_lifespan_without_servers_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TIERED_CACHE_DSN / TIERED_CACHE_REDIS_URL the app does not start half-configured."""
    from tiered_cache import ConfigurationError

    monkeypatch.delenv("TIERED_CACHE_DSN", raising=False)
    monkeypatch.delenv("TIERED_CACHE_REDIS_URL", raising=False)
    app = _load_example().app

    async def main() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(ConfigurationError):
        asyncio.run(main())
