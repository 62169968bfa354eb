"""The hit path's Redis plumbing: commands packed from remembered key bytes, and a pool checkout without ceremony.

Profiling the FastAPI bench showed redis.asyncio spending more than its round trip on each GET or MGET: its
pure-Python packer encodes every argument of a 35-key MGET one by one, and BlockingConnectionPool takes an
asyncio.Condition, a timeout scope and two observability awaits per checkout. Here a key's RESP bulk string is
built once and remembered, a read is one bytes join, and the async pool hands out an idle connection directly
when nobody waits for one (the base class's path otherwise). Connections, timeouts, error replies and the
disconnect-on-failure rules stay redis-py's own: only its per-call bookkeeping is skipped.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis

MEMO_SIZE = 1 << 17  # key bulk strings remembered (~150 B each); cleared whole when full, as policy/key_memo.py

_GET = b"*2\r\n$3\r\nGET\r\n"
_HGET = b"*3\r\n$4\r\nHGET\r\n"
_MGET = b"$4\r\nMGET\r\n"


class Packer:
    """RESP for the hit path's three reads, from per-key bulk strings built once."""

    __slots__ = ("_bulks", "_size")

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self._bulks: dict[str, bytes] = {}
        self._size = size

    def bulk(self, key: str) -> bytes:
        """`$<len>\\r\\n<key>\\r\\n`, remembered."""
        found = self._bulks.get(key)
        if found is None:
            raw = key.encode()
            found = b"$%d\r\n%b\r\n" % (len(raw), raw)
            if len(self._bulks) >= self._size:
                self._bulks.clear()
            self._bulks[key] = found
        return found

    def get(self, key: str) -> bytes:
        return _GET + self.bulk(key)

    def hget(self, key: str, field: str) -> bytes:
        return _HGET + self.bulk(key) + self.bulk(field)

    def mget(self, keys: list[str]) -> bytes:
        bulks = self._bulks
        parts = [bulks.get(k) or self.bulk(k) for k in keys]
        return b"*%d\r\n%b%b" % (len(keys) + 1, _MGET, b"".join(parts))


class LeanPool(redis.BlockingConnectionPool):
    """redis-py's BlockingConnectionPool, marked as ours: its clients may take the packed read path."""


class ALeanPool(aioredis.BlockingConnectionPool):
    """redis.asyncio's BlockingConnectionPool with a direct checkout of an idle connection while nobody waits.

    The base class's path (its Condition, timeout scope and fairness) is taken whenever a connection must be made,
    another task is waiting, or redis-py's maintenance mode is on; ensure_connection still checks every checkout.
    """

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._available_connections and not self._condition._waiters and not self._in_maintenance:
            connection = self._available_connections.pop()
            self._in_use_connections.add(connection)
            try:
                await self.ensure_connection(connection)
            except BaseException:
                await self.release(connection)
                raise
            return connection
        return await super().get_connection()

    async def release(self, connection: Any) -> None:
        if self._condition._waiters or self._in_maintenance:
            await super().release(connection)
            return
        self._in_use_connections.remove(connection)
        if connection.should_reconnect():
            await connection.disconnect()
        self._available_connections.append(connection)


def _lean_capable() -> bool:
    """The private attributes ALeanPool reads exist in this redis-py (else it is the base class in all but name)."""
    probe = aioredis.BlockingConnectionPool(max_connections=1)
    return all(hasattr(probe, a) for a in ("_available_connections", "_in_use_connections", "_in_maintenance")) \
        and hasattr(probe._condition, "_waiters")


if not _lean_capable():  # pragma: no cover - a redis-py that moved them: keep its own checkout
    del ALeanPool.get_connection, ALeanPool.release
