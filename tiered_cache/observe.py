"""Logs and traces for operators: one structured record per notable event, one span per public call.

Events go to the logger ``tiered_cache.events`` with the message for humans and, in ``extra``, fields
for machines that keep their names across releases: ``event`` always, then whichever of ``tier``,
``namespace``, ``count``, ``seconds``, ``threshold``, ``detector``, ``reason`` the event has. Each
condition logs once when it starts (WARNING) and once when it ends (INFO), however often it is seen in
between (an ``Episode``), so a healthy process logs nothing at INFO.

Spans come from ``opentelemetry.trace.get_tracer('tiered_cache')`` when opentelemetry-api is
importable (decided at import) and the application has installed a TracerProvider (looked for every
1000 calls until it has); otherwise ``span()`` returns one shared no-op object.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import _fork
from .errors import InvalidInput

events = logging.getLogger("tiered_cache.events")

#: Reads, then writes. The JSON twins of the reads are ops of their own: same tiers, different cost per call.
READS = ("get_latest", "get_many", "get_history", "get_latest_json", "get_many_json", "get_history_json")
WRITES = ("write_cache", "set_generating", "finalize_cache", "invalidate", "invalidate_site")
#: Public calls of TieredCache (and AsyncTieredCache): the only values of the `op` label and span names.
OPS = READS + WRITES

#: Where a call was answered: the three tiers, or "none" (rejected before I/O, nothing asked, unknown failure).
TIERS = ("near", "redis", "postgres", "none")


# -- events -------------------------------------------------------------------------------------


def _emit(level: int, event: str, message: str, *args: object, **fields: Any) -> None:
    """One record; fields with the value None are left out, so every present field means something."""
    if events.isEnabledFor(level):
        extra = {"event": event, **{k: v for k, v in fields.items() if v is not None}}
        events.log(level, message, *args, extra=extra)


def breaker_opened(namespace: str, failures: int) -> None:
    """Redis failed `failures` times in a row: calls skip it (reads go to PostgreSQL) until a probe succeeds."""
    _emit(logging.WARNING, "breaker_opened", "redis breaker opened after %d failures (namespace %s): reads bypass Redis",
          failures, namespace, tier="redis", namespace=namespace, count=failures)


def breaker_closed(namespace: str, seconds: float) -> None:
    """A probe succeeded: Redis serves again after `seconds` open."""
    _emit(logging.INFO, "breaker_closed", "redis breaker closed after %.1f s (namespace %s)",
          seconds, namespace, tier="redis", namespace=namespace, seconds=round(seconds, 3))


def redis_restarted(namespaces: Iterable[str], detector: str) -> None:
    """Redis came back as a new run (restart, failover): these namespaces were dropped so nothing old is served."""
    names = sorted(namespaces)
    _emit(logging.WARNING, "redis_restarted", "Redis restarted or failed over (seen by %s): namespaces %s dropped",
          detector, ",".join(names), tier="redis", namespace=",".join(names), count=len(names), detector=detector)


def near_flushed(namespace: str, reason: str) -> None:
    """The near tier was emptied: `reason` is 'gap' (a lost announcement), 'restart' or 'announced' (a flush)."""
    _emit(logging.INFO, "near_flushed", "near tier flushed (%s, namespace %s)",
          reason, namespace, tier="near", namespace=namespace, reason=reason)


def listener_lost(namespace: str, reason: str) -> None:
    """The change listener lost Redis: the near tier is off (reads go to Redis) until it resubscribes."""
    _emit(logging.WARNING, "listener_lost", "coherence listener lost Redis (%s, namespace %s): near tier off",
          reason, namespace, tier="near", namespace=namespace, reason=reason)


def listener_resubscribed(namespace: str, seconds: float) -> None:
    """The listener is subscribed again after `seconds`: the near tier serves again."""
    _emit(logging.INFO, "listener_resubscribed", "coherence listener resubscribed after %.1f s (namespace %s)",
          seconds, namespace, tier="near", namespace=namespace, seconds=round(seconds, 3))


def kills_owed(namespace: str, count: int) -> None:
    """A kill could not reach Redis: this process keeps off Redis until every owed kill lands."""
    _emit(logging.WARNING, "kills_owed", "%d kill(s) owed to Redis (namespace %s): this process reads PostgreSQL meanwhile",
          count, namespace, tier="redis", namespace=namespace, count=count)


def kills_drained(namespace: str, count: int, seconds: float) -> None:
    """Every owed kill landed (`count` at the peak) after `seconds`."""
    _emit(logging.INFO, "kills_drained", "owed kills drained after %.1f s (peak %d, namespace %s)",
          seconds, count, namespace, tier="redis", namespace=namespace, count=count, seconds=round(seconds, 3))


def relay_lagging(seconds: float, backlog: int, threshold: float) -> None:
    """The oldest change waiting for the relay is older than `threshold`: writes made around the cache are late in Redis."""
    _emit(logging.WARNING, "relay_lagging", "relay lag %.3g s > %.3g s (%d changes waiting)",
          seconds, threshold, backlog, tier="redis", seconds=round(seconds, 3), count=backlog, threshold=threshold)


def relay_caught_up(seconds: float, backlog: int, threshold: float) -> None:
    """Relay lag is back under half the threshold."""
    _emit(logging.INFO, "relay_caught_up", "relay caught up: lag %.3g s (%d changes waiting)",
          seconds, backlog, tier="redis", seconds=round(seconds, 3), count=backlog, threshold=threshold)


class Episode:
    """A condition that is on or off: begin() is True only for the first sighting, end() gives its duration once."""

    __slots__ = ("since", "peak", "_lock", "_clock", "__weakref__")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.since: float | None = None
        self.peak = 0
        self._lock = threading.Lock()
        self._clock = clock
        _fork.register(self)

    def begin(self, count: int = 1) -> bool:
        """Note a sighting (with a size, e.g. kills owed); True if the condition was off until now."""
        with self._lock:
            self.peak = max(self.peak, count) if self.since is not None else count
            if self.since is None:
                self.since = self._clock()
                return True
            return False

    def end(self) -> float | None:
        """The condition is over: its duration in seconds, or None if it was not on (no record to write)."""
        if self.since is None:  # the common case, without the lock
            return None
        with self._lock:
            since, self.since = self.since, None
        return None if since is None else self._clock() - since

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()


class LagWatch:
    """Relay lag against a threshold, with hysteresis: warns when over it, tells when back under half of it."""

    def __init__(self, threshold: float = 30.0) -> None:
        self.threshold = threshold
        self.lagging = False

    def update(self, seconds: float, backlog: int) -> None:
        """A fresh measure of the oldest waiting change's age and of the backlog."""
        if not self.lagging and seconds > self.threshold:
            self.lagging = True
            relay_lagging(seconds, backlog, self.threshold)
        elif self.lagging and seconds < self.threshold / 2:
            self.lagging = False
            relay_caught_up(seconds, backlog, self.threshold)


# -- tracing ------------------------------------------------------------------------------------

try:
    from opentelemetry import context as _context
    from opentelemetry import trace as _trace
    from opentelemetry.trace import Status as _Status
    from opentelemetry.trace import StatusCode as _StatusCode
except ImportError:  # the optional extra is not installed: span() is a no-op
    _trace = None  # type: ignore[assignment]

TRACING = _trace is not None

_NAMES = {op: f"tiered_cache.{op}" for op in OPS}


class _NoSpan:
    """What span() returns without opentelemetry-api: enter, exit and tier() do nothing."""

    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def tier(self, tier: str, result: str | None = None) -> None:
        """Nothing to record."""


_NO_SPAN = _NoSpan()


class _Span:
    """An OpenTelemetry span made current for the call; attributes are enums only, never a key or a site id."""

    __slots__ = ("_op", "_span", "_token")

    def __init__(self, op: str) -> None:
        self._op = op
        self._token: object = None

    def __enter__(self) -> _Span:
        span = self._span = _tracer.start_span(_NAMES[self._op], attributes={"tiered_cache.operation": self._op})
        # A span nobody records (no SDK, or sampled out) need not become the parent of the calls below.
        if span.is_recording():
            self._token = _context.attach(_trace.set_span_in_context(span))
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        span = self._span
        if self._token is not None:
            _context.detach(self._token)  # type: ignore[arg-type]
        if exc is not None and isinstance(exc, Exception) and span.is_recording():
            # The type only: an exception's text may name the key or the venue.
            span.set_attribute("error.type", typ.__qualname__)  # type: ignore[union-attr]
            span.set_status(_Status(_StatusCode.ERROR, typ.__name__))  # type: ignore[union-attr]
        span.end()

    def tier(self, tier: str, result: str | None = None) -> None:
        """Record which tier answered (and how: hit, miss, bypass...)."""
        self._span.set_attribute("tiered_cache.tier", tier)
        if result is not None:
            self._span.set_attribute("tiered_cache.result", result)


if TRACING:
    # A ProxyTracer: it follows a TracerProvider the application installs after this import.
    _tracer = _trace.get_tracer("tiered_cache")
_provider_set = False
_RECHECK = 1000  # calls between looks for a provider installed after import (a look costs an environ lookup)
_countdown = 1


def tracing() -> bool:
    """Would a span record? Only with opentelemetry-api and a TracerProvider installed (looked for every 1000 calls)."""
    global _countdown, _provider_set
    if _provider_set:
        return True
    if not TRACING:
        return False
    _countdown -= 1
    if _countdown > 0:
        return False
    _countdown = _RECHECK
    # Set once for good: OpenTelemetry allows one provider per process.
    _provider_set = not isinstance(_trace.get_tracer_provider(), _trace.ProxyTracerProvider)
    return _provider_set


def span(op: str) -> Any:
    """A context manager around one public call `op`; its tier() records the tier that answered."""
    if op not in _NAMES:
        raise InvalidInput("op", f"expected one of {', '.join(OPS)}")
    return _Span(op) if _provider_set or tracing() else _NO_SPAN
