"""Dropping a namespace, and the restart watch that does it when Redis restarted or failed over."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

from .. import _fork, observe
from .._deployment import is_cluster
from .._acompat import ALock
from ..policy.keys import namespace_pattern
from ..tiers._redis_cluster import by_slot

logger = logging.getLogger(__name__)


async def drop_namespace(call: Callable[..., Any], namespace: str, *, cluster: bool = False) -> int:
    """UNLINK every key of a namespace, in two SCAN passes; `call(*command)` sends one command and returns its answer.

    Two passes: a lease the first pass missed was consumed during it, so its entry exists for the second.
    cluster: `call` reaches one cluster node; its keys are unlinked a slot at a time (no command may cross slots).
    """
    deleted = 0
    for _ in range(2):
        cursor: Any = b"0"
        while True:
            cursor, keys = await call("SCAN", cursor, "MATCH", namespace_pattern(namespace), "COUNT", 1000)
            if keys and cluster:
                for positions in by_slot(keys).values():
                    deleted += await call("UNLINK", *(keys[i] for i in positions))
            elif keys:
                deleted += await call("UNLINK", *keys)
            if cursor in (b"0", "0", 0):
                break
    return deleted


async def drop_everywhere(client: Any, namespace: str) -> int:
    """drop_namespace on the whole deployment: on a cluster, on every primary (SCAN sees one node's keys)."""
    if not is_cluster(client):
        return await drop_namespace(client.execute_command, namespace)
    deleted = 0
    for node in client.get_primaries():

        async def call(*command: Any, node: Any = node) -> Any:
            if command[0] == "SCAN":
                cursors, keys = await client.execute_command(*command, target_nodes=node)
                return next(iter(cursors.values())), keys
            return await client.execute_command(*command)  # one slot's keys: routed (and redirected) by key

        deleted += await drop_namespace(call, namespace, cluster=True)
    return deleted


class AsyncRunWatch:
    """Checks Redis's run id on every new connection, before it serves a command (redis-py's redis_connect_func).

    A new run id means Redis restarted or failed over, perhaps from a snapshot holding entries and leases
    that kills had removed since: the namespaces of every tier on this client are dropped first, and a
    flush announced, so nothing from the old run is served. A failed flush fails the connection; the next
    one tries again. Other new connections wait for it (one lock), old ones died with the old run.
    Pass it through acallback() (async_redis_client does): redis.asyncio awaits only what looks like a coroutine function.
    """

    _RUN_ID = re.compile(rb"run_id:([0-9a-fA-F]+)")

    def __init__(self) -> None:
        self.run_id: bytes | None = None
        self.namespaces: set[str] = set()
        self.channels: set[str] = set()
        self.restarts = 0
        self._lock = ALock()
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        """A connection thread of the parent may have held the lock at fork time: the child takes a new one."""
        self._lock = ALock()

    def watch(self, namespace: str, channel: str) -> None:
        """A tier on this client: its keys are dropped, and its listeners told, after a restart."""
        self.namespaces.add(namespace)
        if channel:
            self.channels.add(channel)

    async def __call__(self, conn: Any) -> None:
        await conn.on_connect()
        await self.check(conn)

    async def check(self, conn: Any) -> None:
        """The watch itself, on a connection that finished its handshake (a sync cluster client calls this)."""
        info = await _info(conn, "server")
        found = self._RUN_ID.search(info)
        if found is None:  # INFO renamed away or without a run id: a restart cannot be told apart
            return
        run_id = found.group(1)
        async with self._lock:
            if self.run_id is None or self.run_id == run_id:
                self.run_id = run_id
                return
            await self._flush(conn)
            self.run_id = run_id
            self.restarts += 1
        observe.redis_restarted(self.namespaces, "connection")

    async def _flush(self, conn: Any, *, cluster: bool = False) -> None:
        """Drop every watched namespace on this very connection, then announce."""

        async def call(*command: Any) -> Any:
            await conn.send_command(*command)
            return await conn.read_response()

        for namespace in self.namespaces:
            await drop_namespace(call, namespace, cluster=cluster)
        for channel in self.channels:
            await call("PUBLISH", channel, f"restart-{os.urandom(4).hex()}:1:*")


async def _info(conn: Any, section: str) -> bytes:
    await conn.send_command("INFO", section)
    info = await conn.read_response()
    return info.encode() if isinstance(info, str) else info


class AsyncClusterRunWatch(AsyncRunWatch):
    """The restart watch per node of a Redis Cluster: a node restarted, or a replica promoted, is emptied first.

    A promoted replica may lack its old primary's last kills (replication is asynchronous), so an entry
    killed there could come back. Promotion gives a node a new replication id and keeps the old one as
    its second (INFO replication: master_replid, master_replid2). So a node whose run id changed, a node
    seen before whose replication id changed and that is now a primary, and a primary first seen whose
    second replication id is one a primary of ours had: each has our namespaces dropped on that very
    connection (its shard's keys only) before it serves a command. The cluster client pings every primary
    once at start (AsyncTieredCache.connect), so every shard's replication id is known before a failover.
    """

    _FIELD = re.compile(rb"(run_id|role|master_replid|master_replid2):([0-9a-zA-Z]+)")

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[tuple[str, int], tuple[bytes, bytes]] = {}  # address -> (run id, replication id)
        self.replids: set[bytes] = set()  # replication ids our primaries had
        self.failovers = 0

    async def check(self, conn: Any) -> None:
        fields = dict(self._FIELD.findall(await _info(conn, "server") + b"\n" + await _info(conn, "replication")))
        run_id, replid = fields.get(b"run_id"), fields.get(b"master_replid")
        if run_id is None or replid is None:  # INFO renamed away: a failover cannot be told apart
            return
        primary = fields.get(b"role") == b"master"
        address = (str(conn.host), int(conn.port))
        async with self._lock:
            seen = self.nodes.get(address)
            restarted = primary and seen is not None and seen[0] != run_id
            promoted = primary and ((seen is not None and seen[1] != replid)
                                    or (seen is None and fields.get(b"master_replid2") in self.replids))
            if restarted or promoted:  # a replica is never read from (and would refuse the drop)
                await self._flush(conn, cluster=True)  # if it fails, the connection fails and the next one tries
            self.nodes[address] = (run_id, replid)
            if primary:
                self.replids.add(replid)
            if not (restarted or promoted):
                return
            self.restarts += restarted
            self.failovers += not restarted
        observe.redis_restarted(self.namespaces, f"node {address[0]}:{address[1]}")
