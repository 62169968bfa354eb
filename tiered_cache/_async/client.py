"""The bounded Redis client every tier is built on: one timeout for every call, no retries, a blocking pool."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .._acompat import acallback
from .runwatch import AsyncRunWatch


def async_redis_client(url: str, *, timeout: float = 0.05, max_connections: int = 64) -> aioredis.Redis:
    """A client whose every call is bounded by `timeout`: no retries, a blocking pool, so a sick Redis cannot pile up callers."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        redis_connect_func=acallback(AsyncRunWatch()),  # a restarted Redis is emptied of our keys before it serves us
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return aioredis.Redis(connection_pool=pool)
