# Generated from tiered_cache/_async/client.py by tools/async_to_sync.py: do not edit; edit the source and run it again.
"""The bounded Redis client every tier is built on: one timeout for every call, no retries, a bounded pool.

One server (redis://, rediss://, unix://), a Redis Cluster (redis+cluster://) or a Sentinel-watched primary
(redis+sentinel://): tiers/_redis_cluster.py parses the latter two.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from redis.retry import Retry
from redis.backoff import NoBackoff

try:  # redis-py >= 7: "auto" maintenance notifications skip the pool's dirty-connection check and cost a handshake
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - an older redis-py has neither
    MaintNotificationsConfig = None

from .._acompat import callback
from .._deployment import is_cluster
from .._lean import LeanPool
from ..tiers._redis_cluster import cluster_client, parse
from .runwatch import ClusterRunWatch, RunWatch
from ..policy.failures import REDIS_FAILURES

logger = logging.getLogger(__name__)


def redis_client(url: str, *, timeout: float = 0.05, max_connections: int = 64) -> Any:
    """A client whose every call is bounded by `timeout`: no retries, a bounded pool, so a sick Redis cannot pile up callers.

    Each watches for a restart or failover (runwatch.py): per connection's server, per cluster node.
    """
    topology = parse(url)
    if topology is not None and topology.kind == "cluster":
        return cluster_client(topology.nodes, topology.options, max_connections=max_connections,
                               connect_func=callback(ClusterRunWatch()), ssl=topology.ssl, timeout=timeout)
    bounded = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 0),
               "retry_on_timeout": False, "health_check_interval": 0}
    # a restarted (or failed-over) Redis is emptied of our keys before it serves us
    watch = callback(RunWatch())
    if topology is not None:  # Sentinel: the primary's address is asked of the sentinels on every new connection
        sentinel_kwargs = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 0),
                           **topology.options}  # redis-py's default: 10 retries with backoff, seconds per call
        sentinel_kwargs.pop("client_name", None)
        manager = redis.Sentinel(topology.nodes, sentinel_kwargs=sentinel_kwargs)
        if topology.ssl:
            bounded["connection_class"] = redis.sentinel.SentinelManagedSSLConnection
        return manager.master_for(topology.service, max_connections=max_connections, db=topology.db,
                                  redis_connect_func=watch, **bounded, **topology.options)
    if MaintNotificationsConfig is not None:  # a connection handed back with a reply unread is then reconnected
        bounded["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    pool = LeanPool.from_url(url, redis_connect_func=watch, max_connections=max_connections, timeout=timeout, **bounded)
    return redis.Redis(connection_pool=pool)


def ready_client(client: Any) -> Any:
    """Connect a cluster client to every primary now, so its watch knows each shard before any failover."""
    if is_cluster(client):
        try:
            client.ping(target_nodes=client.PRIMARIES)
        except REDIS_FAILURES as exc:  # a node down at start: its shard is learnt when it answers
            logger.warning("redis cluster: not every primary answered at start: %s: %s", type(exc).__name__, exc)
    return client


def close_client(client: Any) -> None:
    """Close a client this library made, and its pool; a socket slow to close (a busy machine) is only logged."""
    try:
        client.close()
        pool = getattr(client, "connection_pool", None)  # a cluster client has one per node
        if pool is not None:
            pool.disconnect()  # close() leaves a passed-in pool open
    except REDIS_FAILURES as exc:
        logger.info("closing the Redis client: %s: %s", type(exc).__name__, exc)
