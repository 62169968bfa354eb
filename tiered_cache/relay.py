"""The relay: applies PostgreSQL's change outbox to Redis, so writes made around TieredCache reach the cache too."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from . import _fork
from ._sync_client import relay_tier
from .policy.failures import REDIS_FAILURES
from .policy.keys import KeySpace
from .tiers.postgres import TCP_TIMEOUTS
from .tiers.redis import RedisTier

logger = logging.getLogger(__name__)

CHANNEL = "tiered_cache_changes"

# SKIP LOCKED: several relays split the backlog instead of queueing behind each other.
_CLAIM = """
SELECT seq, cache_type, site_id, target_id, txid::text,
       EXTRACT(EPOCH FROM clock_timestamp() - changed_at)::float8
FROM biz.ai_cache_changes ORDER BY seq LIMIT %(batch)s FOR UPDATE SKIP LOCKED
"""
_PRUNE = "DELETE FROM biz.ai_cache_changes WHERE seq = ANY(%(seqs)s)"
_RECORD = """
INSERT INTO biz.ai_cache_relay_state AS s (relay, last_seq, applied, updated_at)
VALUES (%(relay)s, %(last)s, %(n)s, now())
ON CONFLICT (relay) DO UPDATE
SET last_seq = GREATEST(s.last_seq, EXCLUDED.last_seq), applied = s.applied + EXCLUDED.applied, updated_at = now()
"""


@dataclass
class RelayStats:
    """What the relay did since it started."""

    batches: int = 0
    changes: int = 0
    keys: int = 0
    spared: int = 0  # keys whose entry the changing transaction had stored itself
    flushes: int = 0
    errors: int = 0
    last_seq: int = 0


class Relay:
    """Claims outbox rows, kills their keys in Redis in one pipeline, then deletes the rows: nothing is lost.

    A row leaves the outbox only in the transaction that follows Redis confirming the kill, so a relay,
    Redis or PostgreSQL outage at any point leaves the row to be applied again (kills are idempotent).
    Reading whatever rows remain, rather than rows above a watermark, also covers a transaction that
    took a lower sequence number but committed after a higher one.
    """

    def __init__(
        self,
        dsn: str,
        redis_tier: RedisTier,
        *,
        name: str = "default",
        batch: int = 1000,
        poll_interval: float = 0.5,
        connect_timeout: int = 3,
    ) -> None:
        self.dsn = dsn
        self.redis = relay_tier(redis_tier)  # this thread's sync tier (an async cache's relay gets one of its own)
        self.keys: KeySpace = redis_tier.keys
        self.name = name
        self.batch = batch
        self.poll_interval = poll_interval
        self.connect_timeout = connect_timeout
        self.stats = RelayStats()
        #: Told each batch's commit-to-Redis delay in seconds (tiered_cache.metrics sets it).
        self.on_delay: Callable[[float], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._listen: psycopg.Connection[Any] | None = None

    # -- one batch ------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout, **TCP_TIMEOUTS)
        return self._conn

    def apply_once(self) -> int:
        """Apply one batch of the outbox; returns how many change rows it consumed (0 when caught up)."""
        conn = self._connect()
        with conn.transaction():
            rows = conn.execute(_CLAIM, {"batch": self.batch}).fetchall()
            claimed = time.monotonic()
            if not rows:
                return 0
            if any(row[1] is None for row in rows):
                self.redis.flush_namespace()
                self.stats.flushes += 1
            # Per key, the transactions that changed it; one alone may have stored its own new state.
            changes: dict[tuple[str, int, str], set[str]] = {}
            for _, ct, site, target, txid, _ in rows:
                if ct is not None:
                    changes.setdefault((ct, site, target), set()).add(txid or "")
            if changes:
                keysets = [self.keys.keyset(*key) for key in changes]
                txids = [next(iter(t)) if len(t) == 1 else "" for t in changes.values()]
                results = self.redis.kill_or_raise(keysets, txids=txids)  # raises: the rows stay for the next try
                self.stats.spared += sum(1 for r in results if r == 0)
            if self.on_delay is not None:  # Redis has confirmed: the oldest change of the batch is visible now
                self.on_delay(max(row[5] for row in rows) + time.monotonic() - claimed)
            seqs = [row[0] for row in rows]
            conn.execute(_PRUNE, {"seqs": seqs})
            conn.execute(_RECORD, {"relay": self.name, "last": max(seqs), "n": len(seqs)})
        self.stats.batches += 1
        self.stats.changes += len(rows)
        self.stats.keys += len(changes)
        self.stats.last_seq = max(self.stats.last_seq, max(seqs))
        return len(rows)

    def catch_up(self) -> int:
        """Apply batches until the outbox is empty (of rows no other relay holds)."""
        total = 0
        while not self._stop.is_set():
            n = self.apply_once()
            total += n
            if n < self.batch:
                return total
        return total

    # -- the loop -------------------------------------------------------------------------------

    def _wait_for_notify(self, timeout: float) -> None:
        """Sleep until a NOTIFY or the poll interval: NOTIFY only wakes us, the table is read either way."""
        if self._listen is None or self._listen.closed:
            self._listen = psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout, **TCP_TIMEOUTS)
            self._listen.execute(f"LISTEN {CHANNEL}")
            return  # a fresh listener may have missed wake-ups: read the table now
        for _ in self._listen.notifies(timeout=timeout, stop_after=1):
            pass

    def run(self) -> None:
        """Apply changes until stop(); every failure backs off (up to 1 s) and resumes from the outbox."""
        backoff = 0.05
        while not self._stop.is_set():
            try:
                self.catch_up()
                backoff = 0.05
                self._wait_for_notify(self.poll_interval)
            except (psycopg.Error, *REDIS_FAILURES, OSError) as exc:
                self.stats.errors += 1
                logger.warning("relay %s: %s: %s (retrying in %.2f s)", self.name, type(exc).__name__, exc, backoff)
                self._close_connections()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)

    def start(self) -> Relay:
        """Run in a daemon thread (and again in a forked child, on connections of its own)."""
        self._thread = threading.Thread(target=self.run, name=f"tiered_cache-relay-{self.name}", daemon=True)
        self._thread.start()
        _fork.register(self)
        return self

    def _after_fork_in_child(self) -> None:
        """In a forked child: drop the parent's connections unclosed (closing sends Terminate on its sockets), run anew."""
        running = self._thread is not None and not self._stop.is_set()
        self._conn = self._listen = None  # psycopg does not finish a connection it finds in another process
        self._stop = threading.Event()
        self._thread = None
        if running:
            self.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and close its connections."""
        self._stop.set()  # the loop sees it within one poll interval
        if self._thread is not None:
            self._thread.join(timeout)
        self._close_connections()

    def _close_connections(self) -> None:
        for conn in (self._conn, self._listen):
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # closing a broken connection must not mask the original failure
                    pass
        self._conn = self._listen = None

    def lag(self) -> tuple[int, float]:
        """(rows waiting, age in seconds of the oldest): what an operator watches."""
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout) as conn:
            n, age = conn.execute(
                "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(changed_at)), 0) "
                "FROM biz.ai_cache_changes"
            ).fetchone()  # type: ignore[misc]
        return int(n), float(age)


def run_forever(relay: Relay) -> None:
    """`tiered-cache relay`: run in the foreground until interrupted."""
    relay.start()
    try:
        while relay._thread is not None and relay._thread.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        relay.stop()
