"""Metrics, events, spans and health: scraped from real registries after scripted calls on real servers."""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from _util import wait_until
from tiered_cache import InvalidInput, PostgresStore, StoreUnavailable, TieredCache, observe, redis_client
from tiered_cache.health import health
from tiered_cache.metrics import CALLS, LABEL_VALUES, TieredCacheMetrics, cache_metrics, serve_relay_metrics
from tiered_cache.policy.keys import KeySpace
from tiered_cache.relay import Relay
from tiered_cache.tiers.redis import RedisTier

CT = "metrics_t"
SITE = 987654  # a venue id no label may ever carry
SECRET = "secret-target-xyz"  # a target id no label may ever carry


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def _call(m: TieredCacheMetrics, op: str, tier: str, result: str, fn: Callable[..., Any], *args: Any) -> Any:
    """What the facade hook will do for one public call, done by hand until it is wired."""
    start = time.perf_counter()
    try:
        value = fn(*args)
    except InvalidInput:
        m.observe_call(op, "none", "invalid", time.perf_counter() - start)
        raise
    m.observe_call(op, tier, result, time.perf_counter() - start)
    return value


@pytest.fixture
def near_cache(dsn: str, redis_url: str) -> Iterator[TieredCache]:
    """A TieredCache with a near tier whose listener is subscribed."""
    with TieredCache.connect(dsn, redis_url, near_max_entries=100) as c:
        wait_until(c.listener.subscribed.is_set, 30, what="listener subscribed")  # type: ignore[union-attr]
        yield c


def _script(m: TieredCacheMetrics, c: TieredCache) -> None:
    """write, redis hit, near hit, a miss, a get_many, a history miss, one invalid call."""
    _call(m, "write_cache", "postgres", "ok", c.write_cache, CT, SITE, "a", {"v": 1})
    wait_until(lambda: c.listener.stats.messages >= 1, 30, what="own announcement heard")  # type: ignore[union-attr]
    _call(m, "get_latest", "redis", "hit", c.get_latest, CT, SITE, "a")
    _call(m, "get_latest", "near", "hit", c.get_latest, CT, SITE, "a")
    _call(m, "get_latest", "postgres", "miss", c.get_latest, CT, SITE, SECRET)
    _call(m, "get_many", "postgres", "miss", c.get_many, CT, SITE, ["a", SECRET, "b"])
    _call(m, "get_history", "postgres", "miss", c.get_history, CT, SITE, "a")
    with pytest.raises(InvalidInput):
        _call(m, "get_latest", "redis", "hit", c.get_latest, CT, "not-a-site", "a")


def test_scripted_calls_give_exact_counts(near_cache: TieredCache) -> None:
    """Per-call counts and every tier counter synced from stats() match the script, once, however often synced."""
    reg = CollectorRegistry()
    m = TieredCacheMetrics(reg)
    _script(m, near_cache)
    m.sync(near_cache)
    m.sync(near_cache)  # a second sync adds nothing
    req = "tiered_cache_requests_total"
    assert _value(reg, req, op="write_cache", tier="postgres", result="ok") == 1
    assert _value(reg, req, op="get_latest", tier="redis", result="hit") == 1
    assert _value(reg, req, op="get_latest", tier="near", result="hit") == 1
    assert _value(reg, req, op="get_latest", tier="postgres", result="miss") == 1
    assert _value(reg, req, op="get_latest", tier="none", result="invalid") == 1
    assert _value(reg, req, op="get_many", tier="postgres", result="miss") == 1
    assert _value(reg, req, op="get_history", tier="postgres", result="miss") == 1
    assert _value(reg, req, op="get_latest", tier="postgres", result="bypass") == 0  # pre-created at zero
    assert _value(reg, "tiered_cache_request_duration_seconds_count", op="get_latest") == 4
    # Per key: get_many asked the near tier for 3 keys (2 hits), Redis for 1 (a miss).
    assert _value(reg, "tiered_cache_lookups_total", tier="near", result="hit") == 3
    assert _value(reg, "tiered_cache_lookups_total", tier="near", result="miss") == 4
    assert _value(reg, "tiered_cache_lookups_total", tier="redis", result="hit") == 1
    assert _value(reg, "tiered_cache_lookups_total", tier="redis", result="miss") == 3
    assert _value(reg, "tiered_cache_redis_fills_total", result="stored") == 3
    assert _value(reg, "tiered_cache_redis_fills_total", result="refused") == 0
    assert _value(reg, "tiered_cache_redis_writes_through_total") == 1
    assert _value(reg, "tiered_cache_near_puts_total", result="stored") == 4
    assert _value(reg, "tiered_cache_near_entries") == 4
    assert _value(reg, "tiered_cache_redis_breaker_state") == 0
    assert _value(reg, "tiered_cache_redis_owed_kills") == 0
    # Every mapped counter equals what stats() says (the exporter copies, it does not count).
    stats = near_cache.stats()
    assert _value(reg, "tiered_cache_near_invalidations_total") == stats["near"]["invalidations"]
    assert _value(reg, "tiered_cache_near_flushes_total") == stats["near"]["flushes"] >= 1
    assert _value(reg, "tiered_cache_near_bytes") == stats["near"]["bytes"] > 0
    assert _value(reg, "tiered_cache_listener_messages_total") == stats["listener"]["messages"]
    assert _value(reg, "tiered_cache_redis_errors_total") == stats["redis"]["errors"] == 0
    # More calls, then a sync: only the growth is added.
    _call(m, "get_latest", "near", "hit", near_cache.get_latest, CT, SITE, "a")
    m.sync(near_cache)
    assert _value(reg, "tiered_cache_lookups_total", tier="near", result="hit") == 4
    assert _value(reg, req, op="get_latest", tier="near", result="hit") == 2


def test_a_scrape_syncs_by_itself(near_cache: TieredCache) -> None:
    """In single-process mode a scrape copies stats() first: no sync() call, no thread."""
    reg = CollectorRegistry()
    m = cache_metrics(near_cache, reg)
    assert near_cache.metrics is m and m._thread is None  # type: ignore[attr-defined]
    near_cache.write_cache(CT, SITE, "a", {"v": 1})
    near_cache.get_latest(CT, SITE, "a")
    assert _value(reg, "tiered_cache_redis_writes_through_total") == 1
    assert _value(reg, "tiered_cache_lookups_total", tier="redis", result="hit") == 1
    assert cache_metrics(near_cache, reg) is m  # one set of families per registry
    assert "tiered_cache_lookups_total" in generate_latest(reg).decode()


def test_no_label_carries_a_site_or_key(near_cache: TieredCache) -> None:
    """Label names and values come from fixed enums only: the venue and the targets used never appear."""
    reg = CollectorRegistry()
    m = TieredCacheMetrics(reg)
    _script(m, near_cache)
    m.sync(near_cache)
    seen = 0
    for family in reg.collect():
        for sample in family.samples:
            assert set(sample.labels) <= {"op", "tier", "result", "reason", "detector", "le"}, sample
            for name, value in sample.labels.items():
                assert name == "le" or value in LABEL_VALUES, sample
                assert str(SITE) not in value and SECRET not in value and value != "a", sample
                seen += 1
    assert seen > 100
    with pytest.raises(InvalidInput):
        m.observe_call("get_latest", str(SITE), "hit", 0.001)
    with pytest.raises(InvalidInput):
        m.observe_call(SECRET, "redis", "hit", 0.001)
    with pytest.raises(InvalidInput):
        observe.span(SECRET)


def test_redis_outage_shows_breaker_owed_kills_and_errors(dsn: str) -> None:
    """A cache whose Redis refuses connections: breaker open, the write's kill owed, errors counted."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"  # nothing listens once the socket closes
    reg = CollectorRegistry()
    m = TieredCacheMetrics(reg)
    with TieredCache.connect(dsn, dead) as c:
        _call(m, "write_cache", "postgres", "ok", c.write_cache, CT, SITE, "a", {"v": 1})
        wait_until(lambda: c.redis.breaker.trips >= 1, 30, what="breaker opened")
        _call(m, "get_latest", "postgres", "bypass", c.get_latest, CT, SITE, "a")
        m.sync(c)
        assert _value(reg, "tiered_cache_redis_owed_kills") == c.redis.pending == 1
        assert _value(reg, "tiered_cache_redis_breaker_state") in (1, 2)  # open, or half-open for a probe
        assert 1 <= _value(reg, "tiered_cache_redis_breaker_trips_total") <= c.redis.breaker.trips  # type: ignore[operator]
        assert 2 <= _value(reg, "tiered_cache_redis_errors_total") <= c.stats()["redis"]["errors"]  # type: ignore[operator]
        assert _value(reg, "tiered_cache_requests_total", op="get_latest", tier="postgres", result="bypass") == 1
        report = health(c)
        assert report.status == "degraded" and report.ok
        assert report.checks["redis"].status == "down" and report.checks["owed_kills"].count == 1


def test_a_dead_cache_keeps_its_counts_and_drops_its_gauges(dsn: str, redis_url: str) -> None:
    """Caches are held weakly: one that is gone leaves its counters and stops adding to the gauges."""
    reg = CollectorRegistry()
    m = TieredCacheMetrics(reg)
    caches = [TieredCache.connect(dsn, redis_url, near_max_entries=100, namespace=f"m{i}") for i in range(2)]
    for i, c in enumerate(caches):
        wait_until(c.listener.subscribed.is_set, 30, what="listener subscribed")  # type: ignore[union-attr]
        for t in range(i + 1):
            c.get_latest(CT, SITE, f"t{t}")  # cache i ends with i + 1 near entries
        m.watch(c)
    del c
    m.sync()
    assert _value(reg, "tiered_cache_near_entries") == 3
    assert _value(reg, "tiered_cache_lookups_total", tier="redis", result="miss") == 3
    gone = weakref.ref(caches[1])
    caches.pop().close()
    gc.collect()
    assert gone() is None  # the metrics did not keep it alive
    m.sync()
    assert _value(reg, "tiered_cache_near_entries") == 1
    assert _value(reg, "tiered_cache_lookups_total", tier="redis", result="miss") == 3
    caches[0].close()
    # Without servers: an object whose gauges are non-zero when it goes.
    fake = _StatsOnly()
    m.sync(fake)
    assert _value(reg, "tiered_cache_near_entries") == 7
    del fake
    gc.collect()
    m.sync()
    assert _value(reg, "tiered_cache_near_entries") == 0


def test_unknown_stats_are_ignored() -> None:
    """A counter a tier adds later is skipped (until the table maps it); a reset counter counts again from zero."""

    class Fake:
        def __init__(self) -> None:
            self.counts = {"redis": {"hits": 3, "brand_new": 5}, "mystery": {"x": 1, "label": "text"}}

        def stats(self) -> dict[str, dict[str, Any]]:
            return self.counts

    reg = CollectorRegistry()
    m = TieredCacheMetrics(reg)
    fake = Fake()
    m.sync(fake)
    assert _value(reg, "tiered_cache_lookups_total", tier="redis", result="hit") == 3
    fake.counts["redis"]["hits"] = 2  # the object started again (e.g. a fork reset it)
    m.sync(fake)
    assert _value(reg, "tiered_cache_lookups_total", tier="redis", result="hit") == 5
    assert not any("brand_new" in f.name or "mystery" in f.name for f in reg.collect())


def test_observe_call_cost(figure: Callable[[str], None]) -> None:
    """The per-call hook costs about a microsecond; printed, never asserted."""
    reg = CollectorRegistry()
    m = TieredCacheMetrics(reg)
    n = 200_000
    for name, fn in (("observe_call", lambda: m.observe_call("get_latest", "near", "hit", 2e-6)),
                     ("span() with opentelemetry-api and no provider", _span_once)):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        figure(f"metrics: {name}: {(time.perf_counter() - start) / n * 1e6:.2f} µs per call (single process)")
    assert _value(reg, "tiered_cache_requests_total", op="get_latest", tier="near", result="hit") == n
    assert _value(reg, "tiered_cache_request_duration_seconds_bucket", op="get_latest", le="1e-05") == n
    start = time.perf_counter()
    for _ in range(1000):
        m.sync(_StatsOnly())
    figure(f"metrics: sync() of one cache's stats: {(time.perf_counter() - start) / 1000 * 1e6:.1f} µs")


class _StatsOnly:
    """The shape of TieredCache.stats() with every section, for timing sync() without servers."""

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            "redis": dict.fromkeys(("hits", "misses", "fills", "fills_refused", "writes_through", "kills", "errors",
                                    "skipped", "pending_kills", "breaker_trips"), 7),
            "near": dict.fromkeys(("hits", "misses", "puts", "puts_skipped", "evictions", "flushes", "invalidations",
                                   "entries", "bytes"), 7),
            "listener": dict.fromkeys(("messages", "gaps", "reconnects", "restarts_seen"), 7),
            "relay": dict.fromkeys(("batches", "changes", "keys", "spared", "flushes", "errors", "last_seq"), 7),
        }


def _span_once() -> None:
    with observe.span("get_latest") as s:
        s.tier("near", "hit")


_WORKER = textwrap.dedent(
    """
    import inspect, json, os, sys, time
    from prometheus_client.multiprocess import MultiProcessCollector
    from tiered_cache import TieredCache
    from tiered_cache.metrics import cache_metrics

    ns, ct, site = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = TieredCache.connect(os.environ["DSN"], os.environ["REDIS_URL"], namespace=ns, near_max_entries=100)
    m = cache_metrics(cache, interval=0.05)
    assert m.multiprocess and m._thread is not None
    deadline = time.monotonic() + 30
    while not cache.listener.subscribed.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)

    wired = "metrics" in inspect.signature(TieredCache.__init__).parameters  # the facade counts by itself

    def call(op, tier, result, fn, *args):
        start = time.perf_counter()
        fn(*args)
        if not wired:
            m.observe_call(op, tier, result, time.perf_counter() - start)

    call("write_cache", "postgres", "ok", cache.write_cache, ct, site, ns + "-a", {"v": 1})
    while cache.listener.stats.messages < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    call("get_latest", "redis", "hit", cache.get_latest, ct, site, ns + "-a")
    call("get_latest", "near", "hit", cache.get_latest, ct, site, ns + "-a")
    call("get_latest", "postgres", "miss", cache.get_latest, ct, site, ns + "-missing")
    # The sync thread, not a scrape, must carry the tier counters into this worker's file.
    mine = os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], f"counter_{os.getpid()}.db")
    def synced():
        for family in MultiProcessCollector.merge([mine]):
            for s in family.samples:
                if s.name.endswith("lookups_total") and s.labels == {"tier": "redis", "result": "hit"}:
                    return s.value == 1
        return False
    while not synced() and time.monotonic() < deadline:
        time.sleep(0.01)
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        m.observe_call("get_many", "none", "ok", 1e-6)
    cost = (time.perf_counter() - start) / n * 1e6
    m.close()
    print(json.dumps({"pid": os.getpid(), "synced": synced(), "cost_us": cost}), flush=True)
    sys.stdin.readline()  # stay alive (a live gauge counts live workers) until the test says so
    cache.close()
    """
)


def test_multiprocess_workers_add_up(dsn: str, redis_url: str, tmp_path: Any, figure: Callable[[str], None]) -> None:
    """Two worker processes in prometheus multiprocess mode: counts add up, live gauges drop a dead worker's."""
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "DSN": dsn, "REDIS_URL": redis_url}
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, f"mp{i}", CT, str(SITE)], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        reports = [json.loads(w.stdout.readline()) for w in workers]  # type: ignore[union-attr]
        assert all(r["synced"] for r in reports), reports
        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=str(tmp_path))
        req = "tiered_cache_requests_total"
        assert _value(reg, req, op="write_cache", tier="postgres", result="ok") == 2
        assert _value(reg, req, op="get_latest", tier="redis", result="hit") == 2
        assert _value(reg, req, op="get_latest", tier="near", result="hit") == 2
        assert _value(reg, req, op="get_latest", tier="postgres", result="miss") == 2
        assert _value(reg, req, op="get_many", tier="none", result="ok") == 40000
        assert _value(reg, "tiered_cache_request_duration_seconds_count", op="get_latest") == 6
        assert _value(reg, "tiered_cache_lookups_total", tier="redis", result="hit") == 2
        assert _value(reg, "tiered_cache_lookups_total", tier="near", result="hit") == 2
        assert _value(reg, "tiered_cache_redis_fills_total", result="stored") == 2
        assert _value(reg, "tiered_cache_redis_writes_through_total") == 2
        assert _value(reg, "tiered_cache_near_entries") == 4  # livesum: 2 entries in each live worker
        assert _value(reg, "tiered_cache_redis_breaker_state") == 0
        for r in reports:
            figure(f"metrics: observe_call in multiprocess mode: {r['cost_us']:.2f} µs per call")
    finally:
        for w in workers:
            w.communicate("exit\n", timeout=60)
    mark_process_dead(reports[0]["pid"], str(tmp_path))
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(tmp_path))
    assert _value(reg, "tiered_cache_near_entries") == 2  # the dead worker's entries are gone
    assert _value(reg, "tiered_cache_redis_writes_through_total") == 2  # its counts are not


def test_relay_metrics_server(dsn: str, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """serve_relay_metrics: backlog, relay counters over HTTP; crossing the lag threshold logs once each way."""
    with PostgresStore(dsn) as store:
        store.write_cache(CT, SITE, "a", {"v": 1})  # written around the cache: one change row waits
    client = redis_client(redis_url)
    relay = Relay(dsn, RedisTier(client, KeySpace("tc")))
    reg = CollectorRegistry()
    caplog.set_level(logging.INFO, logger="tiered_cache.events")
    m = serve_relay_metrics(0, relay, reg, lag_warning=0.001)
    try:
        assert relay.on_delay.__self__ is m  # type: ignore[attr-defined]
        url = f"http://127.0.0.1:{m.server.server_address[1]}/metrics"

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=30) as answer:
                return answer.read().decode()

        text = scrape()
        assert "tiered_cache_relay_backlog 1.0" in text
        assert relay.catch_up() == 1
        text = scrape()
        assert "tiered_cache_relay_backlog 0.0" in text and "tiered_cache_relay_changes_total 1.0" in text
        assert "tiered_cache_redis_kills_total 1.0" in text
    finally:
        m.close()
        relay.stop()
        client.close()
    records = [r for r in caplog.records if r.name == "tiered_cache.events"]
    assert [(r.event, r.levelname) for r in records] == [("relay_lagging", "WARNING"), ("relay_caught_up", "INFO")]  # type: ignore[attr-defined]
    lagging = records[0]
    assert lagging.count == 1 and lagging.threshold == 0.001 and lagging.seconds > 0.001  # type: ignore[attr-defined]


def test_unmeasurable_backlog_is_nan_not_zero(redis_url: str) -> None:
    """With PostgreSQL unreachable the relay's backlog is unknown: NaN, and the scrape still answers."""
    client = redis_client(redis_url)
    relay = Relay("postgresql://nobody@127.0.0.1:1/none", RedisTier(client, KeySpace("tc")), connect_timeout=1)
    reg = CollectorRegistry()
    TieredCacheMetrics(reg).watch(relay, lag=True)
    text = generate_latest(reg).decode()
    assert "tiered_cache_relay_backlog NaN" in text and "tiered_cache_relay_backlog_age_seconds NaN" in text
    assert "tiered_cache_relay_changes_total 0.0" in text
    client.close()


def test_event_records_and_episodes(caplog: pytest.LogCaptureFixture) -> None:
    """Each event has stable fields; an episode logs its start once and its end once, however often it is seen."""
    caplog.set_level(logging.INFO, logger="tiered_cache.events")
    episode = observe.Episode()
    for n in (1, 3, 2):
        if episode.begin(n):
            observe.kills_owed("tc", n)
    seconds = episode.end()
    assert seconds is not None and episode.end() is None
    observe.kills_drained("tc", episode.peak, seconds)
    observe.breaker_opened("tc", 2)
    observe.redis_restarted({"b", "a"}, "connection")
    records = [r for r in caplog.records if r.name == "tiered_cache.events"]
    assert [r.event for r in records] == ["kills_owed", "kills_drained", "breaker_opened", "redis_restarted"]  # type: ignore[attr-defined]
    owed, drained, opened, restarted = records
    assert (owed.levelname, owed.tier, owed.namespace, owed.count) == ("WARNING", "redis", "tc", 1)  # type: ignore[attr-defined]
    assert (drained.levelname, drained.count) == ("INFO", 3) and drained.seconds >= 0  # type: ignore[attr-defined]
    assert opened.count == 2 and not hasattr(opened, "seconds")  # absent fields are left out
    assert (restarted.namespace, restarted.count, restarted.detector) == ("a,b", 2, "connection")  # type: ignore[attr-defined]


_RECORDING = textwrap.dedent(
    """
    import json, sys
    from opentelemetry import trace
    from tiered_cache import StoreUnavailable, observe

    SPANS = []

    class Span(trace.NonRecordingSpan):
        def __init__(self, name, attributes):
            super().__init__(trace.SpanContext(1, len(SPANS) + 1, False, trace.TraceFlags(1)))
            self.name, self.attributes, self.status, self.ended = name, dict(attributes or {}), None, False
        def is_recording(self): return True
        def set_attribute(self, key, value): self.attributes[key] = value
        def set_status(self, status, description=None): self.status = (status.status_code.name, status.description)
        def end(self, end_time=None): self.ended = True

    class Tracer(trace.Tracer):
        def start_span(self, name, context=None, kind=None, attributes=None, **kw):
            parent = trace.get_current_span(context)
            SPANS.append(Span(name, attributes))
            SPANS[-1].parent = parent.get_span_context().span_id if parent.get_span_context().is_valid else None
            return SPANS[-1]
        def start_as_current_span(self, *a, **kw): raise NotImplementedError

    class Provider(trace.TracerProvider):
        def get_tracer(self, *a, **kw): return Tracer()

    assert observe.span("get_latest") is observe._NO_SPAN and not observe.tracing()  # no provider yet
    trace.set_tracer_provider(Provider())  # after tiered_cache.observe took its (proxy) tracer
    for _ in range(observe._RECHECK):  # noticed within that many calls
        observe.tracing()
    assert observe.tracing()
    with observe.span("get_latest") as s:
        with observe.span("get_many"):
            pass
        s.tier("redis", "hit")
    try:
        with observe.span("write_cache"):
            raise StoreUnavailable("site 987654 secret-target-xyz")
    except StoreUnavailable:
        pass
    print(json.dumps([{"name": x.name, "attributes": x.attributes, "status": x.status, "ended": x.ended,
                       "parent": x.parent, "id": x.get_span_context().span_id} for x in SPANS]))
    """
)

_ABSENT = textwrap.dedent(
    """
    import sys, time
    sys.modules["opentelemetry"] = None  # as if opentelemetry-api were not installed
    from tiered_cache import observe
    assert not observe.TRACING
    n = 500000
    start = time.perf_counter()
    for _ in range(n):
        with observe.span("get_latest") as s:
            s.tier("near", "hit")
    print((time.perf_counter() - start) / n * 1e6)
    """
)


def test_spans_when_a_tracer_provider_records(figure: Callable[[str], None]) -> None:
    """With a recording provider: one span per call, nested, with the tier and result, and errors by type only."""
    done = subprocess.run([sys.executable, "-c", _RECORDING], capture_output=True, text=True, timeout=60, check=True)
    outer, inner, failed = json.loads(done.stdout)
    assert outer["name"] == "tiered_cache.get_latest" and outer["ended"] and outer["status"] is None
    assert outer["attributes"] == {"tiered_cache.operation": "get_latest", "tiered_cache.tier": "redis",
                                   "tiered_cache.result": "hit"}
    assert inner["name"] == "tiered_cache.get_many" and inner["parent"] == outer["id"]
    assert failed["status"] == ["ERROR", "StoreUnavailable"] and failed["attributes"]["error.type"] == "StoreUnavailable"
    assert "987654" not in json.dumps(failed) and "secret" not in json.dumps(failed)


def test_spans_cost_nothing_without_opentelemetry(figure: Callable[[str], None]) -> None:
    """Without opentelemetry-api, or with it but no provider, span() is a shared no-op; its cost is printed."""
    done = subprocess.run([sys.executable, "-c", _ABSENT], capture_output=True, text=True, timeout=60, check=True)
    figure(f"tracing: span() without opentelemetry-api: {float(done.stdout):.3f} µs per call")
    assert observe.TRACING  # this venv has the extra; without it the no-op path ran above
    # With the API but no TracerProvider installed (no SDK), spans would record nothing: skipped too.
    assert observe.span("get_latest") is observe._NO_SPAN


def test_health_reports_each_part(dsn: str, redis_url: str) -> None:
    """ok on healthy servers; down without PostgreSQL; degraded when the relay is behind."""
    with TieredCache.connect(dsn, redis_url, near_max_entries=100, relay=True) as c:
        wait_until(c.listener.subscribed.is_set, 30, what="listener subscribed")  # type: ignore[union-attr]
        wait_until(lambda: health(c).status == "ok", 30, what="healthy")
        report = health(c)
        assert set(report.checks) == {"postgres", "redis", "owed_kills", "listener", "relay"}
        assert report.as_dict()["status"] == "ok"
        c.relay.stop()  # type: ignore[union-attr]
        c.store.write_cache(CT, SITE, "a", {"v": 1})  # a change that nothing applies now
        late = health(c, max_relay_lag=0.0)
        assert late.status == "degraded" and late.checks["relay"].count == 1
    dead = PostgresStore("postgresql://nobody@127.0.0.1:1/none", pool_timeout=0.5, connect_timeout=1)
    with TieredCache(dead, redis_client(redis_url), owns_clients=True) as c:
        report = health(c)
        assert report.status == "down" and not report.ok
        assert report.checks["postgres"].detail == StoreUnavailable.__name__


def test_facade_hook_reports_each_call(dsn: str, redis_url: str) -> None:
    """Wired: every public call is counted once by the tier that answered, errors and rejections included."""
    reg = CollectorRegistry()
    with TieredCache.connect(dsn, redis_url, near_max_entries=100) as c:
        wait_until(c.listener.subscribed.is_set, 30, what="listener subscribed")  # type: ignore[union-attr]
        cache_metrics(c, reg)
        req = "tiered_cache_requests_total"
        c.write_cache(CT, SITE, "a", {"v": 1})
        wait_until(lambda: c.listener.stats.messages >= 1, 30, what="own announcement heard")  # type: ignore[union-attr]
        c.get_latest(CT, SITE, "a")
        c.get_latest(CT, SITE, "a")
        c.get_latest(CT, SITE, SECRET)
        c.get_many(CT, SITE, ["a", SECRET])
        c.get_many(CT, SITE, ["a", "b"])
        c.get_many(CT, SITE, [])
        c.get_history(CT, SITE, "a")
        c.get_history(CT, SITE, "a")
        gen = c.set_generating(CT, SITE, "g")
        assert c.finalize_cache(gen, {"v": 2}) and not c.finalize_cache(10**9, {"v": 3})
        c.invalidate(CT, SITE, "a")
        c.invalidate_site(SITE)
        with pytest.raises(InvalidInput):
            c.get_latest(CT, "not-a-site", "a")  # type: ignore[arg-type]
        expected = {
            ("write_cache", "postgres", "ok"): 1, ("get_latest", "redis", "hit"): 1, ("get_latest", "near", "hit"): 1,
            ("get_latest", "postgres", "miss"): 1, ("get_many", "near", "hit"): 1, ("get_many", "postgres", "miss"): 1,
            ("get_many", "none", "ok"): 1, ("get_history", "postgres", "miss"): 1, ("get_history", "near", "hit"): 1,
            ("set_generating", "postgres", "ok"): 1, ("finalize_cache", "postgres", "ok"): 1,
            ("finalize_cache", "postgres", "miss"): 1, ("invalidate", "postgres", "ok"): 1,
            ("invalidate_site", "postgres", "ok"): 1, ("get_latest", "none", "invalid"): 1,
        }
        for op, tier, result in sorted(CALLS):
            assert _value(reg, req, op=op, tier=tier, result=result) == expected.get((op, tier, result), 0), (op, tier, result)
        assert _value(reg, "tiered_cache_request_duration_seconds_count", op="get_latest") == 4
    reg2 = CollectorRegistry()
    dead = PostgresStore("postgresql://nobody@127.0.0.1:1/none", pool_timeout=0.3, connect_timeout=1)
    with TieredCache(dead, redis_client(redis_url), owns_clients=True, metrics=TieredCacheMetrics(reg2)) as c:
        with pytest.raises(StoreUnavailable):  # PostgreSQL unreachable: counted as its error
            c.write_cache(CT, SITE, "a", {"v": 1})
    assert _value(reg2, "tiered_cache_requests_total", op="write_cache", tier="postgres", result="error") == 1


def test_steady_state_is_quiet_at_info(near_cache: TieredCache, caplog: pytest.LogCaptureFixture) -> None:
    """Writes, hits, misses and fills on healthy servers log nothing at INFO from any tiered_cache logger."""
    caplog.set_level(logging.INFO, logger="tiered_cache")
    _script(TieredCacheMetrics(CollectorRegistry()), near_cache)
    near_cache.set_generating(CT, SITE, "a")
    near_cache.invalidate_site(SITE)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("tiered_cache")] == []


def test_an_outage_logs_each_event_once(dsn: str, redis_url: str, redis_server: Any,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Redis down for many calls, then back as a new run: each event is logged once, with its fields."""
    caplog.set_level(logging.INFO, logger="tiered_cache.events")
    with TieredCache.connect(dsn, redis_url, near_max_entries=100) as c:
        wait_until(c.listener.subscribed.is_set, 30, what="listener subscribed")  # type: ignore[union-attr]
        c.get_latest(CT, SITE, "a")
        redis_server.stop()
        try:
            for i in range(20):
                c.write_cache(CT, SITE, f"k{i}", {"v": i})  # each kill is owed
                c.get_latest(CT, SITE, "a")
            wait_until(lambda: c.redis.breaker.trips >= 2, 30, what="a failed half-open probe")
        finally:
            redis_server.start()
        wait_until(lambda: c.redis.pending == 0 and c.redis.breaker.state == "closed", 60, what="kills drained")
        wait_until(c.listener.subscribed.is_set, 60, what="listener back")  # type: ignore[union-attr]
    events = [r for r in caplog.records if r.name == "tiered_cache.events"]
    names = [r.event for r in events]  # type: ignore[attr-defined]
    for once in ("breaker_opened", "kills_owed", "redis_restarted", "breaker_closed", "kills_drained",
                 "listener_lost", "listener_resubscribed"):
        assert names.count(once) == 1, names
    by = {r.event: r for r in events}  # type: ignore[attr-defined]
    assert by["kills_drained"].count >= 1 and by["kills_drained"].seconds > 0  # type: ignore[attr-defined]
    assert by["redis_restarted"].namespace == "tc" and by["redis_restarted"].detector == "connection"  # type: ignore[attr-defined]
    assert all(r.tier in ("redis", "near") and r.namespace for r in events if r.event != "relay_lagging")  # type: ignore[attr-defined]


def test_relay_reports_commit_to_redis_delay(dsn: str, redis_url: str) -> None:
    """Each batch the relay applies observes its oldest change's age when Redis confirmed it."""
    with PostgresStore(dsn) as store:
        store.write_cache(CT, SITE, "a", {"v": 1})
        time.sleep(0.05)  # the change is at least this old when applied
        store.write_cache(CT, SITE, "b", {"v": 1})
    client = redis_client(redis_url)
    relay = Relay(dsn, RedisTier(client, KeySpace("tc")))
    reg = CollectorRegistry()
    m = TieredCacheMetrics(reg)
    relay.on_delay = m.observe_relay_delay  # type: ignore[attr-defined]
    try:
        assert relay.catch_up() == 2
    finally:
        relay.stop()
        client.close()
    assert _value(reg, "tiered_cache_relay_delay_seconds_count") == 1  # one batch
    assert 0.05 <= _value(reg, "tiered_cache_relay_delay_seconds_sum") < 60  # type: ignore[operator]
