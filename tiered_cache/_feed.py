"""The change channel, subscribed wherever announcements travel: one channel, or on a Cluster one per slot too.

On a Redis Cluster a script announces a key's change in the key's own shard (SPUBLISH, Redis 7), on the
channel of the key's slot, so a message crosses no cluster bus and each primary carries only its shard's
share. A feed therefore subscribes, on each primary of Redis 7 or later, to the channels of every slot it
serves, and keeps one classic subscription too: it carries flushes, restarts, and every announcement made
on a node older than Redis 7 (the scripts choose per node, so a 6.2 cluster or a mixed one stays covered).
A slot moving away (a reshard, a failover) unsubscribes it on the old owner; the feed reports that as a
lost link, so its listener empties the near tier and subscribes afresh on the new owners.
"""

from __future__ import annotations

import select
import threading
import time
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError, ResponseError

from ._deployment import close_sync, is_cluster, sync_client
from .policy.slot_channels import slot_channel


class FeedLost(RedisConnectionError):
    """A subscription ended without our asking (its slot moved to another node): announcements may be missed."""


class _Link:
    """One subscribed connection: its pubsub, its socket, what it subscribed to and when it was last heard."""

    __slots__ = ("pubsub", "fd", "name", "sharded", "expected", "heard")

    def __init__(self, pubsub: Any, name: str, sharded: bool, expected: int) -> None:
        self.pubsub, self.name, self.sharded, self.expected = pubsub, name, sharded, expected
        self.fd: int | None = None
        self.heard = 0.0


class ChangeFeed:
    """The subscriptions of one listener (coherence, wake-ups), on a side client of its own; one thread drives it."""

    def __init__(self, source: Any, channel: str, *, timeout: float, max_connections: int = 2) -> None:
        self._source, self.channel, self._timeout, self._max = source, channel, timeout, max_connections
        self.cluster = is_cluster(source)
        self._client: Any = None  # made on first open(), in the driving thread: a cluster's connects there
        self._links: list[_Link] = []
        self.fds: tuple[int, ...] = ()  # every link's socket; empty when the client has none (fakeredis)
        self._poller: Any = None
        self.servers: tuple[str, ...] = ()  # run ids of the servers subscribed to, as of open()
        self.sharded_links = 0

    def _side_client(self) -> Any:
        if self._client is None:
            self._client = sync_client(self._source, max_connections=self._max, blocking=False, timeout=self._timeout)
        return self._client

    def open(self, stop: threading.Event, within: float) -> None:
        """Subscribe everywhere and wait for every confirmation (at most `within` seconds; raises if late)."""
        self.close()
        client = self._side_client()
        links, servers = [], []
        try:
            if not self.cluster:
                try:
                    servers.append(str(client.info("server").get("run_id", "")))
                except ResponseError:  # INFO renamed away, or fakeredis (which has none): no restart check
                    pass
            classic = client.pubsub(ignore_subscribe_messages=False)
            links.append(_Link(classic, "classic", False, 1))
            classic.subscribe(self.channel)
            if self.cluster:
                client.nodes_manager.initialize()  # the slot map as of now, not as of the last redirect
                for node, slots in _slots_by_primary(client):
                    server = client.get_redis_connection(node)
                    info = server.info("server")
                    servers.append(str(info.get("run_id", "")))
                    if int(str(info.get("redis_version", "0")).split(".")[0]) < 7:
                        continue  # its scripts announce on the classic channel
                    pubsub = server.pubsub(ignore_subscribe_messages=False)
                    links.append(_Link(pubsub, node.name, True, len(slots)))
                    channels = [slot_channel(self.channel, slot) for slot in slots]
                    pubsub.ssubscribe(channels[0])  # connects, and marks the pubsub subscribed
                    conn = pubsub.connection  # the rest in one write: one SSUBSCRIBE per slot (CROSSSLOT otherwise)
                    conn.send_packed_command(conn.pack_commands([("SSUBSCRIBE", ch) for ch in channels[1:]]))
            self._links = links
            self._confirm(stop, time.monotonic() + within)
        except BaseException:
            self._links = links
            self.close()
            raise
        self.servers = tuple(servers)
        self.sharded_links = len(links) - 1
        fds = [_fd_of(link.pubsub) for link in links]
        if all(fd is not None for fd in fds):
            self.fds = tuple(fd for fd in fds if fd is not None)
            self._poller = select.poll()
            for link, fd in zip(links, self.fds):
                link.fd = fd
                self._poller.register(fd, select.POLLIN)

    def _confirm(self, stop: threading.Event, deadline: float) -> None:
        """Read each link's subscribe confirmations; an error answer (a slot that moved meanwhile) raises."""
        for link in self._links:
            kind = "ssubscribe" if link.sharded else "subscribe"
            while link.expected and not stop.is_set():
                msg = link.pubsub.get_message(timeout=0.05)
                if msg and msg["type"] == kind:
                    link.expected -= 1
                if time.monotonic() > deadline:
                    raise RedisConnectionError(f"no subscribe confirmation on the change channel from {link.name}")
        now = time.monotonic()
        for link in self._links:
            link.heard = now

    def close(self) -> None:
        """Drop every subscription (a link that fails to close is dropped either way)."""
        links, self._links, self.fds, self._poller = self._links, [], (), None
        for link in links:
            try:
                link.pubsub.close()
            except Exception:
                pass

    def shutdown(self) -> None:
        """Close the subscriptions and the side client."""
        self.close()
        if self._client is not None:
            close_sync(self._client)
            self._client = None

    def forget(self) -> None:
        """In a forked child: the links are the parent's; drop them unread and unclosed, and the client too."""
        self._links, self.fds, self._poller, self._client = [], (), None, None

    def drain(self, now: float) -> list[bytes | str]:
        """Every announcement already received on any link; a subscription the server ended raises FeedLost."""
        out: list[bytes | str] = []
        for link in self._links:
            while True:
                msg = link.pubsub.get_message(timeout=0)
                if not msg:
                    break
                link.heard = now
                kind = msg["type"]
                if kind == "message" or kind == "smessage":
                    out.append(msg["data"])
                elif kind == "sunsubscribe" or kind == "unsubscribe":
                    raise FeedLost(f"{link.name} ended the subscription to {msg['channel']!r} (its slot moved)")
        return out

    def read_waiting(self, timeout: float) -> list[bytes | str]:
        """Without OS sockets to wait on (fakeredis): wait in the client for one message, then drain."""
        link = self._links[0]
        msg = link.pubsub.get_message(timeout=timeout)
        out: list[bytes | str] = []
        if msg:
            link.heard = time.monotonic()
            if msg["type"] == "message":
                out.append(msg["data"])
        return out + self.drain(time.monotonic())

    def wait(self, timeout: float) -> None:
        """Block (without the GIL) until a link has data or timeout seconds pass."""
        if self._poller is not None:
            self._poller.poll(timeout * 1000)

    def ping(self) -> None:
        """Ask every link for a PONG, so a silently dead one shows as unheard."""
        for link in self._links:
            link.pubsub.ping()

    def unheard(self, now: float, limit: float) -> str | None:
        """The first link silent for longer than limit seconds, described; None if every link was heard."""
        for link in self._links:
            if now - link.heard > limit:
                return f"no answer from {link.name} for {now - link.heard:.1f} s"
        return None


def _slots_by_primary(client: Any) -> list[tuple[Any, list[int]]]:
    """Each primary of a sync cluster client's slot map, with the slots it serves."""
    nodes: dict[str, Any] = {}
    slots: dict[str, list[int]] = {}
    for slot, owners in sorted(client.nodes_manager.slots_cache.items()):
        if owners:
            nodes[owners[0].name] = owners[0]
            slots.setdefault(owners[0].name, []).append(slot)
    return [(nodes[name], slots[name]) for name in nodes]


def _fd_of(pubsub: Any) -> int | None:
    """The subscription's OS socket; None for a client without one (fakeredis)."""
    try:
        fd = pubsub.connection._sock.fileno()
        select.select((fd,), (), (), 0)
    except (AttributeError, OSError, ValueError, TypeError):
        return None
    return fd
