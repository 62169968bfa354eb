"""tiered_cache: a read-through cache for AI results, near cache -> Redis -> PostgreSQL."""

from ._async.client import async_redis_client
from ._async.facade import AsyncTieredCache
from ._async.store import AsyncPostgresStore
from .errors import (
    Closed,
    ConfigurationError,
    GenerationFailed,
    GenerationTimeout,
    InvalidInput,
    MigrationError,
    StoreUnavailable,
    TieredCacheError,
)
from .facade import TieredCache, redis_client
from .migrate import migrate
from .policy.expiry import DEFAULT_EXPIRY_DAYS, ExpiryPolicy
from .policy.validation import Limits
from .tiers.postgres import PostgresStore, SweepReport

__all__ = [
    "AsyncPostgresStore",
    "AsyncTieredCache",
    "DEFAULT_EXPIRY_DAYS",
    "Closed",
    "ConfigurationError",
    "ExpiryPolicy",
    "GenerationFailed",
    "GenerationTimeout",
    "InvalidInput",
    "Limits",
    "MigrationError",
    "PostgresStore",
    "StoreUnavailable",
    "SweepReport",
    "TieredCache",
    "TieredCacheError",
    "async_redis_client",
    "migrate",
    "redis_client",
]
