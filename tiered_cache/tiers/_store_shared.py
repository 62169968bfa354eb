"""What the sync and the async PostgreSQL store share, defined once so isinstance and except work across both.

Results (WriteOutcome, SweepReport), the session settings (TCP_TIMEOUTS, session_options), the failure
classes (_Conflict, _BrokenConnection) and psycopg_pool's capped reconnection backoff do no I/O, and
heard_while_idle only polls a socket (nothing is sent or read); the stores themselves are
tiered_cache/_async/store.py and pg_pool.py and their generated twins in _sync/.
"""

from __future__ import annotations

import logging
import os
import re
import select
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..errors import ConfigurationError, StoreUnavailable

logger = logging.getLogger("tiered_cache.tiers._pg_pool")  # the name it has always logged under

T = TypeVar("T")
Rows = list[tuple[Any, ...]]
Key = tuple[str, int, str]

#: What run_write runs on a connection: a coroutine function in the async store, a function in the sync one.
AWork = Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]
Work = Callable[[psycopg.Connection[Any]], T]
#: invalidate_site_keys' hook, run while the transaction holds the keys' rows (awaited in the async store).
ABeforeCommit = Callable[[list[Key]], Awaitable[None]]
BeforeCommit = Callable[[list[Key]], None]


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

#: Pools inherited across fork(): kept referenced, so the child never finalizes them (see _after_fork_in_child).
INHERITED: list[Any] = []

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


RETRYABLE = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure
#: How many times a write PostgreSQL rolled back to break a deadlock is tried (as its manual advises).
CONFLICT_ATTEMPTS = 3


class _Conflict(StoreUnavailable):
    """The statement lost a deadlock or serialization race and was rolled back: running it again is safe."""


class _BrokenConnection(StoreUnavailable):
    """A pooled connection failed mid-use; worth one retry on a fresh one (a pool timeout is not)."""


def heard_while_idle(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """True if the socket of an idle session is readable: the server said something, closed it, or it was reset.

    A session in the pool has read every answer it asked for, so in steady state there is nothing to read.
    A restart, pg_terminate_backend or idle_session_timeout sends a FATAL notice and closes (EOF); a reset,
    or TCP keepalives finding the peer gone (TCP_TIMEOUTS: about 8 s), leave an error: each makes the socket
    readable and stays so until libpq reads it. A poll with no wait: nothing is sent or read.
    """
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:  # libpq has no socket any more: certainly broken
        return True
    if _poll is None:  # pragma: no cover - no poll() (Windows): select() is limited to small descriptors there too
        return bool(select.select([fd], [], [], 0)[0])
    poller = _poll()
    poller.register(fd, select.POLLIN)  # POLLERR and POLLHUP are reported whether asked for or not
    return bool(poller.poll(0))


_poll = getattr(select, "poll", None)


CappedBackoff: Any = None
try:  # private API, checked here: without it the pool still works, it only recovers more slowly
    from psycopg_pool.base import AttemptWithBackoff as _Attempt

    class _CappedBackoff(_Attempt):
        """Reconnect after 0.1 s, doubling to at most 0.5 s: a restarted PostgreSQL is used within half a second."""

        INITIAL_DELAY = 0.1
        MAX_DELAY = 0.5

        def update_delay(self, now: float) -> None:
            super().update_delay(now)
            self.delay = min(self.delay, self.MAX_DELAY)

    CappedBackoff = _CappedBackoff
except (ImportError, AttributeError):  # pragma: no cover - a psycopg_pool without that internal
    pass
