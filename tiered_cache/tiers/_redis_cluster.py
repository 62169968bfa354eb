"""Redis Cluster and Sentinel: the URLs that name them, bounded clients on them, and keys grouped by slot.

    redis+cluster://[user:password@]host:port,host:port,...          (rediss+cluster:// for TLS)
    redis+sentinel://[user:password@]host:port,host:port,.../service[/db]

A cluster client follows MOVED/ASK (what a redirect needs) and nothing more: no retry on a timeout or a
refused connection, the same bounded socket timeouts as one server. Every key of one cache key shares a
hash tag (policy/keys.py), so every script touches one slot; multi-key reads go out per slot, one pipeline
per node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.asyncio.retry import Retry as ARetry
from redis.retry import Retry

from ..errors import ConfigurationError

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


@dataclass
class Topology:
    """What a cluster or Sentinel URL names: seed addresses, the Sentinel service, db, credentials, TLS."""

    kind: str
    nodes: list[tuple[str, int]]
    service: str = ""
    db: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    ssl: bool = False


def parse(url: str) -> Topology | None:
    """A cluster or Sentinel URL, parsed; None for a URL of one server (redis://, rediss://, unix://)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in CLUSTER_SCHEMES + SENTINEL_SCHEMES:
        return None
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    userinfo, hosts = (netloc[0], netloc[1]) if len(netloc) == 2 else ("", netloc[0])
    options: dict[str, Any] = {}
    if userinfo:
        user, _, password = userinfo.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    nodes = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(f"redis url: expected host:port[,host:port...], got {item!r} in {url!r}")
        nodes.append((host.strip("[]"), int(port)))
    for name, values in parse_qs(parts.query).items():
        if name not in ("client_name",):
            raise ConfigurationError(f"redis url: unknown option {name!r} in {url!r}")
        options[name] = values[0]
    path = [unquote(p) for p in parts.path.split("/") if p]
    ssl = scheme.startswith("rediss")
    if scheme in CLUSTER_SCHEMES:
        if path not in ([], ["0"]):
            raise ConfigurationError(f"redis url: a cluster has database 0 only, got path {parts.path!r}")
        return Topology("cluster", nodes, options=options, ssl=ssl)
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigurationError(f"redis url: expected redis+sentinel://host:port,.../service[/db], got {url!r}")
    return Topology("sentinel", nodes, service=path[0], db=int(path[1]) if len(path) == 2 else 0,
                    options=options, ssl=ssl)


def _bounded(timeout: float | None, options: dict[str, Any]) -> dict[str, Any]:
    out = dict(options)
    if timeout is not None:
        out["socket_timeout"] = out["socket_connect_timeout"] = timeout
    return out


#: Redirects (MOVED/ASK) and TRYAGAIN waits one call may follow; redis-py's 16 let one call sleep ~0.4 s.
REDIRECTS = 4


def cluster_client(nodes: Iterable[tuple[str, int]], options: dict[str, Any], *, max_connections: int,
                   connect_func: Callable[..., Any] | None, ssl: bool = False, timeout: float | None = None) -> Any:
    """A sync RedisCluster: redirects followed, no other retry; connect_func runs after redis-py's handshake."""
    kwargs = _bounded(timeout, options)
    if connect_func is not None:
        kwargs["redis_connect_func"] = getattr(connect_func, "check", connect_func)  # redis-py did on_connect
    client = redis.cluster.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes], retry=Retry(NoBackoff(), 0),
        max_connections=max_connections, ssl=ssl, health_check_interval=0, **kwargs)
    client.RedisClusterRequestTTL = REDIRECTS
    return client


class _GuardedSend:
    """redis.asyncio sends from a task of its own (wait_for): a connection another task closed meanwhile has no
    writer, and redis-py raises AttributeError (seen under failover). Here it is the lost connection it is."""

    async def _send_packed_command(self, command: Iterable[bytes]) -> None:
        writer = self._writer  # type: ignore[attr-defined]
        if writer is None:
            raise redis.exceptions.ConnectionError("the connection was closed while a command was being sent")
        writer.writelines(command)
        await writer.drain()


class _ClusterConnection(_GuardedSend, aioredis.Connection):
    pass


class _ClusterSSLConnection(_GuardedSend, aioredis.SSLConnection):
    pass


def acluster_client(nodes: Iterable[tuple[str, int]], options: dict[str, Any], *, max_connections: int,
                    connect_func: Callable[..., Any] | None, ssl: bool = False, timeout: float | None = None) -> Any:
    """An async RedisCluster like cluster_client; it connects on first use (or AsyncTieredCache.connect)."""
    kwargs = _bounded(timeout, options)
    connection_class = _ClusterSSLConnection if ssl else _ClusterConnection
    client = aioredis.RedisCluster(
        startup_nodes=[aioredis.cluster.ClusterNode(h, p, connection_class=connection_class, **kwargs)
                       for h, p in nodes],
        retry=ARetry(NoBackoff(), 0), max_connections=max_connections, ssl=ssl, health_check_interval=0, **kwargs)
    client.RedisClusterRequestTTL = REDIRECTS
    client.nodes_manager.connection_kwargs["connection_class"] = connection_class  # every node made later
    if connect_func is not None:
        # redis.asyncio's cluster takes no redis_connect_func: every node it makes uses these kwargs.
        client.nodes_manager.connection_kwargs["redis_connect_func"] = connect_func
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_kwargs["redis_connect_func"] = connect_func
    return client


def by_slot(keys: Iterable[str]) -> dict[int, list[int]]:
    """Positions of `keys` grouped by cluster slot, in order (a multi-key command must stay within one slot)."""
    groups: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key_slot(key.encode() if isinstance(key, str) else key), []).append(i)
    return groups
