# Generated from tiered_cache/_async/store.py by tools/async_to_sync.py: do not edit; edit the source and run it again.
"""PostgreSQL tier: the system of record; sessions, retries and fork safety live in pg_pool."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg
import psycopg_pool

from ..errors import InvalidInput
from ..policy import validation as check
from ..policy.expiry import Clock, ExpiryPolicy, utc_now
from ..tiers import _sql
from ..tiers._store_shared import BeforeCommit, Key, Rows, SweepReport, WriteOutcome
from .pg_pool import Connections

logger = logging.getLogger("tiered_cache.tiers.postgres")  # the name it has always logged under
#: How old a group's exact count may get before sweep counts it again (what the estimate cannot see, it sees then).
RECOUNT_EVERY = timedelta(hours=1)


class PostgresStore:
    """The seed's operations over a pool: same names, arguments and return shapes, none of its defects.

    The DSN's own options survive, but its sessions always render in policy.zone, ISO style (see pg_pool).
    open=False connects on the first call instead of now (the async twin's pool can only open in a running
    loop: connect() opens it, a store built directly opens it on first use). After close() every call raises
    Closed, sending nothing; a forked child opens its own pool on first use. Timestamps datetime cannot hold read as
    _pg_timestamps says ('infinity' expiry: None); an expiry policy.zone cannot render is InvalidInput.
    """

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
        self._db = Connections(
            dsn,
            zone=self.policy.zone,
            min_size=min_size,
            max_size=max_size,
            timeout=pool_timeout,
            connect_timeout=connect_timeout,
            open=open,
        )

    @classmethod
    def connect(cls, dsn: str, **options: Any) -> PostgresStore:
        """A store whose pool is open (unless open=False): the one way to open an async pool, which needs a loop."""
        store = cls(dsn, **options)
        if options.get("open", True):
            store._db.open("connect")
        return store

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def _pool(self) -> psycopg_pool.ConnectionPool[Any]:
        """This process's psycopg pool (a forked child gets its own): for stats, tests and benchmarks."""
        return self._db.pool

    def _read(self, sql: str, params: dict[str, Any], op: str) -> Rows:
        """Run a read (op names the call in errors)."""
        return self._db.read(op, sql, params)

    def _write(self, sql: str, params: dict[str, Any], op: str) -> tuple[Rows, int]:
        """Run one autocommit write (one round trip; see pg_pool); its rows and row count."""
        return self._db.write(op, sql, params)

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
        given = check.optional_aware_datetime("expires_at", expires_at, self.policy.tzinfo)
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
        rows = self._read(_sql.GET_LATEST, self._key(cache_type, site_id, target_id), "get_latest")
        return _sql.row_dict(_sql.LATEST_COLUMNS, rows[0]) if rows else None

    def get_history(self, cache_type: str, site_id: int, target_id: str, limit: int = 2) -> list[dict[str, Any]]:
        """The newest `limit` rows of a key, any status, newest first."""
        params = self._key(cache_type, site_id, target_id)
        params["limit"] = self.validate_limit(limit)
        rows = self._read(_sql.GET_HISTORY, params, "get_history")
        return [_sql.row_dict(_sql.HISTORY_COLUMNS, r) for r in rows]

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
        for row in self._read(_sql.GET_MANY, params, "get_many"):
            found[row[3]] = _sql.row_dict(_sql.LATEST_COLUMNS, row)
        return found

    def key_of(self, cache_id: int) -> tuple[Key, str | None] | None:
        """The key and status of a row, or None; a row's key never changes."""
        rows = self._read(_sql.KEY_OF, {"id": cache_id}, "finalize_cache")
        if not rows:
            return None
        ct, site, target, status = rows[0]
        return (ct, site, target), status

    # -- writes ---------------------------------------------------------------------------------

    def write(self, params: dict[str, Any]) -> WriteOutcome:
        """Insert a valid row from prepare_write() params; also returns what get_latest now serves."""
        rows, _ = self._write(_sql.WRITE, params, "write_cache")
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
        """Insert a 'valid' row (expiry from the policy unless given) and return its id (the only thing sent back)."""
        params = self.prepare_write(cache_type, site_id, target_id, result_json, triggered_by, score, expires_at)
        rows, _ = self._write(_sql.WRITE_ID, params, "write_cache")
        return rows[0][0]

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
        rows, _ = self._write(_sql.SET_GENERATING, params, "set_generating")
        return rows[0][0]

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
        rows, _ = self._write(_sql.FINALIZE, params, "finalize_cache")
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
        outcome = self.finalize(params)
        return outcome.changed

    def invalidate(self, cache_type: str, site_id: int, target_id: str) -> int:
        """Mark a key's valid rows 'invalidated'; returns how many."""
        return self.invalidate_key(self._key(cache_type, site_id, target_id))

    def invalidate_key(self, params: dict[str, Any]) -> int:
        """invalidate on validated params."""
        outcome = self.invalidate_outcome(params)
        return outcome.id or 0

    def invalidate_outcome(self, params: dict[str, Any]) -> WriteOutcome:
        """invalidate, as a WriteOutcome whose id is the count of rows invalidated."""
        rows, _ = self._write(_sql.INVALIDATE, params, "invalidate")
        (count, txid), = rows
        return WriteOutcome(count, (params["cache_type"], params["site_id"], params["target_id"]), None, True, txid)

    def invalidate_site(self, site_id: int, cache_type: str | None = None) -> int:
        """Mark every valid row of a venue (optionally of one type) 'invalidated'; returns how many."""
        changed = self.invalidate_site_keys(site_id, cache_type)
        return sum(changed.values())

    def site_params(self, site_id: object, cache_type: object = None) -> dict[str, Any]:
        """Check invalidate_site's arguments."""
        return {
            "site_id": check.bigint("site_id", site_id),
            "cache_type": check.optional_name("cache_type", cache_type, self.limits.max_name_length),
        }

    def invalidate_site_keys(
        self, site_id: object, cache_type: object = None, *, before_commit: BeforeCommit | None = None
    ) -> dict[Key, int]:
        """invalidate_site, returning each key that was valid when it ran and how many rows it changed there.

        before_commit gets those keys while the transaction still holds their rows (the facade leases them).
        """
        params = self.site_params(site_id, cache_type)
        site = params["site_id"]

        def run(conn: psycopg.Connection[Any]) -> dict[Key, int]:
            with conn.transaction():
                cur = conn.execute(_sql.INVALIDATE_SITE, params, prepare=True)
                changed = {(ct, site, target): n for ct, target, n in cur.fetchall()}
                if before_commit is not None:
                    before_commit(list(changed))
            return changed

        return self._db.run_write("invalidate_site", run)

    # -- maintenance ----------------------------------------------------------------------------

    def sweep(self, *, batch: int = 5000, max_groups: int = 1000) -> SweepReport:
        """Expire rows, reclaim abandoned placeholders, apply retention to groups written since, bound the outbox."""
        expired = self._drain(_sql.SWEEP_EXPIRED, {"batch": batch})
        reclaimed = self._drain(_sql.SWEEP_GENERATING, {"batch": batch, "timeout": self.generating_timeout})
        groups, _ = self._write(_sql.CLAIM_DIRTY_GROUPS, {"groups": max_groups}, "sweep")
        deleted = 0
        for ct, site in groups:
            deleted += self._retain(ct, site, batch)
        pruned = self._drain(_sql.PRUNE_OUTBOX, {"batch": batch, "age": self.outbox_retention})
        if pruned:
            logger.warning("sweep: pruned %d outbox rows older than %s: is a relay running?", pruned, self.outbox_retention)
        return SweepReport(expired, reclaimed, deleted, len(groups), pruned)

    def _retain(self, cache_type: str, site_id: int, batch: int) -> int:
        """Trim one written group to `retention` once it may hold 10% more; until then only count what it gained.

        Finding the cutoff walks up to `retention` index entries, so trimming on every pass made sweep's cost
        per written row grow with group size; amortized over the slack (and an exact recount an hour) it stays flat.
        """
        params = {"cache_type": cache_type, "site_id": site_id, "keep": self.retention,
                  "limit": self.retention + self.retention // 10, "generating_timeout": self.generating_timeout,
                  "batch": batch, "recount": RECOUNT_EVERY}
        estimate, _ = self._write(_sql.RETENTION_ESTIMATE, params, "sweep")
        if estimate and estimate[0][0] <= params["limit"]:
            return 0
        deleted = self._drain(_sql.RETENTION, params)
        self._write(_sql.RETENTION_COUNT, params, "sweep")
        return deleted

    def _drain(self, sql: str, params: dict[str, Any]) -> int:
        """Repeat a batched statement until a batch comes back short."""
        total = 0
        while True:
            _, n = self._write(sql, params, "sweep")
            total += n
            if n < params["batch"]:
                return total

    def ping(self) -> None:
        """Raise StoreUnavailable unless PostgreSQL answers."""
        self._read("SELECT 1", {}, "ping")

    @property
    def closed(self) -> bool:
        """True once close() has run: every call then raises Closed (the facade can refuse before leasing)."""
        return self._db.closed

    def close(self) -> None:
        """Close the pool; every later call raises Closed before any I/O. Idempotent."""
        self._db.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
