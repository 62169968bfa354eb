# Generated from tiered_cache/_async/client.py by tools/async_to_sync.py: do not edit; edit the source and run it again.
"""The bounded Redis client every tier is built on: one timeout for every call, no retries, a blocking pool."""

from __future__ import annotations

import redis
from redis.retry import Retry
from redis.backoff import NoBackoff

from .._acompat import callback
from .runwatch import RunWatch


def redis_client(url: str, *, timeout: float = 0.05, max_connections: int = 64) -> redis.Redis:
    """A client whose every call is bounded by `timeout`: no retries, a blocking pool, so a sick Redis cannot pile up callers."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        redis_connect_func=callback(RunWatch()),  # a restarted Redis is emptied of our keys before it serves us
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return redis.Redis(connection_pool=pool)
