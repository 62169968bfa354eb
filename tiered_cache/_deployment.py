"""What a Redis client reaches (one server, a Cluster, or a Sentinel-watched primary), so side threads reach it too.

The relay, the near tier's listener, the wake bus and verify() run on sync clients of their own; each asks
this module for one on the same deployment as the cache's client, sync or redis.asyncio, whatever its kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as _aioredis
import redis.asyncio.cluster as _acluster
import redis.asyncio.sentinel as _asentinel
import redis.cluster as _cluster
import redis.sentinel as _sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

SINGLE, CLUSTER, SENTINEL = "single", "cluster", "sentinel"

_SYNC_CLASSES = {"UnixDomainSocketConnection": redis.UnixDomainSocketConnection, "SSLConnection": redis.SSLConnection}
#: Connection options a side client takes over from the cache's client (never its pool, watch or callbacks).
_PORTABLE = ("username", "password", "socket_timeout", "socket_connect_timeout", "socket_keepalive",
             "socket_keepalive_options", "client_name", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
             "ssl_cert_reqs", "ssl_check_hostname")


def is_cluster(client: Any) -> bool:
    """A Redis Cluster client, sync or async."""
    return isinstance(client, (_cluster.RedisCluster, _acluster.RedisCluster))


def _sentinel_pool(client: Any) -> Any:
    pool = getattr(client, "connection_pool", None)
    return pool if isinstance(pool, (_sentinel.SentinelConnectionPool, _asentinel.SentinelConnectionPool)) else None


def kind_of(client: Any) -> str:
    """single, cluster or sentinel."""
    if is_cluster(client):
        return CLUSTER
    return SENTINEL if _sentinel_pool(client) is not None else SINGLE


def connection_kwargs(client: Any) -> dict[str, Any]:
    """The options every connection of the client is made with (its restart watch among them)."""
    if isinstance(client, _cluster.RedisCluster):
        return client.nodes_manager.connection_kwargs
    if isinstance(client, _acluster.RedisCluster):
        return client.nodes_manager.connection_kwargs
    return client.connection_pool.connection_kwargs


def watch_of(client: Any) -> Any:
    """The client's restart watch (runwatch.py), or None."""
    if isinstance(client, _cluster.RedisCluster):  # it calls ours after its own handshake
        found = client.user_on_connect_func
    else:
        found = connection_kwargs(client).get("redis_connect_func")
    return getattr(found, "__self__", found)  # a sync cluster client holds the watch's bound check()


def _nodes(client: Any) -> list[tuple[str, int]]:
    found = sorted({(n.host, int(n.port)) for n in client.get_nodes()})
    return found or sorted((n.host, int(n.port)) for n in client.nodes_manager.startup_nodes.values())


def _sentinels(pool: Any) -> list[tuple[str, int]]:
    out = []
    for s in pool.sentinel_manager.sentinels:
        kw = s.connection_pool.connection_kwargs
        out.append((str(kw.get("host", "localhost")), int(kw.get("port", 26379))))
    return out


def identity(client: Any) -> tuple[Any, ...]:
    """The deployment a client talks to, as its settings name it: one per server, cluster or Sentinel service."""
    kind = kind_of(client)
    if kind == CLUSTER:
        return (CLUSTER, tuple(_nodes(client)))
    if kind == SENTINEL:
        pool = _sentinel_pool(client)
        return (SENTINEL, pool.service_name, tuple(sorted(_sentinels(pool))),
                pool.connection_kwargs.get("db", 0))
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return ("unix", kwargs["path"], kwargs.get("db", 0))
    return (str(kwargs.get("host", "localhost")).lower(), int(kwargs.get("port", 6379)), kwargs.get("db", 0))


def single_connection(client: Any) -> tuple[type, dict[str, Any]]:
    """The sync connection class and kwargs that reach the one Redis `client` reaches (async parts swapped or dropped)."""
    pool = client.connection_pool
    cls, kwargs = pool.connection_class, dict(pool.connection_kwargs)
    if cls.__module__.startswith("redis.asyncio"):
        cls = _SYNC_CLASSES.get(cls.__name__, redis.Connection)
        kwargs.pop("redis_connect_func", None)  # an async restart watch; the sync side brings its own
        kwargs["retry"] = Retry(NoBackoff(), 0)
    return cls, kwargs


def _is_tls(cls: Any) -> bool:
    """A TLS connection class, of either API (redis-py's or a subclass of ours)."""
    return isinstance(cls, type) and issubclass(cls, (redis.SSLConnection, _aioredis.SSLConnection))


def sync_client(client: Any, *, max_connections: int, connect_func: Callable[..., Any] | None = None,
                blocking: bool = True, timeout: float | None = None) -> Any:
    """A new sync client on the deployment `client` reaches: same server(s), credentials and timeouts, its own pool.

    connect_func: a restart watch for the new client (None: none). blocking: wait up to the socket timeout
    for a pooled connection (one server only; a cluster's and Sentinel's pools refuse at once when full).
    """
    kind = kind_of(client)
    kwargs = connection_kwargs(client)
    portable = {k: kwargs[k] for k in _PORTABLE if kwargs.get(k) is not None}
    if timeout is not None:
        portable["socket_timeout"] = portable["socket_connect_timeout"] = timeout
    if kind == CLUSTER:
        from .tiers._redis_cluster import cluster_client

        return cluster_client(_nodes(client), portable, max_connections=max_connections, connect_func=connect_func,
                              ssl=_is_tls(kwargs.get("connection_class")))
    if kind == SENTINEL:
        pool = _sentinel_pool(client)
        given = dict(pool.sentinel_manager.sentinel_kwargs)  # the sentinels' own credentials and timeouts
        sentinel_kwargs = {k: given[k] for k in ("username", "password") if given.get(k) is not None}
        sentinel_kwargs.update({k: v for k, v in portable.items() if k.startswith("socket_")}, retry=Retry(NoBackoff(), 0))
        manager = _sentinel.Sentinel(_sentinels(pool), sentinel_kwargs=sentinel_kwargs)
        extra: dict[str, Any] = {"redis_connect_func": connect_func} if connect_func is not None else {}
        if _is_tls(pool.connection_class):
            extra["connection_class"] = _sentinel.SentinelManagedSSLConnection
        return manager.master_for(pool.service_name, max_connections=max_connections, retry=Retry(NoBackoff(), 0),
                                  db=pool.connection_kwargs.get("db", 0), **portable, **extra)
    cls, kw = single_connection(client)
    kw.pop("redis_connect_func", None)
    if connect_func is not None:
        kw["redis_connect_func"] = connect_func
    if timeout is not None:
        kw["socket_timeout"] = kw["socket_connect_timeout"] = timeout
    if blocking:
        pool = redis.BlockingConnectionPool(connection_class=cls, max_connections=max_connections,
                                            timeout=kw.get("socket_timeout") or 0.05, **kw)
    else:
        pool = redis.ConnectionPool(connection_class=cls, max_connections=max_connections, **kw)
    return redis.Redis(connection_pool=pool)


def close_sync(client: Any) -> None:
    """Close a sync client made by sync_client, whatever its kind."""
    try:
        client.close()
    finally:
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            pool.disconnect()
