"""The Redis tier's pure parts shared by the sync and async tiers: its sentinel, counters and cadences."""

from __future__ import annotations

from dataclasses import dataclass

from ..contracts import _Sentinel

RETRY_EVERY = 0.005  # a kill answered BUSY (or short of a pooled connection) is tried again this often
CHUNK = 500  # owed kills per pipeline, so one drain never holds a connection for long
ANSWERED_CADENCE = 0.02  # Redis answered (BUSY, READONLY, ...): retry owed kills on this fixed cadence
OUTAGE_BACKOFF = 1.0  # no answer: back off from ANSWERED_CADENCE up to this
#: The owed set's only key once it overflowed: the whole namespace is to be dropped.
NAMESPACE = "*"
CLOSE_JOIN = 1.0  # close() waits this long at most for the drainer to stop

#: lease_for_write displaced another writer's lease: kill after the commit, store nothing.
CONTENDED = _Sentinel("CONTENDED")


@dataclass
class RedisStats:
    """Counters of the front tier (approximate under threads: plain increments)."""

    hits: int = 0
    misses: int = 0
    fills: int = 0
    fills_refused: int = 0
    writes_through: int = 0
    kills: int = 0
    errors: int = 0
    skipped: int = 0
    pending_kills: int = 0
    saturated: int = 0  # calls that found the local pool empty
    refusals: int = 0  # times Redis was found refusing writes (or everything)
    owed_overflows: int = 0  # times the owed kills passed max_owed (a namespace drop owed instead)
