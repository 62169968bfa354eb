"""PostgreSQL tier: the system of record, over a psycopg 3 connection pool."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg
import psycopg_pool
from psycopg.types.json import set_json_loads

from ..errors import InvalidInput, StoreUnavailable
from ..policy import validation as check
from ..policy.expiry import Clock, ExpiryPolicy, utc_now
from . import _sql

logger = logging.getLogger(__name__)

Key = tuple[str, int, str]


@dataclass(frozen=True)
class WriteOutcome:
    """What a write did: the row id it touched and what get_latest returns for its key right after."""

    id: int | None
    key: Key
    latest: dict[str, Any] | None
    changed: bool
    #: The writing transaction's id: the relay spares an entry this very write stored.
    txid: str | None = None


@dataclass(frozen=True)
class SweepReport:
    """What one sweep() pass changed."""

    expired: int
    reclaimed: int
    deleted: int
    groups: int
    outbox_pruned: int = 0


#: libpq settings that bound a silent (blackholed) PostgreSQL to about 5 s per call.
TCP_TIMEOUTS = {"tcp_user_timeout": 5000, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 1,
                "keepalives_count": 3}


class PostgresStore:
    """The seed's operations over a pool: same names, arguments and return shapes, none of its defects."""

    def __init__(
        self,
        dsn: str,
        *,
        policy: ExpiryPolicy | None = None,
        clock: Clock = utc_now,
        limits: check.Limits = check.DEFAULT_LIMITS,
        retention: int = 20_000,
        generating_timeout: timedelta = timedelta(minutes=30),
        outbox_retention: timedelta = timedelta(hours=24),
        min_size: int = 1,
        max_size: int = 10,
        pool_timeout: float = 3.0,
        connect_timeout: int = 3,
        open: bool = True,
    ) -> None:
        self.dsn = dsn
        self.policy = policy or ExpiryPolicy()
        self.clock = clock
        self.limits = limits
        self.retention = check.positive_int("retention", retention, check.BIGINT_MAX)
        if not isinstance(generating_timeout, timedelta) or generating_timeout <= timedelta(0):
            raise InvalidInput("generating_timeout", "expected a positive timedelta")
        self.generating_timeout = generating_timeout
        self.outbox_retention = outbox_retention
        self.pool_timeout = pool_timeout
        self._pool = _Pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=pool_timeout,
            kwargs={
                "autocommit": True,
                "connect_timeout": connect_timeout,
                # A blackholed server must fail a call in seconds, not after the kernel's ~15 min of retries.
                **TCP_TIMEOUTS,
                # Render timestamps in the venues' zone, as the old service's sessions did.
                "options": f"-c TimeZone={self.policy.zone}",
            },
            configure=_configure,
            name="tiered_cache",
            open=False,
        )
        if open:
            self._pool.open(wait=False)

    # -- plumbing -------------------------------------------------------------------------------

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; driver failures become StoreUnavailable naming the cause."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg_pool.PoolTimeout as exc:
            raise StoreUnavailable(f"no PostgreSQL connection after {self.pool_timeout:.2f} sec: {exc}") from exc
        except psycopg.OperationalError as exc:
            if exc.sqlstate in _RETRYABLE:  # deadlock or serialization failure: rolled back, safe to run again
                raise _Conflict(f"PostgreSQL refused the statement: {type(exc).__name__}: {exc}") from exc
            if exc.sqlstate is not None and not exc.sqlstate.startswith(("08", "57P")):
                # A statement error (timeout, lock not available): it rolled back, the link is fine.
                raise StoreUnavailable(f"PostgreSQL refused the statement: {type(exc).__name__}: {exc}") from exc
            # One outage breaks every idle connection alike; closing them is local and instant.
            self._pool.drain()
            raise _BrokenConnection(f"PostgreSQL failed: {exc}", maybe_committed=True) from exc
        except psycopg.Error as exc:  # an autocommit statement that errors has rolled back
            raise StoreUnavailable(f"PostgreSQL refused the statement: {type(exc).__name__}: {exc}") from exc

    def _read(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run a read; one retry on a fresh connection if a pooled one broke (it may predate a restart)."""
        try:
            try:
                with self._conn() as conn:
                    return conn.execute(sql, params, prepare=True).fetchall()
            except _BrokenConnection:
                with self._conn() as conn:
                    return conn.execute(sql, params, prepare=True).fetchall()
        except ValueError as exc:  # a stored value psycopg or orjson cannot load (e.g. a number beyond a double)
            raise StoreUnavailable(f"PostgreSQL returned a value that cannot be decoded: {exc}") from exc

    def _write(self, sql: str, params: dict[str, Any]) -> tuple[list[tuple[Any, ...]], int]:
        """Run one autocommit write; a deadlock or serialization failure (rolled back) is run again, twice at most."""
        return _retry_conflicts(lambda: self._write_once(sql, params))

    def _write_once(self, sql: str, params: dict[str, Any]) -> tuple[list[tuple[Any, ...]], int]:
        """Run one autocommit write on a connection just proven alive, so an outage never leaves its outcome unknown."""
        probe_failed = False
        try:
            with self._conn() as conn:
                try:
                    # A pooled connection may predate an outage: if this probe fails, the write was never sent.
                    conn.execute("")
                except psycopg.OperationalError:
                    probe_failed = True
                    raise
                cur = conn.execute(sql, params, prepare=True)
                return _answer(cur)
        except _BrokenConnection:
            if not probe_failed:
                raise  # the write itself may have reached the server: never send it twice
        with self._conn() as conn:  # the pool was drained: a fresh connection, or a clear failure
            return _answer(conn.execute(sql, params, prepare=True))

    # -- validation -----------------------------------------------------------------------------

    def _key(self, cache_type: object, site_id: object, target_id: object) -> dict[str, Any]:
        """Validated key parameters."""
        return {
            "cache_type": check.name("cache_type", cache_type, self.limits.max_name_length),
            "site_id": check.bigint("site_id", site_id),
            "target_id": check.name("target_id", target_id, self.limits.max_target_id_length),
        }

    def validate_key(self, cache_type: object, site_id: object, target_id: object) -> Key:
        """Check a key's three parts; the facade calls this before touching any tier."""
        p = self._key(cache_type, site_id, target_id)
        return p["cache_type"], p["site_id"], p["target_id"]

    def validate_many(self, cache_type: object, site_id: object, target_ids: object) -> tuple[str, int, list[str]]:
        """Check get_many's arguments."""
        ct = check.name("cache_type", cache_type, self.limits.max_name_length)
        return ct, check.bigint("site_id", site_id), check.target_ids(target_ids, self.limits)

    def validate_limit(self, limit: object) -> int:
        """Check get_history's limit."""
        return check.positive_int("limit", limit, self.limits.max_history)

    def prepare_write(
        self,
        cache_type: object,
        site_id: object,
        target_id: object,
        result_json: object,
        triggered_by: object = None,
        score: object = None,
        expires_at: object = None,
    ) -> dict[str, Any]:
        """Every write_cache argument checked and encoded, the expiry resolved: nothing left to fail but I/O."""
        params = self._key(cache_type, site_id, target_id)
        params["result_json"] = check.result_json(result_json, self.limits.max_payload_bytes)
        params["triggered_by"] = check.optional_name("triggered_by", triggered_by, self.limits.max_name_length)
        params["score"] = check.optional_score(score)
        given = check.optional_aware_datetime("expires_at", expires_at)
        params["expires_at"] = given if given is not None else self.policy.expires_at(params["cache_type"], self.clock())
        return params

    def prepare_finalize(
        self, cache_id: object, result_json: object, score: object = None, cache_type: object = None
    ) -> dict[str, Any]:
        """Every finalize_cache argument checked and encoded before any I/O."""
        return {
            "id": check.positive_int("cache_id", cache_id, check.BIGINT_MAX),
            "result_json": check.result_json(result_json, self.limits.max_payload_bytes),
            "score": check.optional_score(score),
            "cache_type": check.optional_name("cache_type", cache_type, self.limits.max_name_length),
        }

    # -- reads ----------------------------------------------------------------------------------

    def get_latest(self, cache_type: str, site_id: int, target_id: str) -> dict[str, Any] | None:
        """The newest servable row of a key, or None; a newer 'generating' row does not hide it."""
        rows = self._read(_sql.GET_LATEST, self._key(cache_type, site_id, target_id))
        return _sql.row_dict(_sql.LATEST_COLUMNS, rows[0]) if rows else None

    def get_history(self, cache_type: str, site_id: int, target_id: str, limit: int = 2) -> list[dict[str, Any]]:
        """The newest `limit` rows of a key, any status, newest first."""
        params = self._key(cache_type, site_id, target_id)
        params["limit"] = self.validate_limit(limit)
        return [_sql.row_dict(_sql.HISTORY_COLUMNS, r) for r in self._read(_sql.GET_HISTORY, params)]

    def get_many(
        self, cache_type: str, site_id: int, target_ids: Sequence[str]
    ) -> dict[str, dict[str, Any] | None]:
        """get_latest for many targets of one venue in one query; every asked id is a key of the result."""
        ct, site, ids = self.validate_many(cache_type, site_id, target_ids)
        return self.fetch_many(ct, site, ids)

    def fetch_many(self, cache_type: str, site_id: int, target_ids: list[str]) -> dict[str, dict[str, Any] | None]:
        """get_many on already-validated arguments (the facade's miss path)."""
        found: dict[str, dict[str, Any] | None] = dict.fromkeys(target_ids)
        if not target_ids:
            return found
        params = {"cache_type": cache_type, "site_id": site_id, "target_ids": target_ids}
        for row in self._read(_sql.GET_MANY, params):
            found[row[3]] = _sql.row_dict(_sql.LATEST_COLUMNS, row)
        return found

    def key_of(self, cache_id: int) -> tuple[Key, str | None] | None:
        """The key and status of a row, or None; a row's key never changes."""
        rows = self._read(_sql.KEY_OF, {"id": cache_id})
        if not rows:
            return None
        ct, site, target, status = rows[0]
        return (ct, site, target), status

    # -- writes ---------------------------------------------------------------------------------

    def write(self, params: dict[str, Any]) -> WriteOutcome:
        """Insert a valid row from prepare_write() params; also returns what get_latest now serves."""
        rows, _ = self._write(_sql.WRITE, params)
        mine = rows[0]
        key = (params["cache_type"], params["site_id"], params["target_id"])
        return WriteOutcome(mine[0], key, _sql.pick_servable(rows), True, mine[-1])

    def write_cache(
        self,
        cache_type: str,
        site_id: int,
        target_id: str,
        result_json: dict[str, Any],
        triggered_by: str | None = None,
        score: int | None = None,
        expires_at: datetime | None = None,
    ) -> int:
        """Insert a 'valid' row (expiry from the policy unless given) and return its id."""
        params = self.prepare_write(cache_type, site_id, target_id, result_json, triggered_by, score, expires_at)
        return self.write(params).id  # type: ignore[return-value]

    def set_generating(self, cache_type: str, site_id: int, target_id: str, triggered_by: str | None = None) -> int:
        """Insert a 'generating' placeholder; readers keep getting the previous valid result."""
        params = self._key(cache_type, site_id, target_id)
        params["triggered_by"] = self.prepare_triggered_by(triggered_by)
        return self.insert_generating(params)

    def prepare_triggered_by(self, triggered_by: object) -> str | None:
        """Check set_generating's triggered_by."""
        return check.optional_name("triggered_by", triggered_by, self.limits.max_name_length)

    def insert_generating(self, params: dict[str, Any]) -> int:
        """set_generating on validated params."""
        return self._write(_sql.SET_GENERATING, params)[0][0][0]

    def resolve_finalize(self, params: dict[str, Any]) -> tuple[Key, str | None] | None:
        """Look up the row being finalized and fill in its key and policy expiry; None if it does not exist."""
        found = self.key_of(params["id"])
        if found is None:
            return None
        (ct, site, target), status = found
        if params["cache_type"] is not None and params["cache_type"] != ct:
            raise InvalidInput("cache_type", f"row {params['id']} is of type {ct!r}, not {params['cache_type']!r}")
        params.update(cache_type=ct, site_id=site, target_id=target)
        params["expires_at"] = self.policy.expires_at(ct, self.clock())
        return (ct, site, target), status

    def finalize(self, params: dict[str, Any]) -> WriteOutcome:
        """Turn a 'generating' row valid (params from resolve_finalize); changed is False if it was not generating."""
        rows, _ = self._write(_sql.FINALIZE, params)
        key = (params["cache_type"], params["site_id"], params["target_id"])
        if not rows:
            logger.warning("finalize_cache: row %s is no longer 'generating'; nothing changed", params["id"])
            return WriteOutcome(params["id"], key, None, False)
        return WriteOutcome(params["id"], key, _sql.pick_servable(rows), True, rows[0][-1])

    def finalize_cache(
        self, cache_id: int, result_json: dict[str, Any], score: int | None = None, cache_type: str | None = None
    ) -> bool:
        """Fill a 'generating' row with its result and the expiry of its own type; True if it did."""
        params = self.prepare_finalize(cache_id, result_json, score, cache_type)
        if self.resolve_finalize(params) is None:
            logger.warning("finalize_cache: row %s does not exist", params["id"])
            return False
        return self.finalize(params).changed

    def invalidate(self, cache_type: str, site_id: int, target_id: str) -> int:
        """Mark a key's valid rows 'invalidated'; returns how many."""
        return self.invalidate_key(self._key(cache_type, site_id, target_id))

    def invalidate_key(self, params: dict[str, Any]) -> int:
        """invalidate on validated params."""
        return self.invalidate_outcome(params).id or 0

    def invalidate_outcome(self, params: dict[str, Any]) -> WriteOutcome:
        """invalidate, as a WriteOutcome whose id is the count of rows invalidated."""
        (count, txid), = self._write(_sql.INVALIDATE, params)[0]
        return WriteOutcome(count, (params["cache_type"], params["site_id"], params["target_id"]), None, True, txid)

    def invalidate_site(self, site_id: int, cache_type: str | None = None) -> int:
        """Mark every valid row of a venue (optionally of one type) 'invalidated'; returns how many."""
        return sum(self.invalidate_site_keys(site_id, cache_type).values())

    def site_params(self, site_id: object, cache_type: object = None) -> dict[str, Any]:
        """Check invalidate_site's arguments."""
        return {
            "site_id": check.bigint("site_id", site_id),
            "cache_type": check.optional_name("cache_type", cache_type, self.limits.max_name_length),
        }

    def invalidate_site_keys(
        self, site_id: object, cache_type: object = None, *, before_commit: Callable[[list[Key]], None] | None = None
    ) -> dict[Key, int]:
        """invalidate_site, returning each key that was valid when it ran and how many rows it changed there.

        before_commit gets those keys while the transaction still holds their rows (the facade leases them).
        """
        params = self.site_params(site_id, cache_type)
        return _retry_conflicts(lambda: self._invalidate_site_once(params, before_commit))

    def _invalidate_site_once(
        self, params: dict[str, Any], before_commit: Callable[[list[Key]], None] | None
    ) -> dict[Key, int]:
        """One try of invalidate_site_keys, in a transaction."""
        site = params["site_id"]
        probe_failed = False
        try:
            with self._conn() as conn:
                try:
                    conn.execute("")  # as in _write: a failed probe means nothing was sent
                except psycopg.OperationalError:
                    probe_failed = True
                    raise
                with conn.transaction():
                    rows = conn.execute(_sql.INVALIDATE_SITE, params, prepare=True).fetchall()
                    changed = {(ct, site, target): n for ct, target, n in rows}
                    if before_commit is not None:
                        before_commit(list(changed))
                return changed
        except _BrokenConnection:
            if not probe_failed:
                raise
        return self._invalidate_site_once(params, before_commit)

    # -- maintenance ----------------------------------------------------------------------------

    def sweep(self, *, batch: int = 5000, max_groups: int = 1000) -> SweepReport:
        """Expire rows, reclaim abandoned placeholders, apply retention to groups written since, bound the outbox."""
        expired = self._drain(_sql.SWEEP_EXPIRED, {"batch": batch})
        reclaimed = self._drain(_sql.SWEEP_GENERATING, {"batch": batch, "timeout": self.generating_timeout})
        groups, _ = self._write(_sql.CLAIM_DIRTY_GROUPS, {"groups": max_groups})
        deleted = 0
        for ct, site in groups:
            params = {
                "cache_type": ct,
                "site_id": site,
                "keep": self.retention,
                "generating_timeout": self.generating_timeout,
                "batch": batch,
            }
            deleted += self._drain(_sql.RETENTION, params)
        pruned = self._drain(_sql.PRUNE_OUTBOX, {"batch": batch, "age": self.outbox_retention})
        if pruned:
            logger.warning("sweep: pruned %d outbox rows older than %s: is a relay running?", pruned, self.outbox_retention)
        return SweepReport(expired, reclaimed, deleted, len(groups), pruned)

    def _drain(self, sql: str, params: dict[str, Any]) -> int:
        """Repeat a batched statement until a batch comes back short."""
        total = 0
        while True:
            n = self._write(sql, params)[1]
            total += n
            if n < params["batch"]:
                return total

    def ping(self) -> None:
        """Raise StoreUnavailable unless PostgreSQL answers."""
        self._read("SELECT 1", {})

    def close(self) -> None:
        """Close the pool; idempotent."""
        self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _answer(cur: psycopg.Cursor[Any]) -> tuple[list[tuple[Any, ...]], int]:
    """A committed write's rows and count; failing to decode them does not undo the commit."""
    try:
        return (cur.fetchall() if cur.description else []), cur.rowcount
    except (psycopg.Error, ValueError) as exc:
        raise StoreUnavailable(f"the write committed but its answer could not be read: {exc}", maybe_committed=True) from exc


_RETRYABLE = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure


class _Conflict(StoreUnavailable):
    """The statement lost a deadlock or serialization race and was rolled back: running it again is safe."""


def _retry_conflicts(run: Callable[[], Any], attempts: int = 3) -> Any:
    """Run a write again when PostgreSQL rolled it back to break a deadlock (as its manual advises)."""
    for attempt in range(1, attempts + 1):
        try:
            return run()
        except _Conflict:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


class _BrokenConnection(StoreUnavailable):
    """A pooled connection failed mid-use; worth one retry on a fresh one (a pool timeout is not)."""


def _configure(conn: psycopg.Connection[Any]) -> None:
    """Decode jsonb with orjson: the same decoder the Redis tier uses, and faster."""
    set_json_loads(orjson.loads, conn)
