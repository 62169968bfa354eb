"""A throwaway PostgreSQL cluster, run as an unprivileged user when we are root (PostgreSQL refuses root)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import psycopg
from psycopg import sql

from . import _process
from ._access import blocked_component, placed
from ._binaries import find_postgres_bin_dir, postgres_tree
from ._process import READY_TIMEOUT, STOP_SIGNALS, binary_version, proc_children, user_kwargs, wait_pids_gone
from ._server import _Server


class PostgresServer(_Server):
    """A throwaway PostgreSQL cluster: trust auth, superuser 'postgres', UTF8, locale C, 127.0.0.1 only."""

    _prefix = "tc-pg-"

    def __init__(self, *, port: int | None = None, fsync: bool = False) -> None:
        user = _process._unprivileged_user()
        found = find_postgres_bin_dir()
        anchor, tree = postgres_tree(found)
        # As root the server's user may not reach a checkout's .venv (/root/...): then run from a copy it can read.
        self.bin_dir = placed(anchor, tree, user) / found.relative_to(anchor)
        self.fsync = fsync
        blocked = blocked_component(self.bin_dir, user) if user is not None else None
        hint = f" User {user.pw_name!r} cannot traverse {blocked}." if user is not None and blocked else ""
        self.version: str = binary_version(
            [str(self.bin_dir / "postgres"), "--version"], r"\(PostgreSQL\)\s+(\S+)", "PostgreSQL", user, hint)
        super().__init__(port, user)
        self.data_dir = self.tempdir / "data"

    @property
    def dsn(self) -> str:
        """libpq URL of the 'postgres' database as superuser 'postgres'."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _initdb(self) -> None:
        """Create the cluster and write its settings into postgresql.conf so every later start is identical."""
        args = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "--auth=trust", "--username=postgres",
                "--encoding=UTF8", "--locale=C", "--no-instructions"]
        if not self.fsync:
            args.append("--no-sync")
        r = subprocess.run(args, capture_output=True, text=True, cwd=self.tempdir, timeout=120,  # type: ignore[call-overload]
                           **user_kwargs(self._user))
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
        self._spawn([str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)])
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
        if mode not in STOP_SIGNALS:
            raise ValueError(f"mode must be one of {sorted(STOP_SIGNALS)}, not {mode!r}")
        with self._lock:
            self._signal_stop(STOP_SIGNALS[mode])

    def kill(self) -> None:
        """SIGKILL the postmaster and then its orphaned backends, as a crash; data kept, next start recovers."""
        with self._lock:
            if self._proc is None:
                return
            kids = proc_children(self._proc.pid)
            self._hard_kill()
            # Backends would exit by themselves on postmaster death, but a busy one may take a while and
            # would keep the old shared memory attached, making the next start fail: kill them now.
            for pid in kids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            wait_pids_gone(kids, READY_TIMEOUT)

    def create_database(self, name: str) -> str:
        """Create a fresh database and return its DSN, so each test can get an isolated schema cheaply."""
        if not self.running:
            raise RuntimeError("PostgresServer is not running; call start() first")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"
