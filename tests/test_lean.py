"""The hit path's packed reads and the async pool's direct checkout (tiered_cache/_lean.py) on a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from tiered_cache._async.client import async_redis_client
from tiered_cache._async.lua import packed_read
from tiered_cache._async.redis_tier import AsyncRedisTier
from tiered_cache._lean import ALeanPool, LeanPool, Packer
from tiered_cache._sync.client import redis_client
from tiered_cache._sync.redis_tier import RedisTier
from tiered_cache.contracts import MISS
from tiered_cache.policy.keys import KeySpace

KEY = st.text(min_size=1, max_size=40)


def _redis_py_bytes(*args: str) -> bytes:
    """What redis-py itself would send for these arguments."""
    return b"".join(redis.Connection().pack_command(*args))


@settings(max_examples=200, deadline=None)
@given(st.lists(KEY, min_size=1, max_size=60), KEY)
def test_packed_commands_are_byte_for_byte_redis_pys(keys: list[str], field: str) -> None:
    packer = Packer(size=8)  # small: the memo is cleared and refilled along the way
    assert packer.mget(keys) == _redis_py_bytes("MGET", *keys)
    assert packer.get(keys[0]) == _redis_py_bytes("GET", keys[0])
    assert packer.hget(keys[0], field) == _redis_py_bytes("HGET", keys[0], field)
    assert len(packer._bulks) <= 8


def test_only_our_single_server_clients_take_the_packed_path(redis_url: str) -> None:
    assert isinstance(redis_client(redis_url).connection_pool, LeanPool)
    assert RedisTier(redis_client(redis_url), KeySpace("lean"))._packer is not None
    assert RedisTier(redis.Redis.from_url(redis_url), KeySpace("lean"))._packer is None  # a user's own client


def test_packed_reads_answer_as_execute_command_does(redis_url: str) -> None:
    """Hits, misses, an error reply (raised as redis-py raises it) and a connection that stays usable after it."""
    async def run() -> None:
        client = async_redis_client(redis_url, timeout=1.0)
        pool = client.connection_pool
        assert isinstance(pool, ALeanPool)
        packer = Packer()
        keys = ["lean:é", "lean:b", "lean:missing"]
        await client.mset({"lean:é": b"one", "lean:b": b"\x00two"})
        await client.hset("lean:h", "3", b"hist")
        assert await packed_read(pool, packer.mget(keys)) == await client.execute_command("MGET", *keys)
        assert await packed_read(pool, packer.get("lean:é")) == b"one"
        assert await packed_read(pool, packer.hget("lean:h", "3")) == b"hist"
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            await packed_read(pool, packer.get("lean:h"))
        assert await packed_read(pool, packer.get("lean:b")) == b"\x00two"
        await client.aclose()

    asyncio.run(run())


def test_direct_checkout_keeps_the_pools_bound_and_its_waiters(redis_url: str) -> None:
    """More readers than connections: the extra ones wait (the base class's path) and every one is answered;
    the pool never holds more than max_connections and gives every connection back."""
    async def run() -> None:
        client = async_redis_client(redis_url, timeout=2.0, max_connections=3)
        pool: Any = client.connection_pool
        packer = Packer()
        await client.set("lean:k", b"v")
        results = await asyncio.gather(*(packed_read(pool, packer.get("lean:k")) for _ in range(50)))
        assert results == [b"v"] * 50
        assert len(pool._in_use_connections) == 0
        assert len(pool._available_connections) <= 3
        await client.aclose()

    asyncio.run(run())


def test_a_connection_with_unread_data_is_not_handed_out_again(redis_url: str) -> None:
    """A reply left on a returned connection (a read cancelled mid-flight elsewhere) must not answer the next read:
    the direct checkout still runs redis-py's ensure_connection, which reconnects it."""
    async def run() -> None:
        client = async_redis_client(redis_url, timeout=1.0, max_connections=1)
        pool: Any = client.connection_pool
        packer = Packer()
        await client.set("lean:x", b"x")
        await client.set("lean:y", b"y")
        conn = await pool.get_connection()
        await conn.send_packed_command([packer.get("lean:x")], False)  # its reply is never read
        await asyncio.sleep(0.05)
        await pool.release(conn)
        assert await packed_read(pool, packer.get("lean:y")) == b"y"
        await client.aclose()

    asyncio.run(run())


def test_the_tier_reads_through_the_packed_path(redis_url: str) -> None:
    """The async tier's GET, HGET and MGET go out packed and answer what was stored."""
    async def run() -> None:
        tier = AsyncRedisTier(async_redis_client(redis_url, timeout=1.0), KeySpace("leantier"))
        assert tier._packer is not None
        a = tier.keys.keyset("t", 1, "a")
        b = tier.keys.keyset("t", 1, "b")
        await tier.client.set(a.entry, b"A")
        await tier.client.hset(a.history, "2", b"H")
        assert await tier.get_raw(a.entry) == b"A"
        assert await tier.get_raw(b.entry) is MISS
        assert await tier.get_raws([a.entry, b.entry]) == [b"A", MISS]
        assert await tier.get_history(a, 2) == b"H"
        await tier.client.aclose()

    asyncio.run(run())


def test_a_redis_py_without_the_private_attributes_keeps_its_own_checkout() -> None:
    """The fast path is only installed over the redis-py internals it reads."""
    probe = aioredis.BlockingConnectionPool(max_connections=1)
    if all(hasattr(probe, a) for a in ("_available_connections", "_in_use_connections", "_in_maintenance")):
        assert "get_connection" in ALeanPool.__dict__
    else:  # pragma: no cover - another redis-py
        assert "get_connection" not in ALeanPool.__dict__
