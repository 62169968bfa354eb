"""The PostgreSQL tier's sessions: one psycopg pool per process, driver failures as library errors, nothing after close.

- Session settings: the DSN's own `options` (or PGOPTIONS) are kept and ours are appended, so ours win
  for the two we need: TimeZone (rows are rendered, and expiries checked, in the policy's zone) and
  DateStyle=ISO (the only style psycopg's loaders parse). A different TimeZone in the DSN is logged.
  PGTZ and PGDATESTYLE in the environment would still override options, so a session that starts with
  other values is SET to ours before it enters the pool (one more round trip, only then).
- A write runs on a connection just proven alive by an empty statement: if that probe fails, the write
  was never sent and may run on a fresh connection; if the write itself fails, it may have committed.
- After close() nothing is sent: every call raises Closed before touching the pool.
- fork(): the child never uses, closes or garbage-collects the pool it inherited (its sockets are the
  parent's sessions, and libpq's close would send Terminate on them); it opens its own on first use.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import orjson
import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import set_json_loads

from .. import _fork
from ..errors import Closed, ConfigurationError, StoreUnavailable
from ._pg_timestamps import safe_cursor

logger = logging.getLogger(__name__)

T = TypeVar("T")
Rows = list[tuple[Any, ...]]

#: libpq settings that bound a silent (blackholed) PostgreSQL to about 5 s per call.
TCP_TIMEOUTS = {"tcp_user_timeout": 5000, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 1,
                "keepalives_count": 3}

#: Pools inherited across fork(): kept referenced, so the child never finalizes them (see Connections._after_fork_in_child).
_INHERITED: list[Any] = []

_TIMEZONE_OPTION = re.compile(r"(?:-c\s*|--)timezone=(\S+)", re.IGNORECASE)


def session_options(dsn: str, zone: str) -> str:
    """The libpq `options` for the store's sessions: the DSN's own (else PGOPTIONS), then ours, which win."""
    try:
        given = conninfo_to_dict(dsn).get("options")
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"dsn: libpq cannot parse it: {exc}") from None
    if given is None:
        given = os.environ.get("PGOPTIONS")  # what libpq would have used had we passed no options
    given = str(given or "").strip()
    for other in _TIMEZONE_OPTION.findall(given):
        if other.lower() != zone.lower():
            logger.warning("dsn: options set TimeZone=%s; the store's sessions use its policy zone %s", other, zone)
    ours = f"-c TimeZone={zone} -c DateStyle=ISO"
    return f"{given} {ours}" if given else ours


class Connections:
    """The store's pool, its failure mapping and its lifecycle (close, fork)."""

    def __init__(
        self, dsn: str, *, zone: str, min_size: int, max_size: int, timeout: float, connect_timeout: int, open: bool
    ) -> None:
        self.timeout = timeout
        options = session_options(dsn, zone)
        self._make_pool = lambda: _Pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            kwargs={
                "autocommit": True,
                "connect_timeout": connect_timeout,
                # A blackholed server must fail a call in seconds, not after the kernel's ~15 min of retries.
                **TCP_TIMEOUTS,
                "options": options,
            },
            configure=partial(_configure, zone=zone),
            name="tiered_cache",
            open=False,
        )
        self.pool = self._make_pool()
        self._closed = False
        self._ready = False  # the pool is open and close() has not run: the one check on the hot path
        self._lock = threading.Lock()
        _fork.register(self)
        if open:
            self._open("open")

    def _open(self, op: str) -> None:
        """Open the pool on first use (or at construction); Closed once close() has run."""
        with self._lock:
            if self._closed:
                raise Closed(f"PostgresStore is closed: {op} was not sent")
            if not self._ready:
                self.pool.open(wait=False)
                self._ready = True

    @contextmanager
    def connection(self, op: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; driver failures become StoreUnavailable naming the cause."""
        if not self._ready:
            self._open(op)
        try:
            with self.pool.connection() as conn:
                yield conn
        except psycopg_pool.PoolTimeout as exc:
            raise StoreUnavailable(f"no PostgreSQL connection after {self.timeout:.2f} sec: {exc}") from exc
        except psycopg_pool.PoolClosed as exc:  # close() ran while this call waited for a connection
            raise Closed(f"PostgresStore is closed: {op} was not sent") from exc
        except psycopg.OperationalError as exc:
            if exc.sqlstate in _RETRYABLE:  # deadlock or serialization failure: rolled back, safe to run again
                raise _Conflict(f"PostgreSQL refused the statement: {type(exc).__name__}: {exc}") from exc
            if exc.sqlstate is not None and not exc.sqlstate.startswith(("08", "57P")):
                # A statement error (timeout, lock not available): it rolled back, the link is fine.
                raise StoreUnavailable(f"PostgreSQL refused the statement: {type(exc).__name__}: {exc}") from exc
            # One outage breaks every idle connection alike; closing them is local and instant.
            self.pool.drain()
            raise _BrokenConnection(f"PostgreSQL failed: {exc}", maybe_committed=True) from exc
        except psycopg.Error as exc:  # an autocommit statement that errors has rolled back
            raise StoreUnavailable(f"PostgreSQL refused the statement: {type(exc).__name__}: {exc}") from exc

    # -- statements -----------------------------------------------------------------------------

    def read(self, op: str, sql: str, params: dict[str, Any]) -> Rows:
        """Run a read; one retry on a fresh connection if a pooled one broke (it may predate a restart)."""
        try:
            try:
                return self._fetch(op, sql, params)
            except _BrokenConnection:
                return self._fetch(op, sql, params)
        except ValueError as exc:  # a stored value psycopg or orjson cannot load (e.g. a number beyond a double)
            raise StoreUnavailable(f"PostgreSQL returned a value that cannot be decoded: {exc}") from exc

    def _fetch(self, op: str, sql: str, params: dict[str, Any]) -> Rows:
        """One read with psycopg's own (C) loaders; a result they cannot load is read again with the safe one."""
        with self.connection(op) as conn:
            cur = conn.execute(sql, params, prepare=True)
            try:
                return cur.fetchall()
            except psycopg.DataError:  # raised while loading, not by the server: 'infinity', year 10000, ...
                return safe_cursor(conn).execute(sql, params, prepare=True).fetchall()

    def write(self, op: str, sql: str, params: dict[str, Any]) -> tuple[Rows, int]:
        """Run one autocommit write; its rows (every timestamp loadable) and row count."""
        return self.run_write(op, lambda conn: _answer(safe_cursor(conn).execute(sql, params, prepare=True)))

    def run_write(self, op: str, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """work(conn) on a connection just proven alive; a rolled-back deadlock or serialization loss runs again."""
        return retry_conflicts(lambda: self._write_once(op, work))

    def _write_once(self, op: str, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """One try: an outage never leaves the outcome unknown unless the statement itself was sent."""
        probe_failed = False
        try:
            with self.connection(op) as conn:
                try:
                    # A pooled connection may predate an outage: if this probe fails, the write was never sent.
                    conn.execute("")
                except psycopg.OperationalError:
                    probe_failed = True
                    raise
                return work(conn)
        except _BrokenConnection:
            if not probe_failed:
                raise  # the write itself may have reached the server: never send it twice
        with self.connection(op) as conn:  # the pool was drained: a fresh connection, or a clear failure
            return work(conn)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once close() has run (in this process or, before a fork, in its parent)."""
        return self._closed

    def close(self) -> None:
        """Refuse every later call, then close the pool; idempotent."""
        with self._lock:
            self._closed = True
            self._ready = False
        self.pool.close()

    def _after_fork_in_child(self) -> None:
        """Abandon the inherited pool untouched (its lock may be held, its sockets are the parent's); open anew on use."""
        inherited = self.pool
        _INHERITED.append(inherited)
        # If it were ever finalized (interpreter exit), its __del__ would signal workers that do not exist
        # here through locks the parent's threads may have held; closed, it returns at once. Its
        # connections are safe to collect anyway: psycopg's PGconn only finishes in the process that opened it.
        # Their sockets stay open in the child until it exits; closing them here would gain nothing.
        inherited._closed = True
        self._lock = threading.Lock()
        self.pool = self._make_pool()
        self._ready = False


try:  # private API, checked here: without it the pool still works, it only recovers more slowly
    from psycopg_pool.base import AttemptWithBackoff as _Attempt

    class _CappedBackoff(_Attempt):
        """Reconnect after 0.1 s, doubling to at most 0.5 s: a restarted PostgreSQL is used within half a second."""

        INITIAL_DELAY = 0.1
        MAX_DELAY = 0.5

        def update_delay(self, now: float) -> None:
            super().update_delay(now)
            self.delay = min(self.delay, self.MAX_DELAY)

    class _Pool(psycopg_pool.ConnectionPool):  # type: ignore[type-arg]
        """psycopg's pool, but its reconnection backoff stops growing at 0.5 s instead of minutes."""

        def _add_connection(self, attempt: Any, growing: bool = False) -> None:
            super()._add_connection(attempt or _CappedBackoff(timeout=self.reconnect_timeout), growing)

except (ImportError, AttributeError):  # pragma: no cover - a psycopg_pool without that internal
    _Pool = psycopg_pool.ConnectionPool  # type: ignore[misc]


def _answer(cur: psycopg.Cursor[Any]) -> tuple[Rows, int]:
    """A committed write's rows and count; failing to decode them does not undo the commit."""
    try:
        return (cur.fetchall() if cur.description else []), cur.rowcount
    except (psycopg.Error, ValueError) as exc:
        raise StoreUnavailable(f"the write committed but its answer could not be read: {exc}", maybe_committed=True) from exc


_RETRYABLE = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure


class _Conflict(StoreUnavailable):
    """The statement lost a deadlock or serialization race and was rolled back: running it again is safe."""


class _BrokenConnection(StoreUnavailable):
    """A pooled connection failed mid-use; worth one retry on a fresh one (a pool timeout is not)."""


def retry_conflicts(run: Callable[[], T], attempts: int = 3) -> T:
    """Run a write again when PostgreSQL rolled it back to break a deadlock (as its manual advises)."""
    for attempt in range(1, attempts + 1):
        try:
            return run()
        except _Conflict:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _configure(conn: psycopg.Connection[Any], *, zone: str) -> None:
    """Decode jsonb with orjson (as the Redis tier does); make sure the session renders in `zone`, ISO style."""
    set_json_loads(orjson.loads, conn)
    timezone, datestyle = conn.info.parameter_status("TimeZone"), conn.info.parameter_status("DateStyle")
    if (timezone or "").lower() != zone.lower() or not (datestyle or "").startswith("ISO"):
        logger.debug("session started with TimeZone=%s DateStyle=%s (PGTZ, PGDATESTYLE?): setting ours", timezone,
                     datestyle)
        conn.execute("SELECT set_config('TimeZone', %s, false), set_config('DateStyle', 'ISO', false)", (zone,))
