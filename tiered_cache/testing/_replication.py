"""Primary/replica plumbing shared by the Cluster and Sentinel deployments: flags, admin clients, in-sync checks, polling."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._process import POLL, READY_TIMEOUT

HOST = "127.0.0.1"

# Every data node: no RDB file on a full sync (diskless, no 5 s wait for more replicas), none left behind after one.
REPLICATION_ARGS = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
                    "--repl-diskless-load", "on-empty-db", "--rdb-del-sync-files", "yes")


def admin(port: int, timeout: float = 5.0) -> redis.Redis:
    """A str-decoding client without redis-py's retries, which would hide a dead node behind seconds of backoff."""
    return redis.Redis(host=HOST, port=port, decode_responses=True, socket_connect_timeout=1,
                       socket_timeout=timeout, retry=Retry(NoBackoff(), 0))


def ask(port: int, *args: object) -> object:
    """Run one command on the server at port, closing the connection after it."""
    client = admin(port)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def info(port: int, section: str) -> dict[str, object]:
    """INFO <section> as redis-py parses it (numbers as int, each slaveN line as a dict)."""
    client = admin(port)
    try:
        return client.info(section)
    finally:
        client.close()


def replica_problem(primary_port: int, replica_port: int) -> str | None:
    """Why the replica is not attached to and in sync with the primary, or None when it is."""
    try:
        mine = info(replica_port, "replication")
        theirs = info(primary_port, "replication")
    except redis.RedisError as e:
        return f"INFO replication failed: {e}"
    if mine.get("role") != "slave" or mine.get("master_port") != primary_port:
        return f"127.0.0.1:{replica_port} is not a replica of port {primary_port} (role {mine.get('role')})"
    if mine.get("master_link_status") != "up" or mine.get("master_sync_in_progress") != 0:
        return f"127.0.0.1:{replica_port}'s link to {primary_port} is {mine.get('master_link_status')} or syncing"
    if theirs.get("role") != "master":
        return f"127.0.0.1:{primary_port} is {theirs.get('role')}, not master"
    online = [v for k, v in theirs.items() if k.startswith("slave") and k[5:].isdigit() and isinstance(v, dict)
              and v.get("port") == replica_port and v.get("state") == "online"]
    return None if online else f"127.0.0.1:{primary_port} does not list replica {replica_port} as online"


def wait_until(problem: Callable[[], str | None], what: str, timeout: float = READY_TIMEOUT) -> float:
    """Poll problem() until it reports none; the seconds it took, or RuntimeError with the last problem seen."""
    start = time.monotonic()
    while True:
        last = problem()
        if last is None:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{what}: not done after {timeout:.0f} s: {last}")
        time.sleep(POLL * 5)


class Deployment:
    """start() / stop() of a set of servers, torn down by PID; as a context manager, a serving deployment."""

    def start(self) -> Any:
        raise NotImplementedError

    def _take_servers(self) -> list[Any]:
        """Every server of the deployment, forgotten by it (start() makes new ones)."""
        raise NotImplementedError

    def stop(self) -> None:
        """SIGKILL every server by PID, wait for each to exit, delete their temp dirs."""
        servers = self._take_servers()
        for server in servers:
            with contextlib.suppress(Exception):
                server.kill()
        for server in servers:
            server.close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
