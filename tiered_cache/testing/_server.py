"""Lifecycle shared by both throwaway servers: one child process, one temp dir, closed at interpreter exit."""

from __future__ import annotations

import atexit
import contextlib
import pwd
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from . import _process
from ._access import make_tempdir
from ._process import READY_TIMEOUT, POLL, free_port, tail, wait_exit

_LIVE: set[_Server] = set()
_LIVE_LOCK = threading.Lock()


def _close_all() -> None:
    """atexit hook: close every server not closed yet, so no child process or temp dir is left behind."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for s in servers:
        with contextlib.suppress(Exception):
            s.close()


atexit.register(_close_all)


class _PortInUse(Exception):
    """Internal: the server could not bind its port (retried with another port when we chose it)."""


class _Server:
    """One child process, one temp dir (owned by the server's user), a fixed port once chosen."""

    _prefix = "tc-"

    def __init__(self, port: int | None, user: pwd.struct_passwd | None) -> None:
        self._user = user
        self._port_fixed = port is not None
        self.port: int = port if port is not None else self._free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._closed = False
        self._started_once = False
        self._lock = threading.RLock()
        self.tempdir: Path = make_tempdir(self._prefix, user)
        self.log_path: Path = self.tempdir / "server.log"
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def running(self) -> bool:
        """Whether the server process is alive (it may still be starting up)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the server process while running, for tests that signal it."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def run_as(self) -> str:
        """OS user the server runs as (differs from ours only when we are root)."""
        return _process.run_as_name(self._user)

    def start(self) -> Self:
        """Start the server and wait until it answers; a no-op when already running."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{type(self).__name__} is closed; create a new one")
            if self.running:
                return self
            attempts = 1 if (self._port_fixed or self._started_once) else 3
            for attempt in range(attempts):
                try:
                    self._start_once()
                    break
                except _PortInUse:
                    if attempt == attempts - 1:
                        raise RuntimeError(self._failure(f"port {self.port} is already in use")) from None
                    self.port = self._free_port()  # lost a race for the port we picked: pick another
            self._started_once = True
            return self

    def _free_port(self) -> int:
        """A port to listen on when none was given (a server that needs more than one port overrides this)."""
        return free_port()

    def _start_once(self) -> None:
        """One attempt to launch the server and wait for readiness (raises _PortInUse on a port clash)."""
        raise NotImplementedError

    def _failure(self, what: str) -> str:
        """Error text with the tail of the server log, so failures explain themselves."""
        return (f"{type(self).__name__} on 127.0.0.1:{self.port} failed: {what}\n"
                f"--- {self.log_path} (tail) ---\n{tail(self.log_path)}")

    def _spawn(self, args: list[str]) -> None:
        """Start the server process as its user, remembering where its log output for this start begins."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc = _process.spawn(args, log=self.log_path, cwd=self.tempdir, user=self._user)

    def _log_since_spawn(self) -> str:
        """What the server logged since the last spawn, to tell a port clash from other failures."""
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")
        return ""

    def _wait_ready(self, check: Callable[[], bool]) -> None:
        """Poll check() until True, failing fast if the process exits, bounded by READY_TIMEOUT."""
        assert self._proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                self._proc = None
                if "Address already in use" in self._log_since_spawn():
                    raise _PortInUse
                raise RuntimeError(self._failure("server exited during startup"))
            if check():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(self._failure(f"not ready after {READY_TIMEOUT:.0f}s"))
            time.sleep(POLL)

    def _hard_kill(self) -> None:
        """SIGKILL the process and wait for it."""
        with self._lock:
            if self._proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
                self._proc.wait()
                self._proc = None

    def _signal_stop(self, sig: int) -> None:
        """Send sig, wait up to READY_TIMEOUT, then SIGKILL as a last resort."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)
            if not wait_exit(self._proc, READY_TIMEOUT):
                self.kill()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; data on disk is kept."""
        self._hard_kill()

    def stop(self) -> None:
        """Graceful shutdown that keeps the temp dir (overridden per server)."""
        raise NotImplementedError

    def restart(self) -> None:
        """Stop then start again on the same port."""
        with self._lock:
            self.stop()
            self.start()

    def close(self) -> None:
        """Stop the server and delete its temp dir; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            try:
                try:
                    self.stop()
                except Exception:
                    self.kill()
            finally:
                self._closed = True
                shutil.rmtree(self.tempdir, ignore_errors=True)
                with _LIVE_LOCK:
                    _LIVE.discard(self)

    def __enter__(self) -> Self:
        """Start on entry so `with Server() as s:` yields a running server."""
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close on exit: stop and delete the temp dir."""
        self.close()

    def __repr__(self) -> str:
        """Port, state and temp dir, for test failure output."""
        state = "closed" if self._closed else ("running" if self.running else "stopped")
        return f"<{type(self).__name__} 127.0.0.1:{self.port} {state} {self.tempdir}>"
