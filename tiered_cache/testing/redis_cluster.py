"""A throwaway Redis Cluster (3 primaries, 3 replicas by default) that tests can fail over, reshard and restart.

The cluster is made by hand, as redis-cli would make it but without needing redis-cli: a distinct
config epoch per node, ADDSLOTS on each primary, MEET, then REPLICATE once every node knows every
other. A short cluster-node-timeout makes a failover take a couple of seconds, and a replica
validity factor of 0 lets a replica take over however long it was cut off. Nothing is persisted
but each node's nodes.conf, in its own temp dir, which lets a killed node rejoin when restarted.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

import redis
from redis.crc import key_slot

from ._process import free_port
from ._replication import HOST, Deployment, REPLICATION_ARGS, ask, replica_problem, wait_until
from .redis import RedisServer

SLOTS = 16384
BUS_OFFSET = 10000  # Redis 6.2 has no cluster-port option: the bus always listens on port + 10000
MIGRATE_TIMEOUT_MS = 5000


def _bindable(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:port right now."""
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class NodeView:
    """One line of CLUSTER NODES: how one node sees another (or itself)."""

    node_id: str
    port: int
    flags: frozenset[str]
    primary_id: str | None
    slots: tuple[tuple[int, int], ...]
    migrations: tuple[str, ...]  # "[slot->-id]" (migrating) and "[slot-<-id]" (importing) entries

    @property
    def is_primary(self) -> bool:
        """A master in this view (failed or not)."""
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        """Flagged as failed, suspected, still being met, or without an address."""
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})

    def owns(self, slot: int) -> bool:
        """Whether this node serves slot, in this view."""
        return any(lo <= slot <= hi for lo, hi in self.slots)


def parse_nodes(text: str) -> list[NodeView]:
    """CLUSTER NODES output as NodeViews (`id ip:port@bus[,host] flags primary ping pong epoch link slots...`)."""
    views = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        addr = parts[1].split("@", 1)[0]
        slots = tuple((int(r.split("-")[0]), int(r.split("-")[-1])) for r in parts[8:] if not r.startswith("["))
        views.append(NodeView(parts[0], int(addr.rsplit(":", 1)[1] or 0), frozenset(parts[2].split(",")),
                              None if parts[3] == "-" else parts[3], slots,
                              tuple(r for r in parts[8:] if r.startswith("["))))
    return views


class Node(RedisServer):
    """One cluster node: a redis-server with cluster mode on, its bus on port + 10000, its node id kept."""

    _prefix = "tc-cluster-"

    def __init__(self, *, node_timeout_ms: int = 1000) -> None:
        super().__init__(extra_args=(
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms), "--cluster-replica-validity-factor", "0",
            *REPLICATION_ARGS))
        self.node_id = ""

    def _free_port(self) -> int:
        """A free port whose bus port (+10000) is free as well."""
        for _ in range(100):
            port = free_port()
            if port + BUS_OFFSET <= 65535 and _bindable(port + BUS_OFFSET):
                return port
        raise RuntimeError("No free loopback port p with p + 10000 free too (the cluster bus port)")

    def _start_once(self) -> None:
        """Start as RedisServer does, then learn the node id (kept in nodes.conf across restarts)."""
        super()._start_once()
        self.node_id = str(ask(self.port, "CLUSTER", "MYID"))

    @property
    def role(self) -> str:
        """'primary', 'replica', or 'down' (ROLE as the node itself answers it)."""
        if not self.running:
            return "down"
        try:
            reply = ask(self.port, "ROLE")
        except redis.RedisError:
            return "down"
        return "primary" if isinstance(reply, list) and reply[0] == "master" else "replica"

    def view(self) -> list[NodeView]:
        """The cluster as this node sees it."""
        return parse_nodes(str(ask(self.port, "CLUSTER", "NODES")))

    def __repr__(self) -> str:
        """Port, node id and process, for test failure output."""
        return f"<Node 127.0.0.1:{self.port} {self.node_id[:8] or '?'} pid={self.pid}>"


@dataclass
class ClusterFailover:
    """A killed primary and what took its place; window is the seconds from SIGKILL to a served cluster."""

    killed: Node
    slot: int  # one slot the killed primary served
    killed_at: float = field(default_factory=time.monotonic)
    promoted: Node | None = None
    window: float | None = None


class RedisCluster(Deployment):
    """A local Redis Cluster on free loopback ports: start(), fail over, migrate a slot, restart, stop()."""

    def __init__(self, *, primaries: int = 3, replicas_per_primary: int = 1, node_timeout_ms: int = 1000) -> None:
        if primaries < 3:
            raise ValueError("a cluster needs at least 3 primaries to elect a replica after a failure")
        self.primary_count = primaries
        self.replicas_per_primary = replicas_per_primary
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[Node] = []
        self.startup_seconds: float | None = None

    # -- addresses -------------------------------------------------------------------------------
    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node, for a cluster client's startup nodes."""
        return [(HOST, n.port) for n in self.nodes]

    @property
    def url(self) -> str:
        """redis+cluster://127.0.0.1:p1,127.0.0.1:p2,... naming every node, so any live one can bootstrap."""
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.startup_nodes)

    @property
    def version(self) -> str:
        """The redis-server version the nodes run."""
        return self.nodes[0].version if self.nodes else ""

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Self:
        """Start every node, make the cluster and wait until it serves with every replica in sync."""
        if self.nodes:
            self.ensure_healthy()
            return self
        began = time.monotonic()
        try:
            count = self.primary_count * (1 + self.replicas_per_primary)
            for _ in range(count):
                self.nodes.append(Node(node_timeout_ms=self.node_timeout_ms))
                self.nodes[-1].start()
            self._create()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _create(self) -> None:
        """Epochs, slots, MEET, REPLICATE: what `redis-cli --cluster create --cluster-replicas N` does."""
        primaries = self.nodes[:self.primary_count]
        for epoch, node in enumerate(self.nodes, start=1):
            ask(node.port, "CLUSTER", "SET-CONFIG-EPOCH", epoch)  # distinct epochs: no collision rounds later
        for i, node in enumerate(primaries):
            lo, hi = i * SLOTS // len(primaries), (i + 1) * SLOTS // len(primaries) - 1
            ask(node.port, "CLUSTER", "ADDSLOTS", *range(lo, hi + 1))  # ADDSLOTSRANGE is 7.0+
        for node in self.nodes[1:]:
            ask(self.nodes[0].port, "CLUSTER", "MEET", HOST, node.port)
        wait_until(self._mesh_problem, "cluster nodes meeting")
        for i, node in enumerate(self.nodes[self.primary_count:]):
            ask(node.port, "CLUSTER", "REPLICATE", primaries[i % len(primaries)].node_id)
        wait_until(self._full_problem, "cluster becoming healthy")

    def _take_servers(self) -> list[Node]:
        nodes, self.nodes = self.nodes, []
        return nodes

    def __repr__(self) -> str:
        """Every node, for test failure output."""
        return f"<RedisCluster {self.nodes}>"

    # -- what the cluster looks like ---------------------------------------------------------------
    def _by_id(self, node_id: str | None) -> Node | None:
        """Our Node with that node id."""
        return next((n for n in self.nodes if n.node_id == node_id), None)

    def _live_view(self) -> list[NodeView]:
        """CLUSTER NODES from the first live node that answers."""
        for node in self.nodes:
            if node.running:
                with contextlib.suppress(redis.RedisError):
                    return node.view()
        raise RuntimeError(f"no node of {self!r} answers")

    def _owner(self, slot: int) -> Node:
        """The live primary serving slot."""
        for v in self._live_view():
            node = self._by_id(v.node_id)
            if v.is_primary and not v.failing and v.owns(slot) and node is not None and node.running:
                return node
        raise RuntimeError(f"no live primary serves slot {slot} in {self!r}")

    def primaries(self) -> list[Node]:
        """The live primaries that serve slots, in slot order."""
        views = sorted((v for v in self._live_view() if v.is_primary and not v.failing and v.slots),
                       key=lambda v: v.slots[0])
        return [n for n in (self._by_id(v.node_id) for v in views) if n is not None and n.running]

    def replicas_of(self, primary: Node) -> list[Node]:
        """The live replicas of primary."""
        ids = [v.node_id for v in self._live_view() if v.primary_id == primary.node_id and not v.failing]
        return [n for n in map(self._by_id, ids) if n is not None and n.running]

    def primary_for(self, key: str | bytes) -> Node:
        """The primary that serves key's slot now."""
        return self._owner(key_slot(key.encode() if isinstance(key, str) else key))

    # -- health --------------------------------------------------------------------------------------
    def _mesh_problem(self) -> str | None:
        """Why not every node knows every other by id and address yet."""
        ids = {n.node_id for n in self.nodes}
        for node in self.nodes:
            try:
                known = {v.node_id for v in node.view() if not v.flags & {"handshake", "noaddr"}}
            except redis.RedisError as e:
                return f"{node!r} did not answer: {e}"
            if known != ids:
                return f"{node!r} knows {len(known & ids)} of {len(ids)} nodes"
        return None

    def _live_problem(self) -> str | None:
        """Why the live nodes do not agree on a cluster that serves every slot, with live replicas in sync."""
        live = [n for n in self.nodes if n.running]
        layouts = set()
        try:
            for node in live:
                state = str(ask(node.port, "CLUSTER", "INFO"))
                if "cluster_state:ok" not in state:
                    return f"{node!r} reports cluster_state other than ok"
                views = {v.node_id: v for v in node.view()}
                layout = []
                for other in live:
                    v = views.get(other.node_id)
                    if v is None or v.failing:
                        return f"{node!r} sees {other!r} as {sorted(v.flags) if v else 'unknown'}"
                    if v.migrations:
                        return f"{node!r} sees slots being moved: {v.migrations}"
                    layout.append((v.node_id, v.is_primary, v.primary_id, v.slots))
                dead_owners = [v for v in views.values() if v.slots and self._by_id(v.node_id) not in live]
                if dead_owners:
                    return f"{node!r} still has slots on a dead node {dead_owners[0].node_id[:8]}"
                layouts.add(tuple(layout))
            if len(layouts) > 1:
                return "live nodes disagree on roles or slots"
            for node_id, is_primary, primary_id, _ in next(iter(layouts), ()):
                primary = self._by_id(primary_id)
                if not is_primary and primary is not None and primary.running:
                    replica = self._by_id(node_id)
                    problem = replica_problem(primary.port, replica.port) if replica is not None else None
                    if problem:
                        return problem
        except redis.RedisError as e:
            return f"a live node did not answer: {e}"
        return None

    def _full_problem(self) -> str | None:
        """Why the cluster is not whole: every node up, every primary with its replicas in sync, state ok."""
        down = [n for n in self.nodes if not n.running]
        if down:
            return f"{down[0]!r} is down"
        problem = self._live_problem()
        if problem:
            return problem
        primaries = self.primaries()
        if len(primaries) != self.primary_count:
            return f"{len(primaries)} primaries serve slots, not {self.primary_count}"
        for p in primaries:
            if len(self.replicas_of(p)) != self.replicas_per_primary:
                return f"{p!r} has {len(self.replicas_of(p))} replicas"
        return None

    def ensure_healthy(self) -> None:
        """Restart any killed node, cancel a half-done slot move, and wait until the cluster is whole again."""
        for node in self.nodes:
            if not node.running:
                node.start()
        for node in self.nodes:
            with contextlib.suppress(redis.RedisError):
                for v in node.view():
                    if "myself" in v.flags:
                        for entry in v.migrations:
                            ask(node.port, "CLUSTER", "SETSLOT", int(entry[1:].split("-")[0]), "STABLE")
        wait_until(self._full_problem, "cluster becoming whole again")

    def flushall(self) -> None:
        """FLUSHALL on every primary, wait until their replicas have it too, and drop cached scripts everywhere."""
        for primary in self.primaries():
            ask(primary.port, "FLUSHALL")
            ask(primary.port, "WAIT", len(self.replicas_of(primary)), MIGRATE_TIMEOUT_MS)
        for node in self.nodes:
            if node.running:
                ask(node.port, "SCRIPT", "FLUSH")

    # -- faults and resharding -------------------------------------------------------------------------
    def kill_primary(self, target: Node | str | bytes | None = None, *, wait: bool = True) -> ClusterFailover:
        """SIGKILL a primary (a Node, or the one serving a key; the first by default); wait=True waits for the failover."""
        node = target if isinstance(target, Node) else (
            self.primaries()[0] if target is None else self.primary_for(target))
        views = {v.node_id: v for v in self._live_view()}
        mine = views.get(node.node_id)
        if mine is None or not mine.is_primary or not mine.slots or not node.running:
            raise ValueError(f"{node!r} is not a live primary serving slots")
        failover = ClusterFailover(killed=node, slot=mine.slots[0][0])
        node.kill()
        return self.wait_failover(failover) if wait else failover

    def wait_failover(self, failover: ClusterFailover) -> ClusterFailover:
        """Wait until a replica serves the killed primary's slots and every live node reports cluster_state:ok."""
        def problem() -> str | None:
            try:
                return self._live_problem() or (None if self._owner(failover.slot).running else "owner down")
            except RuntimeError as e:
                return str(e)

        wait_until(problem, f"failover of {failover.killed!r}")
        failover.window = time.monotonic() - failover.killed_at
        failover.promoted = self._owner(failover.slot)
        return failover

    def restart(self, node: Node) -> Node:
        """Start a killed node again on its port; it rejoins (as a replica, if it was a primary that was replaced)."""
        node.start()
        wait_until(lambda: self._live_problem() or self._rejoined_problem(node), f"{node!r} rejoining")
        return node

    def _rejoined_problem(self, node: Node) -> str | None:
        """Why node does not yet take part: it must serve slots or replicate a live primary."""
        v = next((v for v in self._live_view() if v.node_id == node.node_id), None)
        if v is None or v.failing:
            return f"{node!r} not seen as live"
        return None if v.slots or v.primary_id else f"{node!r} neither serves slots nor replicates"

    def migrate_slot(self, slot: int, target: Node, pause_hook: Callable[[int], object] | None = None,
                     *, batch: int = 10) -> int:
        """Move slot to target as redis-cli reshard does: IMPORTING, MIGRATING, MIGRATE in batches, SETSLOT NODE.

        pause_hook(keys_moved_so_far) runs after each batch, while the slot is half-moved (clients get ASK).
        Returns the number of keys moved.
        """
        source = self._owner(slot)
        if source is target:
            return 0
        ask(target.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        ask(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        moved = 0
        while keys := ask(source.port, "CLUSTER", "GETKEYSINSLOT", slot, batch):
            assert isinstance(keys, list)
            ask(source.port, "MIGRATE", HOST, target.port, "", 0, MIGRATE_TIMEOUT_MS, "REPLACE", "KEYS", *keys)
            moved += len(keys)
            if pause_hook is not None:
                pause_hook(moved)
        others = [p for p in self.primaries() if p is not source and p is not target]
        for node in (target, source, *others):
            ask(node.port, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        wait_until(lambda: self._live_problem() or (None if self._owner(slot) is target else "not moved yet"),
                   f"slot {slot} moving to {target!r}")
        return moved

    def keys_in_slot(self, node: Node, slot: int) -> int:
        """How many keys of slot node holds (CLUSTER COUNTKEYSINSLOT), whoever serves the slot."""
        return int(str(ask(node.port, "CLUSTER", "COUNTKEYSINSLOT", slot)))
