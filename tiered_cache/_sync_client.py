"""A sync client on the same Redis as any client, sync or redis.asyncio: for the threads both APIs share."""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .policy.keys import KeySpace

_SYNC_CLASSES = {"UnixDomainSocketConnection": redis.UnixDomainSocketConnection, "SSLConnection": redis.SSLConnection}


def sync_connection(client: Any) -> tuple[type, dict[str, Any]]:
    """The sync connection class and kwargs that reach the Redis `client` reaches (async parts swapped or dropped)."""
    pool = client.connection_pool
    cls, kwargs = pool.connection_class, dict(pool.connection_kwargs)
    if cls.__module__.startswith("redis.asyncio"):
        cls = _SYNC_CLASSES.get(cls.__name__, redis.Connection)
        kwargs.pop("redis_connect_func", None)  # an async restart watch; the sync side brings its own
        kwargs["retry"] = Retry(NoBackoff(), 0)
    return cls, kwargs


def relay_tier(tier: Any) -> Any:
    """The sync Redis tier a relay thread kills through: the cache's own if it is sync, else one on a sync client."""
    from ._sync.redis_tier import RedisTier
    from ._sync.runwatch import RunWatch

    if isinstance(tier, RedisTier):
        return tier
    cls, kwargs = sync_connection(tier.client)
    kwargs["redis_connect_func"] = RunWatch()
    timeout = kwargs.get("socket_timeout") or 0.05
    pool = redis.BlockingConnectionPool(connection_class=cls, max_connections=4, timeout=timeout, **kwargs)
    return RedisTier(redis.Redis(connection_pool=pool), KeySpace(tier.keys.namespace))
