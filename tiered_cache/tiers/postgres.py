"""PostgreSQL tier, the old import path: the generated sync store (tiered_cache/_sync/store.py) and its shared results."""

from .._sync.store import PostgresStore
from ._store_shared import TCP_TIMEOUTS, Key, SweepReport, WriteOutcome

__all__ = ["TCP_TIMEOUTS", "Key", "PostgresStore", "SweepReport", "WriteOutcome"]
