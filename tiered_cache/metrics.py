"""Prometheus metrics for TieredCache (the `metrics` extra): what each tier answers, how fast, and what it owes.

Two ways counts get in. Per call, the facade calls ``observe_call(op, tier, result, seconds)`` once per
public call: one dict lookup, one counter increment and one histogram observation. The tiers' own
counters (``cache.stats()``) are copied as deltas by ``sync()``: at scrape time through a collector in
single-process mode, and every ``interval`` seconds from a daemon thread in prometheus-client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported), where the scrape
happens in another process. Label values come only from fixed enums, so no site id or key can reach a
label. The tables below map known stats() names; a name they do not list is ignored.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from dataclasses import asdict
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import values as _values

from . import _fork
from ._deployment import watch_of
from .errors import ConfigurationError, InvalidInput
from .observe import OPS, READS, TIERS, WRITES, LagWatch

logger = logging.getLogger(__name__)

RESULTS = ("hit", "miss", "bypass", "ok", "error", "invalid")
GENERATION_RESULTS = ("started", "won", "joined", "waited", "timed_out", "failed", "taken_over")

_ALWAYS = (("postgres", "error"), ("none", "error"), ("none", "invalid"))
#: Every (op, tier, result) a call may report: near/redis answered ("hit"); PostgreSQL answered after a miss
#: ("miss") or because Redis was unusable ("bypass"); a write committed ("ok"); a finalize found nothing
#: to fill ("miss"); a get_many asked for nothing ("none", "ok"); the call raised.
CALLS = frozenset(
    [(op, t, r) for op in READS for t, r in (("near", "hit"), ("redis", "hit"), ("postgres", "miss"), ("postgres", "bypass"))]
    + [(op, "postgres", "ok") for op in WRITES]
    + [("finalize_cache", "postgres", "miss"), ("get_many", "none", "ok"), ("get_many_json", "none", "ok")]
    + [(op, t, r) for op in OPS for t, r in _ALWAYS]
)

#: 10 µs (a near hit) to 1 s (a PostgreSQL read behind a busy pool).
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: 1 ms (a NOTIFY-woken relay) to 2 min (a relay that was down).
RELAY_DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Counter families: attribute -> (name after the prefix, without _total; help; label names).
_COUNTERS = {
    "lookups": ("lookups", "Keys looked up in a cache tier, by result (get_many counts each key)", ("tier", "result")),
    "redis_errors": ("redis_errors", "Redis calls that failed (timeout, refused connection, error answer)", ()),
    "redis_skipped": ("redis_skipped", "Redis reads skipped because the breaker was open or kills were owed", ()),
    "fills": ("redis_fills", "Leased fills of Redis after a miss: stored, or refused (a change took the lease)",
              ("result",)),
    "writes_through": ("redis_writes_through", "Writes whose new state was stored in Redis right after the commit", ()),
    "kills": ("redis_kills", "Keys dropped from Redis after a change", ()),
    "breaker_trips": ("redis_breaker_trips", "Times the Redis breaker opened (a failed half-open probe counts again)", ()),
    "restarts": ("redis_restarts", "Redis restarts or failovers detected (new run id), by what saw it", ("detector",)),
    "near_puts": ("near_puts", "Answers offered to the near tier: stored, skipped (their key changed meanwhile) or rejected (admission: "
                  "less asked for than the entry they would evict)",
                  ("result",)),
    "near_evictions": ("near_evictions", "Near-tier entries dropped, by reason (change: their key changed)", ("reason",)),
    "near_invalidations": ("near_invalidations", "Changes applied to the near tier (announced or made in this process)", ()),
    "near_flushes": ("near_flushes", "Times the near tier was emptied (gap, lost connection, restart, announced flush)", ()),
    "listener_messages": ("listener_messages", "Change announcements received by the coherence listener", ()),
    "listener_gaps": ("listener_gaps", "Lost change announcements (sequence gaps); each flushed the near tier", ()),
    "listener_reconnects": ("listener_reconnects", "Times the coherence listener lost Redis and resubscribed", ()),
    "relay_batches": ("relay_batches", "Outbox batches the relay applied to Redis", ()),
    "relay_changes": ("relay_changes", "Outbox rows the relay applied", ()),
    "relay_keys": ("relay_keys", "Keys the relay killed or spared", ()),
    "relay_spared": ("relay_spared", "Keys the relay left alone because the changing write had stored them itself", ()),
    "relay_flushes": ("relay_flushes", "Namespace flushes the relay applied (a table truncation)", ()),
    "relay_errors": ("relay_errors", "Relay loop failures (PostgreSQL or Redis); the rows stay for the next try", ()),
    "generations": ("generations", "get_or_generate outcomes: generate() started, result stored (won), previous "
                    "result served (joined), waited for another's, wait timed out, generate() failed, lease taken over",
                    ("result",)),
}

# Gauge families: attribute -> (name after the prefix; help; multiprocess mode; how one process combines objects).
_GAUGES = {
    "breaker_state": ("redis_breaker_state", "Redis circuit breaker: 0 closed, 1 half-open, 2 open (worst live process)",
                      "livemax", max),
    "owed_kills": ("redis_owed_kills", "Kills waiting to reach Redis (the process keeps off Redis meanwhile)", "livesum", sum),
    "near_entries": ("near_entries", "Entries held by near tiers", "livesum", sum),
    "near_bytes": ("near_bytes", "Bytes accounted by near tiers", "livesum", sum),
    "relay_last_seq": ("relay_last_seq", "Highest outbox sequence number the relay applied", "max", max),
    "relay_backlog": ("relay_backlog", "Changes waiting in the outbox (0 unless this process measures it)", "livemax", max),
    "relay_backlog_age": ("relay_backlog_age_seconds", "Age of the oldest change waiting in the outbox", "livemax", max),
}

#: stats() counters: (section, name) -> (counter family, label values). Add a row when a tier grows a counter.
COUNTERS: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("redis", "hits"): ("lookups", ("redis", "hit")),
    ("redis", "misses"): ("lookups", ("redis", "miss")),
    ("redis", "errors"): ("redis_errors", ()),
    ("redis", "skipped"): ("redis_skipped", ()),
    ("redis", "fills"): ("fills", ("stored",)),
    ("redis", "fills_refused"): ("fills", ("refused",)),
    ("redis", "writes_through"): ("writes_through", ()),
    ("redis", "kills"): ("kills", ()),
    ("redis", "breaker_trips"): ("breaker_trips", ()),
    ("run_watch", "restarts"): ("restarts", ("connection",)),
    ("listener", "restarts_seen"): ("restarts", ("listener",)),
    ("near", "hits"): ("lookups", ("near", "hit")),
    ("near", "misses"): ("lookups", ("near", "miss")),
    ("near", "puts"): ("near_puts", ("stored",)),
    ("near", "puts_skipped"): ("near_puts", ("skipped",)),
    ("near", "puts_rejected"): ("near_puts", ("rejected",)),
    ("near", "evictions"): ("near_evictions", ("change",)),
    ("near", "invalidations"): ("near_invalidations", ()),
    ("near", "flushes"): ("near_flushes", ()),
    ("listener", "messages"): ("listener_messages", ()),
    ("listener", "gaps"): ("listener_gaps", ()),
    ("listener", "reconnects"): ("listener_reconnects", ()),
    ("relay", "batches"): ("relay_batches", ()),
    ("relay", "changes"): ("relay_changes", ()),
    ("relay", "keys"): ("relay_keys", ()),
    ("relay", "spared"): ("relay_spared", ()),
    ("relay", "flushes"): ("relay_flushes", ()),
    ("relay", "errors"): ("relay_errors", ()),
    **{("generations", name): ("generations", (name,)) for name in GENERATION_RESULTS},
}

#: stats() levels: (section, name) -> gauge family ("breaker_state" and the relay backlog are measured here).
GAUGES: dict[tuple[str, str], str] = {
    ("redis", "breaker_state"): "breaker_state",
    ("redis", "pending_kills"): "owed_kills",
    ("near", "entries"): "near_entries",
    ("near", "bytes"): "near_bytes",
    ("relay", "last_seq"): "relay_last_seq",
    ("relay", "backlog"): "relay_backlog",
    ("relay", "backlog_age"): "relay_backlog_age",
}

BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}

#: Every label value any family may carry: what the no-tenant test checks against.
LABEL_VALUES = frozenset(OPS + TIERS + RESULTS + GENERATION_RESULTS + ("stored", "refused", "skipped", "rejected", "change", "connection", "listener"))

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")


def multiprocess_mode() -> bool:
    """True when prometheus_client writes values to PROMETHEUS_MULTIPROC_DIR (decided when it was imported)."""
    env = "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ
    return bool(getattr(_values.ValueClass, "_multiprocess", env))


class _SyncOnScrape:
    """Registered before the families, so a scrape of this process copies stats() first; yields nothing itself.

    It holds the metrics object: the registry keeps it alive, as it keeps the families.
    """

    def __init__(self, metrics: TieredCacheMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        """Nothing to describe (else an auto-describing registry, like the default one, collects at register time)."""
        return []

    def collect(self) -> list[Any]:
        self._metrics._sync_quietly()
        return []


class TieredCacheMetrics:
    """The metric families of one registry, and the stats() baselines of the caches and relays it watches."""

    def __init__(self, registry: CollectorRegistry | None = None, *, prefix: str = "tiered_cache",
                 interval: float | None = None) -> None:
        if not isinstance(prefix, str) or not _NAME.match(prefix):
            raise ConfigurationError(f"metrics prefix: {prefix!r} is not a Prometheus metric name")
        self.registry = REGISTRY if registry is None else registry
        self.prefix = prefix
        self.multiprocess = multiprocess_mode()
        #: Seconds between background syncs; by default only in multiprocess mode (scrapes sync otherwise).
        self.interval = (1.0 if self.multiprocess else 0.0) if interval is None else float(interval)
        self.server: Any = None
        self._lock = threading.Lock()
        self._watched: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lag: weakref.WeakKeyDictionary[Any, LagWatch] = weakref.WeakKeyDictionary()
        self._counted: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], float]] = weakref.WeakKeyDictionary()
        self._levels: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], float]] = weakref.WeakKeyDictionary()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False
        self._hook = _SyncOnScrape(self)
        self.registry.register(self._hook)
        p, reg = prefix + "_", self.registry
        self.requests = Counter(p + "requests", "Public calls, by operation, the tier that answered and the outcome",
                                ("op", "tier", "result"), registry=reg)
        self.duration = Histogram(p + "request_duration_seconds", "Latency of public calls", ("op",),
                                  buckets=LATENCY_BUCKETS, registry=reg)
        self.relay_delay = Histogram(p + "relay_delay_seconds",
                                     "Commit to Redis through the relay: a batch's oldest change's age when Redis confirmed it",
                                     buckets=RELAY_DELAY_BUCKETS, registry=reg)
        self.families: dict[str, Any] = {
            attr: Counter(p + name, doc, labels, registry=reg) for attr, (name, doc, labels) in _COUNTERS.items()
        }
        self.families.update({
            attr: Gauge(p + name, doc, registry=reg, multiprocess_mode=mode)
            for attr, (name, doc, mode, _) in _GAUGES.items()
        })
        # Children resolved once: a call costs one dict lookup, not a labels() call.
        self._calls = {(op, t, r): (self.requests.labels(op, t, r), self.duration.labels(op)) for op, t, r in sorted(CALLS)}
        self._counters = {
            key: self.families[attr].labels(*values) if values else self.families[attr]
            for key, (attr, values) in COUNTERS.items()
        }
        self._gauges = {key: self.families[attr] for key, attr in GAUGES.items()}
        _fork.register(self)

    # -- the hot path ---------------------------------------------------------------------------

    def observe_call(self, op: str, tier: str, result: str, seconds: float) -> None:
        """Count one public call by the tier that answered and its outcome, and observe its latency."""
        try:
            count, latency = self._calls[op, tier, result]
        except KeyError:
            raise InvalidInput("observe_call", f"{(op, tier, result)!r} is not one of metrics.CALLS") from None
        count.inc()
        latency.observe(seconds)

    def observe_relay_delay(self, seconds: float) -> None:
        """A relay batch reached Redis `seconds` after its oldest change was committed."""
        self.relay_delay.observe(max(0.0, seconds))

    # -- syncing stats() ------------------------------------------------------------------------

    def watch(self, source: Any, *, lag: bool = False, lag_warning: float = 30.0) -> TieredCacheMetrics:
        """Sync a TieredCache (anything with a stats() like it) or a Relay from now on; held weakly.

        lag: also measure the relay's outbox backlog at every sync (one PostgreSQL query), and log when
        its oldest change is older than `lag_warning` seconds.
        """
        with self._lock:
            self._watched.add(source)
            if lag:
                self._lag[source] = LagWatch(lag_warning)
        self._start()
        return self

    def sync(self, source: Any = None) -> None:
        """Copy counters that grew since the last sync (per object) and set the gauges; `source` is watched too."""
        if source is not None and source not in self._watched:
            self.watch(source)
        with self._lock:
            for src in [source] if source is not None else list(self._watched):
                self._sync_one(src)
            for key, gauge in self._gauges.items():
                combine = _GAUGES[GAUGES[key]][3]
                present = [levels[key] for levels in self._levels.values() if key in levels]
                gauge.set(combine(present) if present else 0)

    def _sync_one(self, source: Any) -> None:
        for owner, section, values in _sections(source, measure_lag=source in self._lag):
            counted = self._counted.setdefault(owner, {})
            levels = self._levels.setdefault(owner, {})
            for name, value in values.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                key = (section, name)
                child = self._counters.get(key)
                if child is not None:
                    last = counted.get(key, 0)
                    delta = value - last if value >= last else value  # lower than last time: the object reset it
                    if delta > 0:
                        child.inc(delta)
                    counted[key] = value
                elif key in self._gauges:
                    levels[key] = value
            age = values.get("backlog_age") if section == "relay" else None
            if age is not None and age == age and source in self._lag:  # NaN (not measured) is not a lag
                self._lag[source].update(age, int(values.get("backlog", 0)))

    def _sync_quietly(self) -> None:
        """sync() for a scrape or the thread: a failure is logged once, never breaks the scrape."""
        try:
            self.sync()
        except Exception:
            if not self._warned:
                self._warned = True
                logger.warning("metrics: syncing stats() failed", exc_info=True)

    # -- the background thread (multiprocess mode) ----------------------------------------------

    def _start(self) -> None:
        if self.interval > 0 and (self._thread is None or not self._thread.is_alive()):
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="tiered_cache-metrics", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sync_quietly()

    def close(self) -> None:
        """Stop the background thread and sync once more, so a worker's last counts are written before it exits."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)
            self._thread = None
        self.sync()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def _after_fork_in_child(self) -> None:
        """Only the forking thread survives: new lock, and the sync thread again if it ran."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        running, self._thread = self._thread is not None, None
        if running:
            self._start()


def _sections(source: Any, *, measure_lag: bool = False) -> list[tuple[Any, str, dict[str, Any]]]:
    """(owner, section, counters) of a cache or relay; owners key the baselines, so one relay watched twice counts once."""
    stats = getattr(source, "stats", None)
    out: list[tuple[Any, str, dict[str, Any]]] = []
    if callable(stats):
        for section, values in stats().items():
            owner = getattr(source, section, None)
            out.append((owner if _weakrefable(owner) else source, section, dict(values)))
        redis_tier, relay = getattr(source, "redis", None), getattr(source, "relay", None)
    else:  # a Relay: its own counters and those of the Redis tier it kills through
        relay, redis_tier = source, source.redis
        out.append((source, "relay", asdict(source.stats)))
        out.append((redis_tier, "redis", {**asdict(redis_tier.stats), "breaker_trips": redis_tier.breaker.trips}))
    if redis_tier is not None:
        state = BREAKER_STATES.get(getattr(getattr(redis_tier, "breaker", None), "state", None))  # type: ignore[arg-type]
        for owner, section, values in out:
            if section == "redis" and state is not None:
                values["breaker_state"] = state
        try:
            watch = watch_of(redis_tier.client)
        except AttributeError:  # a client without a pool of its own (fakeredis, a test double)
            watch = None
        if isinstance(getattr(watch, "restarts", None), int) and _weakrefable(watch):
            out.append((watch, "run_watch", {"restarts": watch.restarts}))
    if measure_lag and relay is not None:
        try:
            backlog, age = relay.lag()
        except Exception as exc:  # PostgreSQL down: unknown, not zero
            logger.debug("metrics: relay lag: %s: %s", type(exc).__name__, exc)
            backlog, age = float("nan"), float("nan")
        levels = {"backlog": backlog, "backlog_age": age}
        for owner, section, values in out:
            if section == "relay":
                values.update(levels)
                break
        else:
            out.append((relay, "relay", levels))
    return out


def _weakrefable(obj: Any) -> bool:
    if obj is None:
        return False
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


_shared: weakref.WeakKeyDictionary[Any, dict[str, TieredCacheMetrics]] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def metrics_for(registry: CollectorRegistry | None = None, *, prefix: str = "tiered_cache",
                interval: float | None = None) -> TieredCacheMetrics:
    """The one TieredCacheMetrics of a registry and prefix (families may be registered only once); made on first use."""
    registry = REGISTRY if registry is None else registry
    with _shared_lock:
        by_prefix = _shared.setdefault(registry, {})
        if prefix not in by_prefix:
            by_prefix[prefix] = TieredCacheMetrics(registry, prefix=prefix, interval=interval)
        return by_prefix[prefix]


def cache_metrics(cache: Any, registry: CollectorRegistry | None = None, **options: Any) -> TieredCacheMetrics:
    """Export a cache's metrics to `registry` (default: prometheus_client's), and hand the facade its per-call hook."""
    metrics = metrics_for(registry, **options)
    metrics.watch(cache)
    cache.metrics = metrics  # TieredCache reports each public call to it
    if getattr(cache, "relay", None) is not None:
        cache.relay.on_delay = metrics.observe_relay_delay  # an in-process relay reports its batches' delays
    return metrics


def serve_relay_metrics(port: int, relay: Any, registry: CollectorRegistry | None = None, *,
                        addr: str = "127.0.0.1", lag_warning: float = 30.0) -> TieredCacheMetrics:
    """`tiered-cache relay --metrics-port N`: serve the relay's counters, backlog and delays over HTTP on addr:port."""
    from prometheus_client import start_http_server

    metrics = metrics_for(registry)
    metrics.watch(relay, lag=True, lag_warning=lag_warning)
    relay.on_delay = metrics.observe_relay_delay  # the relay reports each batch's commit-to-Redis delay
    started = start_http_server(port, addr=addr, registry=metrics.registry)
    metrics.server = started[0] if isinstance(started, tuple) else None  # prometheus-client < 0.20 returns None
    return metrics
