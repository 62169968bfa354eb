"""The sync facade's import path: TieredCache is generated from tiered_cache/_async/facade.py."""

from ._sync.client import redis_client
from ._sync.facade import TieredCache

__all__ = ["TieredCache", "redis_client"]
