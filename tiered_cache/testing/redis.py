"""A throwaway redis-server, run as an unprivileged user when we are root."""

from __future__ import annotations

import contextlib
import signal

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import _process
from ._access import placed
from ._binaries import find_redis_server, redis_tree
from ._process import binary_version, wait_exit
from ._server import _Server


class RedisServer(_Server):
    """A throwaway Redis: no persistence, no protected mode, 127.0.0.1 only."""

    _prefix = "tc-redis-"

    def __init__(self, *, port: int | None = None, maxmemory: str | None = None,
                 maxmemory_policy: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        # Not root's: with no password, any local user could CONFIG SET dir/dbfilename and SAVE over root's files.
        user = _process._unprivileged_user(_process._REDIS_USERS)
        found = find_redis_server()
        anchor, tree = redis_tree(found)
        self.executable = placed(anchor, tree, user) / found.relative_to(anchor)
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.extra_args = tuple(extra_args)
        self.version: str = binary_version([str(self.executable), "--version"], r"\bv=(\S+)", "Redis", user)
        super().__init__(port, user)

    @property
    def url(self) -> str:
        """redis-py URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _start_once(self) -> None:
        """Run redis-server in the foreground as our child and wait for PING."""
        args = [str(self.executable), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no", "--dir", str(self.tempdir),
                "--logfile", ""]
        if self.maxmemory is not None:
            args += ["--maxmemory", self.maxmemory]
        if self.maxmemory_policy is not None:
            args += ["--maxmemory-policy", self.maxmemory_policy]
        args += list(self.extra_args)
        self._spawn(args)
        self._wait_ready(self._ready)

    def _client(self) -> redis.Redis:
        """A client without redis-py's default retries, which would add seconds to polling and SHUTDOWN."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=5,
                           retry=Retry(NoBackoff(), 0))

    def _ready(self) -> bool:
        """Ready when PING answers."""
        client = self._client()
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """SHUTDOWN NOSAVE and wait for the process to exit (SIGTERM, then SIGKILL, if that fails)."""
        with self._lock:
            if self._proc is None:
                return
            if self._proc.poll() is None:
                client = self._client()
                with contextlib.suppress(redis.RedisError):
                    client.shutdown(nosave=True)
                client.close()
                if wait_exit(self._proc, 5):
                    self._proc = None
                    return
            self._signal_stop(signal.SIGTERM)
