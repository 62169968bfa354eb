"""Dropping a namespace, and the restart watch that does it when Redis restarted or failed over."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

from .. import _fork, observe
from .._acompat import ALock
from ..policy.keys import namespace_pattern

logger = logging.getLogger(__name__)


async def drop_namespace(call: Callable[..., Any], namespace: str) -> int:
    """UNLINK every key of a namespace, in two SCAN passes; `call(*command)` sends one command and returns its answer.

    Two passes: a lease the first pass missed was consumed during it, so its entry exists for the second.
    """
    deleted = 0
    for _ in range(2):
        cursor: Any = b"0"
        while True:
            cursor, keys = await call("SCAN", cursor, "MATCH", namespace_pattern(namespace), "COUNT", 1000)
            if keys:
                deleted += await call("UNLINK", *keys)
            if cursor in (b"0", "0", 0):
                break
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
        await conn.send_command("INFO", "server")
        info = await conn.read_response()
        found = self._RUN_ID.search(info.encode() if isinstance(info, str) else info)
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

    async def _flush(self, conn: Any) -> None:
        """Drop every watched namespace on this very connection, then announce."""

        async def call(*command: Any) -> Any:
            await conn.send_command(*command)
            return await conn.read_response()

        for namespace in self.namespaces:
            await drop_namespace(call, namespace)
        for channel in self.channels:
            await call("PUBLISH", channel, f"restart-{os.urandom(4).hex()}:1:*")
