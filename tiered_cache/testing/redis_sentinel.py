"""A throwaway Sentinel deployment (1 primary, 1 replica, 3 sentinels) that tests can fail over and restart.

Sentinels notice a dead primary after down-after-milliseconds (1 s), agree with a quorum of 2,
promote the replica and announce it; a killed primary comes back as a replica of whoever is
primary then, as a deployment that rewrote its config would. Sentinels rewrite their own config
file, so each one keeps it in its temp dir, owned by the user it runs as.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Self

import redis

from ._replication import HOST, Deployment, REPLICATION_ARGS, admin, ask, replica_problem, wait_until
from .redis import RedisServer


class SentinelServer(RedisServer):
    """One sentinel: `redis-server <its config> --sentinel`, monitoring one primary by name."""

    _prefix = "tc-sentinel-"

    def __init__(self, *, master_name: str, primary_port: int, quorum: int, down_after_ms: int,
                 failover_timeout_ms: int) -> None:
        super().__init__()
        self.config_path = self.tempdir / "sentinel.conf"
        self._monitor = (f"sentinel monitor {master_name} {HOST} {primary_port} {quorum}\n"
                         f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
                         f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
                         f"sentinel parallel-syncs {master_name} 1\n")

    def _start_once(self) -> None:
        """Write the config on first start (later starts keep what the sentinel rewrote), run it, wait for PING."""
        if not self._started_once:
            self.config_path.write_text(
                f"port {self.port}\nbind {HOST}\nprotected-mode no\ndaemonize no\nlogfile \"\"\n"
                f"dir {self.tempdir}\n" + self._monitor)
            if self._user is not None:
                os.chown(self.config_path, self._user.pw_uid, self._user.pw_gid)
        self._spawn([str(self.executable), str(self.config_path), "--sentinel"])
        self._wait_ready(self._ready)

    def stop(self) -> None:
        """SIGTERM (a sentinel keeps no data), SIGKILL if it lingers."""
        with self._lock:
            self._signal_stop(signal.SIGTERM)


@dataclass
class SentinelFailover:
    """A killed primary and the replica the sentinels promoted; window is the seconds from SIGKILL to served."""

    killed: RedisServer
    killed_at: float = field(default_factory=time.monotonic)
    promoted: RedisServer | None = None
    window: float | None = None


class RedisSentinel(Deployment):
    """A local Sentinel deployment on free loopback ports: start(), kill the primary, restart it, stop()."""

    def __init__(self, *, master_name: str = "mymaster", replicas: int = 1, sentinels: int = 3, quorum: int = 2,
                 down_after_ms: int = 1500, failover_timeout_ms: int = 3000) -> None:
        self.master_name = master_name
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.servers: list[RedisServer] = []  # the data servers: the first primary, then its replicas
        self.sentinel_servers: list[SentinelServer] = []
        self.startup_seconds: float | None = None

    # -- addresses -------------------------------------------------------------------------------
    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """(host, port) of every sentinel, as redis.sentinel.Sentinel takes them."""
        return [(HOST, s.port) for s in self.sentinel_servers]

    @property
    def url(self) -> str:
        """redis+sentinel://127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3/<master name>."""
        return "redis+sentinel://" + ",".join(f"{h}:{p}" for h, p in self.sentinels) + f"/{self.master_name}"

    @property
    def version(self) -> str:
        """The redis-server version the deployment runs."""
        return self.servers[0].version if self.servers else ""

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Self:
        """Start the primary, its replicas and the sentinels; wait until every sentinel knows them all."""
        if self.servers:
            self.ensure_healthy()
            return self
        began = time.monotonic()
        try:
            primary = RedisServer(extra_args=REPLICATION_ARGS)
            self.servers.append(primary)
            primary.start()
            for _ in range(self.replica_count):
                self.servers.append(RedisServer(extra_args=self._replica_args(primary.port)))
                self.servers[-1].start()
            for _ in range(self.sentinel_count):
                self.sentinel_servers.append(SentinelServer(
                    master_name=self.master_name, primary_port=primary.port, quorum=self.quorum,
                    down_after_ms=self.down_after_ms, failover_timeout_ms=self.failover_timeout_ms))
                self.sentinel_servers[-1].start()
            wait_until(self._full_problem, "sentinel deployment becoming healthy")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    @staticmethod
    def _replica_args(primary_port: int) -> tuple[str, ...]:
        """redis-server arguments of a replica of the primary on primary_port."""
        return (*REPLICATION_ARGS, "--replicaof", HOST, str(primary_port))

    def _take_servers(self) -> list[RedisServer]:
        everything = [*self.sentinel_servers, *self.servers]
        self.servers, self.sentinel_servers = [], []
        return everything

    def __repr__(self) -> str:
        """Every server and sentinel, for test failure output."""
        return f"<RedisSentinel {self.master_name} servers={self.servers} sentinels={self.sentinel_servers}>"

    # -- what the sentinels say --------------------------------------------------------------------
    def _reported(self) -> list[tuple[str, int] | None]:
        """The primary address each sentinel reports (None for one that does not answer)."""
        found: list[tuple[str, int] | None] = []
        for s in self.sentinel_servers:
            client = admin(s.port)
            try:
                addr = client.sentinel_get_master_addr_by_name(self.master_name)
                found.append((str(addr[0]), int(addr[1])) if isinstance(addr, (tuple, list)) and addr else None)
            except redis.RedisError:
                found.append(None)
            finally:
                client.close()
        return found

    def primary(self) -> tuple[str, int]:
        """The primary's address, as the first sentinel that answers reports it."""
        for addr in self._reported():
            if addr is not None:
                return addr
        raise RuntimeError(f"no sentinel of {self!r} reports a primary")

    def primary_server(self) -> RedisServer:
        """The data server at the address the sentinels report."""
        port = self.primary()[1]
        for server in self.servers:
            if server.port == port:
                return server
        raise RuntimeError(f"the sentinels report a primary on port {port}, which is none of {self!r}")

    def replicas(self) -> list[RedisServer]:
        """The running data servers other than the reported primary."""
        primary = self.primary_server()
        return [s for s in self.servers if s is not primary and s.running]

    @staticmethod
    def _role(server: RedisServer) -> str:
        """ROLE's first word ('master', 'slave'), or 'down'."""
        if not server.running:
            return "down"
        try:
            reply = ask(server.port, "ROLE")
        except redis.RedisError:
            return "down"
        return str(reply[0]) if isinstance(reply, list) else "down"

    def _served_problem(self, not_port: int | None = None) -> str | None:
        """Why every sentinel does not report one live master (other than not_port)."""
        reported = set(self._reported())
        addr = reported.pop() if len(reported) == 1 else None
        if addr is None:
            return f"sentinels report {sorted(reported, key=str) or 'no primary'}"
        port = addr[1]
        if port == not_port:
            return f"sentinels still report the killed primary {port}"
        server = next((s for s in self.servers if s.port == port), None)
        if server is None or self._role(server) != "master":
            return f"reported primary {port} is {self._role(server) if server else 'not ours'}"
        return None

    def _full_problem(self) -> str | None:
        """Why the deployment is not whole: all up, replicas in sync, every sentinel seeing them and its peers."""
        down = [s for s in (*self.servers, *self.sentinel_servers) if not s.running]
        if down:
            return f"{down[0]!r} is down"
        problem = self._served_problem()
        if problem:
            return problem
        primary = self.primary_server()
        replicas = [s for s in self.servers if s is not primary]
        for replica in replicas:
            problem = replica_problem(primary.port, replica.port)
            if problem:
                return problem
        for s in self.sentinel_servers:
            client = admin(s.port)
            try:
                state = client.sentinel_master(self.master_name)
                seen = client.sentinel_slaves(self.master_name)
            except redis.RedisError as e:
                return f"sentinel {s.port} did not answer: {e}"
            finally:
                client.close()
            if not isinstance(state, dict) or not isinstance(seen, list):
                return f"sentinel {s.port} gave no state for {self.master_name}"
            if state["flags"] != "master" or state["num-other-sentinels"] != self.sentinel_count - 1:
                return f"sentinel {s.port} sees the master as {state['flags']} with " \
                       f"{state['num-other-sentinels']} other sentinels"
            healthy = {r["port"] for r in seen if r["flags"] == "slave" and r.get("master-link-status") == "ok"}
            missing = {r.port for r in replicas} - healthy
            if missing:
                return f"sentinel {s.port} does not see replicas {sorted(missing)} as healthy"
        return None

    # -- health and faults -----------------------------------------------------------------------------
    def ensure_healthy(self) -> None:
        """Restart dead sentinels, let a failover finish, bring killed servers back as replicas, wait until whole."""
        for s in self.sentinel_servers:
            if not s.running:
                s.start()
        self.restart_old_primary()

    def kill_primary(self, *, wait: bool = True) -> SentinelFailover:
        """SIGKILL the primary; wait=True waits until the sentinels report a promoted replica that is master."""
        wait_until(self._served_problem, "sentinels agreeing on a live primary")
        failover = SentinelFailover(killed=self.primary_server())
        failover.killed.kill()
        return self.wait_failover(failover) if wait else failover

    def wait_failover(self, failover: SentinelFailover) -> SentinelFailover:
        """Wait until every sentinel reports a new primary and that server answers ROLE as master."""
        wait_until(lambda: self._served_problem(not_port=failover.killed.port),
                   f"failover from {failover.killed!r}")
        failover.window = time.monotonic() - failover.killed_at
        failover.promoted = self.primary_server()
        return failover

    def restart_old_primary(self) -> list[RedisServer]:
        """Start every killed data server again, as a replica of the current primary; wait until all is whole."""
        wait_until(self._served_problem, "sentinels agreeing on a live primary")
        primary = self.primary_server()
        restarted = []
        for server in self.servers:
            if not server.running:
                server.extra_args = self._replica_args(primary.port)
                server.start()
                restarted.append(server)
        wait_until(self._full_problem, "sentinel deployment becoming whole again")
        return restarted

    def flushall(self) -> None:
        """FLUSHALL on the primary, wait until its replicas have it too, and drop cached scripts everywhere."""
        primary = self.primary_server()
        ask(primary.port, "FLUSHALL")
        ask(primary.port, "WAIT", len(self.replicas()), 5000)
        for server in self.servers:
            if server.running:
                ask(server.port, "SCRIPT", "FLUSH")
