"""Readiness for probes: is each tier reachable, is the near tier coherent, is the relay keeping up, are kills owed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

OK, DEGRADED, DOWN = "ok", "degraded", "down"


@dataclass(frozen=True)
class Check:
    """One part's state and the figure that decided it; `detail` names an error's type, never a key."""

    status: str
    detail: str = ""
    seconds: float | None = None
    count: int | None = None


@dataclass(frozen=True)
class Health:
    """ok: every tier serves; degraded: answers still right, but slower (from PostgreSQL); down: no PostgreSQL."""

    status: str
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Ready for traffic: PostgreSQL answers (a degraded cache still serves correct answers)."""
        return self.status != DOWN

    def as_dict(self) -> dict[str, Any]:
        """For a JSON readiness endpoint."""
        return {
            "status": self.status,
            "checks": {
                name: {k: v for k, v in vars(c).items() if v not in (None, "")} for name, c in self.checks.items()
            },
        }


def health(cache: Any, *, max_relay_lag: float = 5.0) -> Health:
    """Probe every part of `cache` once; costs one PostgreSQL round trip, one Redis PING and, with a relay, one query."""
    relay = getattr(cache, "relay", None)
    lag = _lag(relay) if relay is not None else None
    return _verdict(cache, _timed(cache.store.ping), _timed(cache.redis.client.ping), lag, max_relay_lag)


async def ahealth(cache: Any, *, max_relay_lag: float = 5.0) -> Health:
    """health() for AsyncTieredCache: the probes are awaited, the relay's lag query runs in a worker thread."""
    import asyncio

    relay = getattr(cache, "relay", None)
    lag = await asyncio.to_thread(_lag, relay) if relay is not None else None
    return _verdict(cache, await _atimed(cache.store.ping), await _atimed(cache.redis.client.ping), lag, max_relay_lag)


def _lag(relay: Any) -> Any:
    """The relay's (backlog, age), or the exception that prevented knowing it."""
    try:
        return relay.lag()
    except Exception as exc:  # the lag query failed: the relay cannot be vouched for
        return exc


def _verdict(cache: Any, pg: Check, ping: Check, lag: Any, max_relay_lag: float) -> Health:
    """Every part's check and the overall answer, from probes already made."""
    checks: dict[str, Check] = {"postgres": pg}
    redis_tier = cache.redis
    state = redis_tier.breaker.state
    if ping.status == OK and state != "closed":
        ping = Check(DEGRADED, f"breaker {state}", ping.seconds)
    checks["redis"] = ping
    owed = redis_tier.pending
    checks["owed_kills"] = Check(OK if owed == 0 else DEGRADED, count=owed)
    listener = getattr(cache, "listener", None)
    if listener is not None:
        subscribed = listener.subscribed.is_set()
        checks["listener"] = Check(OK if subscribed else DEGRADED, "" if subscribed else "not subscribed: near tier off")
    if isinstance(lag, Exception):
        checks["relay"] = Check(DEGRADED, type(lag).__name__)
    elif lag is not None:
        backlog, age = lag
        late = age > max_relay_lag
        checks["relay"] = Check(DEGRADED if late else OK, f"oldest change over {max_relay_lag:g} s" if late else "",
                                round(age, 3), backlog)
    if checks["postgres"].status != OK:
        status = DOWN
    elif any(c.status != OK for c in checks.values()):
        status = DEGRADED
    else:
        status = OK
    return Health(status, checks)


async def _atimed(probe: Any) -> Check:
    """_timed for a coroutine probe."""
    start = time.perf_counter()
    try:
        await probe()
    except Exception as exc:
        return Check(DOWN, type(exc).__name__, round(time.perf_counter() - start, 4))
    return Check(OK, seconds=round(time.perf_counter() - start, 4))


def _timed(probe: Any) -> Check:
    """Run a probe: ok with its round trip, or down with the error's type (its text may carry a DSN)."""
    start = time.perf_counter()
    try:
        probe()
    except Exception as exc:
        return Check(DOWN, type(exc).__name__, round(time.perf_counter() - start, 4))
    return Check(OK, seconds=round(time.perf_counter() - start, 4))
