# Generated from tiered_cache/_async/pg_pool.py by tools/async_to_sync.py: do not edit; edit the source and run it again.
"""The PostgreSQL tier's sessions: one psycopg pool per process, driver failures as library errors, nothing after close.

- Session settings: the DSN's own `options` (or PGOPTIONS) are kept and ours are appended, so ours win
  for the two we need: TimeZone (rows are rendered, and expiries checked, in the policy's zone) and
  DateStyle=ISO (the only style psycopg's loaders parse). A different TimeZone in the DSN is logged.
  PGTZ and PGDATESTYLE in the environment would still override options, so a session that starts with
  other values is SET to ours before it enters the pool (one more round trip, only then).
- A write is one round trip, yet an outage never leaves its outcome unknown unless the write was sent.
  Before sending, the pooled session's socket is polled (no round trip): in steady state it has nothing to
  read. A restart, a terminated session, a reset, or keepalives finding the peer gone (about 8 s, see
  TCP_TIMEOUTS) make it readable; only then is the session first proven alive by an empty statement, as
  every write used to be. A failure before the write is sent is maybe_committed=False, and the write runs
  once more on a fresh connection; a failure after it was sent is maybe_committed=True and the write is
  never sent twice. A peer that vanished without a word (no FIN, no reset) less than the keepalive time ago
  is found by the write itself: maybe_committed=True, which is true (the outcome is unknown), only less
  useful than the probe's answer would have been. The certain answer, maybe_committed=False, is exact.
- After close() nothing is sent: every call raises Closed before touching the pool.
- fork(): the child never uses, closes or garbage-collects the pool it inherited (its sockets are the
  parent's sessions, and libpq's close would send Terminate on them); it opens its own on first use.
- The async twin's pool opens only inside a running loop: there open() (what the store's connect() awaits)
  or the first call opens it, never the constructor (see _acompat).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import orjson
import psycopg
import psycopg_pool
from psycopg.types.json import set_json_loads

from .. import _fork
from .._acompat import Lock, open_pool, sleep
from ..errors import Closed, StoreUnavailable
from ..tiers._pg_timestamps import safe_cursor
from ..tiers._store_shared import (
    CONFLICT_ATTEMPTS,
    INHERITED,
    RETRYABLE,
    TCP_TIMEOUTS,
    Work,
    CappedBackoff,
    Rows,
    T,
    _BrokenConnection,
    _Conflict,
    heard_while_idle,
    session_options,
)

logger = logging.getLogger("tiered_cache.tiers._pg_pool")  # the name it has always logged under


class Connections:
    """The store's pool, its failure mapping and its lifecycle (close, fork)."""

    def __init__(
        self, dsn: str, *, zone: str, min_size: int, max_size: int, timeout: float, connect_timeout: int, open: bool
    ) -> None:
        self.timeout = timeout
        options = session_options(dsn, zone)
        self._make_pool = lambda: CappedPool(
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
        self._lock = Lock()
        _fork.register(self)
        # The pool is open and close() has not run: the one check on the hot path.
        self._ready = open_pool(self.pool) if open else False

    def open(self, op: str) -> None:
        """Open the pool on first use (or when asked to); Closed once close() has run."""
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
            self.open(op)
        try:
            with self.pool.connection() as conn:
                yield conn
        except psycopg_pool.PoolTimeout as exc:
            raise StoreUnavailable(f"no PostgreSQL connection after {self.timeout:.2f} sec: {exc}") from exc
        except psycopg_pool.PoolClosed as exc:  # close() ran while this call waited for a connection
            raise Closed(f"PostgresStore is closed: {op} was not sent") from exc
        except psycopg.OperationalError as exc:
            if exc.sqlstate in RETRYABLE:  # deadlock or serialization failure: rolled back, safe to run again
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
                cur = safe_cursor(conn).execute(sql, params, prepare=True)
                return cur.fetchall()

    def write(self, op: str, sql: str, params: dict[str, Any]) -> tuple[Rows, int]:
        """Run one autocommit write; its rows (every timestamp loadable) and row count."""

        def work(conn: psycopg.Connection[Any]) -> tuple[Rows, int]:
            return _answer(safe_cursor(conn).execute(sql, params, prepare=True))

        return self.run_write(op, work)

    def run_write(self, op: str, work: Work[T]) -> T:
        """work(conn) on a connection not known broken; a rolled-back deadlock or serialization loss runs again."""
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return self._write_once(op, work)
            except _Conflict:
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                # Not at once: the transaction we lost to may still hold its locks (jittered, 1-20 ms).
                sleep(random.uniform(0.001, 0.01) * attempt)
        raise AssertionError("unreachable")

    def _write_once(self, op: str, work: Work[T]) -> T:
        """One try: an outage never leaves the outcome unknown unless the statement itself was sent."""
        probe_failed = False
        try:
            with self.connection(op) as conn:
                if heard_while_idle(conn):
                    try:
                        # Something arrived while it sat in the pool (an outage?): if this probe fails, the
                        # write was never sent.
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
        INHERITED.append(inherited)
        # If it were ever finalized (interpreter exit), its __del__ would signal workers that do not exist
        # here through locks the parent's threads may have held; closed, it returns at once. Its
        # connections are safe to collect anyway: psycopg's PGconn only finishes in the process that opened it.
        # Their sockets stay open in the child until it exits; closing them here would gain nothing.
        inherited._closed = True
        self._lock = Lock()
        self.pool = self._make_pool()
        self._ready = False


class CappedPool(psycopg_pool.ConnectionPool):  # type: ignore[type-arg]
    """psycopg's pool, but its reconnection backoff stops growing at 0.5 s instead of minutes."""

    def _add_connection(self, attempt: Any, growing: bool = False) -> None:
        if attempt is None and CappedBackoff is not None:
            attempt = CappedBackoff(timeout=self.reconnect_timeout)
        super()._add_connection(attempt, growing)


def _answer(cur: psycopg.Cursor[Any]) -> tuple[Rows, int]:
    """A committed write's rows and count; failing to decode them does not undo the commit."""
    try:
        return (cur.fetchall() if cur.description else []), cur.rowcount
    except (psycopg.Error, ValueError) as exc:
        raise StoreUnavailable(f"the write committed but its answer could not be read: {exc}", maybe_committed=True) from exc


def _configure(conn: psycopg.Connection[Any], *, zone: str) -> None:
    """Decode jsonb with orjson (as the Redis tier does); make sure the session renders in `zone`, ISO style."""
    set_json_loads(orjson.loads, conn)
    timezone, datestyle = conn.info.parameter_status("TimeZone"), conn.info.parameter_status("DateStyle")
    if (timezone or "").lower() != zone.lower() or not (datestyle or "").startswith("ISO"):
        logger.debug("session started with TimeZone=%s DateStyle=%s (PGTZ, PGDATESTYLE?): setting ours", timezone,
                     datestyle)
        conn.execute("SELECT set_config('TimeZone', %s, false), set_config('DateStyle', 'ISO', false)", (zone,))
