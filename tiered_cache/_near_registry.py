"""One near tier and one coherence listener per process and (Redis server, namespace), shared by every TieredCache.

Read-your-writes holds in the writing process, not just the writing object: two caches on the same
Redis and namespace read through the same NearTier, which every write evicts at once. A write also
evicts its key from every other near tier of the namespace in the process (a server spelled another
way, 'localhost' for '127.0.0.1', gets a tier of its own), so no spelling can break the promise.

Bounds of a shared tier: the first cache to create it sets max_entries and max_bytes; max_age is the
smallest any sharer asked for (a tighter bound flushes what was stored under a looser one), so every
cache's staleness bound holds. The last close() of a tier's sharers stops its listener.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from . import _fork
from ._deployment import identity
from .coherence import CoherenceListener
from .tiers.near import NearTier, check_bounds

logger = logging.getLogger(__name__)


def server_of(client: redis.Redis) -> tuple[Any, ...]:
    """The Redis a client talks to, as its settings name it: socket path or host and port and db, a cluster's
    seed nodes, or a Sentinel service."""
    return identity(client)


class Peers:
    """Every near tier of one namespace in this process, whatever the server: a write evicts its key from each."""

    __slots__ = ("tiers",)

    def __init__(self) -> None:
        self.tiers: tuple[NearTier, ...] = ()  # replaced whole, so writers iterate it without a lock


class _Slot:
    """A process's near tier and listener for one (server, namespace), and how many caches use them."""

    __slots__ = ("near", "listener", "sizes", "users")

    def __init__(self, near: NearTier, listener: CoherenceListener, sizes: tuple[int, int]) -> None:
        self.near = near
        self.listener = listener
        self.sizes = sizes  # (max_entries, max_bytes) of the cache that created it
        self.users = 0


class Membership:
    """One TieredCache's share: the near tier and listener it reads through (None without), the peers it evicts."""

    __slots__ = ("near", "listener", "peers", "_key", "_registry")

    def __init__(self, registry: NearRegistry, key: tuple[Any, ...] | None, slot: _Slot | None, peers: Peers) -> None:
        self.near = slot.near if slot is not None else None
        self.listener = slot.listener if slot is not None else None
        self.peers = peers
        self._key = key
        self._registry = registry

    def evict(self, entry: str) -> None:
        """A write here: drop its key from every near tier of the namespace in this process."""
        for near in self.peers.tiers:
            near.evict(entry)

    def flush(self) -> None:
        """Drop everything from every near tier of the namespace in this process."""
        for near in self.peers.tiers:
            near.flush()

    def leave(self) -> None:
        """This cache is done with the tier: the last one out stops the listener. Idempotent."""
        key, self._key = self._key, None
        if key is not None:
            self._registry._leave(key)


class NearRegistry:
    """The process's shared near tiers, by (server, namespace); reset in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[tuple[Any, ...], _Slot] = {}
        self._peers: dict[str, Peers] = {}

    def join(self, client: redis.Redis, namespace: str, channel: str,
             near: tuple[int, int, float] | None) -> Membership:
        """The share of a new cache; `near` is (max_entries, max_bytes, max_age), or None for a cache without one."""
        if near is not None:
            check_bounds(*near)
        with self._lock:
            peers = self._peers.setdefault(namespace, Peers())
            if near is None:
                return Membership(self, None, None, peers)
            max_entries, max_bytes, max_age = near
            key = (server_of(client), namespace)
            slot = self._slots.get(key)
            if slot is None:
                tier = NearTier(max_entries=max_entries, max_bytes=max_bytes, max_age=max_age)
                listener = CoherenceListener(client, channel, tier).start()
                slot = self._slots[key] = _Slot(tier, listener, (max_entries, max_bytes))
                peers.tiers = (*peers.tiers, tier)
            else:
                if (max_entries, max_bytes) != slot.sizes:
                    logger.info("near tier of %r is shared: the first cache's max_entries/max_bytes %s apply",
                                namespace, slot.sizes)
                slot.near.tighten(max_age)
            slot.users += 1
            return Membership(self, key, slot, peers)

    def _leave(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            slot = self._slots[key]
            slot.users -= 1
            if slot.users:
                return
            del self._slots[key]
            peers = self._peers[key[1]]
            peers.tiers = tuple(t for t in peers.tiers if t is not slot.near)
        slot.listener.stop()

    def _after_fork_in_child(self) -> None:
        """In a forked child: each near tier off, empty, with a new lock, before its listener starts again."""
        self._lock = threading.Lock()
        for slot in self._slots.values():
            slot.near._after_fork_in_child()
            slot.listener._after_fork_in_child()


REGISTRY = NearRegistry()
_fork.register(REGISTRY)
