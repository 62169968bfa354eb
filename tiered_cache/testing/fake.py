"""An in-memory Redis (fakeredis) for tests that need no redis-server, checked up front to run the tier's Lua."""

from __future__ import annotations

import importlib.util
from typing import Any

import redis

from ..errors import ConfigurationError

_HINT = "pip install 'tiered_cache[testing]' (fakeredis[lua])"


def fake_redis_client(server: Any = None) -> redis.Redis:
    """A fakeredis.FakeRedis on `server` (a new, empty FakeServer when None); share a server to share the data."""
    try:
        import fakeredis
    except ImportError as exc:
        raise ConfigurationError(f"fake Redis: fakeredis is not installed; {_HINT}") from exc
    # Without lupa fakeredis answers EVAL/EVALSHA with an error at the first fill: say so before any test runs.
    if importlib.util.find_spec("lupa") is None:
        raise ConfigurationError(f"fake Redis: the tier's fills and kills are Lua scripts and lupa is missing; {_HINT}")
    return fakeredis.FakeRedis(server=server if server is not None else fakeredis.FakeServer())

