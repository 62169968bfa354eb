"""The Redis front tier's old import path: the sync tier generated from tiered_cache/_async/redis_tier.py.

What the tier does, and how it answers each Redis failure, is told in that module; its pure parts (the
CONTENDED sentinel, RedisStats, the Lua scripts) live in tiers/_redis_shared.py and tiers/lua_scripts.py.
"""

from __future__ import annotations

from .._sync.redis_tier import RedisTier
from .._sync.runwatch import RunWatch, drop_namespace
from ._redis_shared import CONTENDED, RedisStats

__all__ = ["CONTENDED", "RedisStats", "RedisTier", "RunWatch", "drop_namespace"]
