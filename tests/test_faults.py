"""Fault scenarios on servers owned by this module: Redis killed, flushed, slowed, blackholed, full;
PostgreSQL stopped; a process dying between its commit and its Redis update.

Each scenario runs once per API (the `api` fixture: TieredCache, and AsyncTieredCache behind tests/_apis.Blocking
on a real event loop; a spawned child uses its parent's API), prints its figures and ends with verify(cache). The staleness oracle (`analyse`): every
write_cache / invalidate logs when it started and returned, and right after it returned the caller
reads PostgreSQL's latest row of the key (a *fact*). A read that STARTED after a change returned must
reflect it: not a row older (by created_at, id) than the newest returned write, not None after it, not
a row an already returned invalidate had marked, unless an invalidate overlapped. Facts whose row was
written by a call that had not returned yet are only counted apart (the commit -> Redis window of a
write in flight, which the guarantee "after a write returned" does not cover). Clocks are
time.monotonic(), the system-wide CLOCK_MONOTONIC on Linux, so two processes' logs compare directly.
"""

from __future__ import annotations

import bisect
import contextvars
import itertools
import multiprocessing
import os
import random
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from _apis import connect_cache, target
from faultproxy import FaultProxy
from tiered_cache import StoreUnavailable, TieredCache, TieredCacheError, migrate
from tiered_cache.policy.entries import encode_entry
from tiered_cache.relay import Relay
from tiered_cache.testing import PostgresServer, RedisServer
from tiered_cache.verify import verify
from _util import pct, wait_until

CT = "app3_clue"
SITE = 11
NO_RETRY = Retry(NoBackoff(), 0)


# --------------------------------------------------------------------------- helpers




def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def outbox_count(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        return conn.execute("SELECT count(*) FROM biz.ai_cache_changes").fetchone()[0]  # type: ignore[index]


def settle(cache: TieredCache, dsn: str, timeout: float = 10.0) -> str:
    """Wait for the relay's outbox to drain, then (up to 3 s) for the owed kills and the breaker to close;
    returns the breaker's state (a breaker that never closes again is itself a finding, not a hang)."""
    wait_until(lambda: outbox_count(dsn) == 0, timeout, 0.05, "outbox drained")
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        cache.get_latest(CT, SITE, "settle-probe")
        if cache.redis.pending == 0 and cache.redis.breaker.state == "closed":
            break
        time.sleep(0.05)
    return cache.redis.breaker.state


def assert_verified(cache: TieredCache, figure: Callable[[str], None]) -> None:
    """verify(cache); if its breaker keeps it off Redis (nothing sampled), verify through a fresh client too."""
    report = verify(cache)
    figure(f"  verify: {report.summary()}")
    mismatches = list(report.mismatches)
    if report.sampled == 0 and cache.redis.breaker.state != "closed":
        kw = cache.redis.client.connection_pool.connection_kwargs
        with TieredCache.connect(cache.store.dsn, f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}") as fresh:
            again = verify(fresh)
        figure(f"  verify (fresh client, this cache's breaker is {cache.redis.breaker.state!r}): {again.summary()}")
        mismatches += again.mismatches
    assert not mismatches, mismatches


@dataclass
class Servers:
    pg: PostgresServer
    dsn: str
    rs: RedisServer


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """A PostgreSQL and a Redis of this module only: the scenarios kill, stop and flush them."""
    with PostgresServer() as pg, RedisServer() as rs:
        dsn = pg.create_database("tc_faults")
        migrate(dsn)
        yield Servers(pg, dsn, rs)


@pytest.fixture
def env(servers: Servers) -> Servers:
    """The module's servers running, tables emptied (without recording changes), Redis flushed."""
    if not servers.pg.running:
        servers.pg.start()
    if not servers.rs.running:
        servers.rs.start()
    with psycopg.connect(servers.dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("TRUNCATE biz.ai_cache, biz.ai_cache_changes, biz.ai_cache_relay_state, "
                     "biz.ai_cache_retention_dirty RESTART IDENTITY")
    client = redis.Redis.from_url(servers.rs.url)
    client.flushall()
    client.script_flush()
    client.close()
    return servers


# --------------------------------------------------------------------------- the fault proxy itself


def test_faultproxy_passes_delays_and_heals(env: Servers) -> None:
    """Pass-through, latency adds to each round trip, heal removes it; one thread whatever the traffic."""
    threads = threading.active_count()
    with FaultProxy(env.rs.port) as proxy:
        assert threading.active_count() == threads + 1
        c = redis.Redis(port=proxy.port, socket_timeout=2)
        c.set("fp", b"x" * 300_000)
        assert c.get("fp") == b"x" * 300_000
        proxy.latency(0.15)
        t0 = time.monotonic()
        c.ping()
        assert 0.15 <= time.monotonic() - t0 < 0.5
        proxy.heal()
        t0 = time.monotonic()
        c.ping()
        assert time.monotonic() - t0 < 0.05
        c.close()
    assert threading.active_count() == threads


def test_faultproxy_blackhole_and_reset(env: Servers) -> None:
    """Blackhole: connects, silence, times out; reset: current and new connections reset until heal."""
    with FaultProxy(env.rs.port) as proxy:
        c = redis.Redis(port=proxy.port, socket_timeout=0.2, socket_connect_timeout=0.2, retry=NO_RETRY)
        assert c.ping()
        proxy.blackhole()
        t0 = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            c.ping()
        assert time.monotonic() - t0 < 0.5
        fresh = redis.Redis(port=proxy.port, socket_timeout=0.2, socket_connect_timeout=0.2, retry=NO_RETRY)
        with pytest.raises(redis.TimeoutError):
            fresh.ping()  # the connect succeeds, the answer never comes
        proxy.heal()
        assert c.ping() and fresh.ping()
        proxy.reset()
        with pytest.raises(redis.ConnectionError):
            c.ping()
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=proxy.port, socket_timeout=0.2, retry=NO_RETRY).ping()
        assert proxy.active == 0 and proxy.refused >= 1
        proxy.heal()
        assert c.ping()
        c.close()
        fresh.close()


# --------------------------------------------------------------------------- workload + staleness oracle


@dataclass
class Plan:
    """What one process runs: picklable, so a spawned child gets the same plan."""

    dsn: str
    redis_url: str
    keys: list[str]
    api: str = "sync"
    tag: str = "p"
    writers: int = 3
    readers: int = 4
    invalidators: int = 1
    pad: int = 0
    many: int = 5  # get_many width; a fifth of reads are get_many
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    bulk_keys: list[str] = field(default_factory=list)
    bulk_writers: int = 0
    bulk_readers: int = 0
    bulk_pad: int = 0


def _state(row: dict[str, Any] | None) -> tuple[str, int] | None:
    return None if row is None else (row["created_at"], row["id"])


OWED_MARK: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("owed_mark", default=None)


def run_threads(cache: TieredCache, plan: Plan, start: float, stop: float) -> dict[str, Any]:
    """Run writers, invalidators and readers on plan.keys from start until stop; return their logs."""
    log: dict[str, Any] = {
        "writes": [], "facts": [], "invals": [], "reads": [], "read_errors": [], "write_errors": [],
        "bulk_ops": 0, "owed_outside_calls": 0, "tag": plan.tag,
    }
    counter = itertools.count()
    # Observation only (an instance attribute, the library is untouched): did this call leave a Redis kill
    # *owed* (queued for the background drainer) instead of applying it before returning? Each call carries
    # its own mark in a context variable: on the async API the tier runs on the event loop's thread, in a
    # task whose context is a copy of the calling thread's (call_soon_threadsafe copies it), so the mark
    # object the writer set is the one the owing code sets. Owing outside any call is counted: it must stay 0.
    owed_kills = target(cache.redis)._owed
    owe = owed_kills.owe

    def observed_owe(ks: Any) -> None:
        mark = OWED_MARK.get()
        if mark is None:
            log["owed_outside_calls"] += 1
        else:
            mark[0] = True
        owe(ks)

    owed_kills.owe = observed_owe  # type: ignore[method-assign]

    def fact(key: str, t_end: float) -> None:
        row = cache.store.get_latest(CT, SITE, key)  # PostgreSQL itself, right after the call returned
        log["facts"].append((t_end, time.monotonic(), key, _state(row)))

    def writer(i: int) -> None:
        rng = random.Random(f"{plan.seed}-{plan.tag}-w{i}")
        while time.monotonic() < stop:
            key = rng.choice(plan.keys)
            owed = [False]
            OWED_MARK.set(owed)
            t0 = time.monotonic()
            try:
                cid = cache.write_cache(CT, SITE, key, {"by": plan.tag, "n": next(counter), "pad": "x" * plan.pad})
            except Exception as exc:  # noqa: BLE001 - the log is the assertion
                log["write_errors"].append(f"{type(exc).__name__}: {exc}")
                continue
            t1 = time.monotonic()
            log["writes"].append((t0, t1, key, cid, owed[0]))
            fact(key, t1)

    def invalidator(i: int) -> None:
        rng = random.Random(f"{plan.seed}-{plan.tag}-i{i}")
        while time.monotonic() < stop:
            key = rng.choice(plan.keys)
            owed = [False]
            OWED_MARK.set(owed)
            t0 = time.monotonic()
            try:
                cache.invalidate(CT, SITE, key)
            except Exception as exc:  # noqa: BLE001
                log["write_errors"].append(f"invalidate {type(exc).__name__}: {exc}")
                continue
            t1 = time.monotonic()
            log["invals"].append((t0, t1, key, owed[0]))
            fact(key, t1)
            time.sleep(rng.uniform(0.005, 0.03))

    def reader(i: int) -> None:
        rng = random.Random(f"{plan.seed}-{plan.tag}-r{i}")
        while time.monotonic() < stop:
            many = rng.random() < 0.2
            keys = rng.sample(plan.keys, min(plan.many, len(plan.keys))) if many else [rng.choice(plan.keys)]
            t0 = time.monotonic()
            try:
                if many:
                    got = cache.get_many(CT, SITE, keys)
                else:
                    got = {keys[0]: cache.get_latest(CT, SITE, keys[0])}
            except Exception as exc:  # noqa: BLE001
                log["read_errors"].append(f"{type(exc).__name__}: {exc}")
                continue
            t1 = time.monotonic()
            for k in keys:
                log["reads"].append((t0, t1, k, _state(got[k])))

    def bulk_writer(i: int) -> None:
        rng = random.Random(f"{plan.seed}-{plan.tag}-bw{i}")
        while time.monotonic() < stop:
            try:
                cache.write_cache(CT, SITE, rng.choice(plan.bulk_keys), {"pad": "b" * plan.bulk_pad})
                log["bulk_ops"] += 1
            except Exception as exc:  # noqa: BLE001
                log["write_errors"].append(f"bulk {type(exc).__name__}: {exc}")

    def bulk_reader(i: int) -> None:
        rng = random.Random(f"{plan.seed}-{plan.tag}-br{i}")
        while time.monotonic() < stop:
            try:
                cache.get_many(CT, SITE, rng.sample(plan.bulk_keys, 20))
                log["bulk_ops"] += 1
            except Exception as exc:  # noqa: BLE001
                log["read_errors"].append(f"bulk {type(exc).__name__}: {exc}")

    def at_start(fn: Callable[[int], None], i: int) -> Callable[[], None]:
        def run() -> None:
            time.sleep(max(0.0, start - time.monotonic()))
            fn(i)
        return run

    roles = [(writer, plan.writers), (invalidator, plan.invalidators), (reader, plan.readers),
             (bulk_writer, plan.bulk_writers), (bulk_reader, plan.bulk_readers)]
    threads = [threading.Thread(target=at_start(fn, i), daemon=True) for fn, n in roles for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(stop - time.monotonic() + 30)
    return log


def child_main(plan: Plan, ready: Any, control: Any, results: Any) -> None:
    """A second process: its own cache of the plan's API (no relay), the same workload, its logs sent back."""
    cache = connect_cache(plan.api, plan.dsn, plan.redis_url, **plan.options)
    try:
        ready.set()
        start, stop = control.get(timeout=60)
        log = run_threads(cache, plan, start, stop)
        log["stats"] = cache.stats()
    finally:
        cache.close()
    results.put(log)


@dataclass
class Verdict:
    reads: int = 0
    judged: int = 0
    stale: list[dict[str, Any]] = field(default_factory=list)
    worst: float = 0.0
    writes: int = 0
    invals: int = 0
    ids: list[int] = field(default_factory=list)
    read_errors: list[str] = field(default_factory=list)
    write_errors: list[str] = field(default_factory=list)
    in_flight: int = 0  # reads older than a PostgreSQL fact whose change had committed but not yet returned


def analyse(logs: list[dict[str, Any]], created: dict[int, datetime]) -> Verdict:
    """Judge every read against every change of its key that had RETURNED before the read started.

    `created` maps each written id to its created_at (read from PostgreSQL at the end), so rows compare
    by (created_at, id), get_latest's own order. For a read that started at t0 and ended at t1:
    - W* = the newest (created_at, id) write of the key that returned before t0. A row older than W* is
      stale, and so is None, unless an invalidate of the key overlapped [start of W*, t1] (it may have
      hidden W*; a row committed after it may then be older than W*).
    - I = the invalidate of the key, returned before t0, that started last. A row whose own write returned
      before I started was invalidated by I and can never be served again: stale.
    The facts (PostgreSQL's latest right after each call returned) are checked too, but only count as
    "in flight": a fact may show a row whose write committed and has not returned yet (the window between
    a commit and its Redis update, which no cache can close for the writer's concurrent readers).
    """
    v = Verdict()
    writes: dict[str, list[tuple[float, float, int, bool, str]]] = defaultdict(list)
    invals: dict[str, list[tuple[float, float, bool, str]]] = defaultdict(list)
    facts: dict[str, list[tuple[float, Any]]] = defaultdict(list)
    write_end: dict[int, float] = {}
    for log in logs:
        for t0, t1, key, cid, owed in log["writes"]:
            writes[key].append((t1, t0, cid, owed, log["tag"]))
            write_end[cid] = t1
            v.ids.append(cid)
        for t0, t1, key, owed in log["invals"]:
            invals[key].append((t0, t1, owed, log["tag"]))
        for _, t_fact, key, st in log["facts"]:
            facts[key].append((t_fact, st))
        v.writes += len(log["writes"])
        v.invals += len(log["invals"])
        v.read_errors += log["read_errors"]
        v.write_errors += log["write_errors"]

    def ck(cid: int) -> tuple[datetime, int] | None:
        at = created.get(cid)
        return None if at is None else (at, cid)

    # per key: writes by return time with the running newest; invalidates by return time with the running
    # latest start; invalidates by start time with the running latest end (for overlap queries)
    w_ends, w_best, i_ends, i_last_start, i_starts, i_max_end, f_times = {}, {}, {}, {}, {}, {}, {}
    for key, ws in writes.items():
        ws.sort()
        best, bests = None, []
        for t1, t0, cid, owed, tag in ws:
            c = ck(cid)
            if c is not None and (best is None or c > best[0]):
                best = (c, t0, t1, owed, tag)
            bests.append(best)
        w_ends[key] = [w[0] for w in ws]
        w_best[key] = bests
    for key, spans in invals.items():
        by_end = sorted(spans, key=lambda s: s[1])
        i_ends[key] = [sp[1] for sp in by_end]
        last, out = None, []
        for sp in by_end:
            if last is None or sp[0] > last[0]:
                last = sp
            out.append(last)
        i_last_start[key] = out  # the invalidate that started last among those returned so far
        by_start = sorted(spans)
        i_starts[key] = [sp[0] for sp in by_start]
        running, maxes = float("-inf"), []
        for sp in by_start:
            running = max(running, sp[1])
            maxes.append(running)
        i_max_end[key] = maxes
    for key, fs in facts.items():
        fs.sort(key=lambda f: f[0])
        f_times[key] = [f[0] for f in fs]

    def overlapped(key: str, a: float, b: float) -> bool:
        """Some invalidate of key started before b and ended after a."""
        starts = i_starts.get(key)
        if not starts:
            return False
        j = bisect.bisect_left(starts, b)
        return j > 0 and i_max_end[key][j - 1] > a

    dates: dict[str, datetime] = {}

    def read_ck(got: tuple[str, int]) -> tuple[datetime, int]:
        created_at, cid = got
        dt = dates.get(created_at)
        if dt is None:
            dt = dates[created_at] = datetime.fromisoformat(created_at)
        return dt, cid

    for log in logs:
        for t0, t1, key, got in log["reads"]:
            v.reads += 1
            best = None
            j = bisect.bisect_right(w_ends.get(key, []), t0)
            if j:
                best = w_best[key][j - 1]
            k = bisect.bisect_right(i_ends.get(key, []), t0)
            inval = i_last_start[key][k - 1] if k else None
            if best is None and inval is None:
                continue
            v.judged += 1
            why, since, missed = "", 0.0, None
            if best is not None:
                (w_ck, w_start, w_end, w_owed, w_tag) = best
                if (got is None or read_ck(got) < w_ck) and not overlapped(key, w_start, t1):
                    why, since, missed = f"older than write {w_ck[1]}", w_end, (w_owed, w_tag)
            if not why and got is not None and inval is not None:
                if write_end.get(got[1], float("inf")) < inval[0]:
                    why, since, missed = "row hidden by an invalidate", inval[1], (inval[2], inval[3])
            if why:
                age = t0 - since
                v.worst = max(v.worst, age)
                v.stale.append({"key": key, "read_at": round(t0, 4), "got": got and got[1], "why": why,
                                "age": round(age, 4), "reader": log["tag"], "writer": missed[1],  # type: ignore[index]
                                "kill_owed": missed[0]})  # type: ignore[index]
                continue
            times = f_times.get(key)
            i = bisect.bisect_right(times, t0) - 1 if times else -1
            if i >= 0:
                truth = facts[key][i][1]
                if truth is not None and (got is None or read_ck(got) < read_ck(truth)) \
                        and not overlapped(key, facts[key][i][0], t1):
                    v.in_flight += 1
    return v


def judge(dsn: str, logs: list[dict[str, Any]]) -> Verdict:
    """analyse() with every written row's created_at read from PostgreSQL."""
    ids = [w[3] for log in logs for w in log["writes"]]
    with psycopg.connect(dsn, autocommit=True) as conn:
        created = dict(conn.execute("SELECT id, created_at FROM biz.ai_cache WHERE id = ANY(%s)", (ids,)).fetchall())
    return analyse(logs, created)


def lost_writes(dsn: str, ids: list[int]) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = conn.execute("SELECT count(*) FROM biz.ai_cache WHERE id = ANY(%s)", (ids,)).fetchone()[0]  # type: ignore[index]
    return len(set(ids)) - found


# --------------------------------------------------------------------------- Redis chaos, two processes


@pytest.mark.fault
@pytest.mark.slow
def test_chaos_redis_killed_flushed_scripts_flushed_two_processes(api: str, env: Servers,
                                                                  figure: Callable[[str], None]) -> None:
    """Writers, readers, invalidators in threads of two processes for ~15 s while Redis is SIGKILLed and
    restarted, FLUSHALLed and SCRIPT FLUSHed at random: no stale read after a write returned, no lost
    acknowledged write, no read error."""
    duration = 15.0
    keys = [f"chaos-{i}" for i in range(24)]
    child_plan = Plan(env.dsn, env.rs.url, keys, api, tag="child", seed=1, options={"relay": False})
    parent_plan = Plan(env.dsn, env.rs.url, keys, api, tag="parent", seed=2)
    ctx = multiprocessing.get_context("spawn")
    ready, control, results = ctx.Event(), ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=child_main, args=(child_plan, ready, control, results), name="chaos-child")
    child.start()
    cache = connect_cache(api, env.dsn, env.rs.url, relay=True)
    try:
        assert ready.wait(60), "child process did not start"
        start = time.monotonic() + 0.2
        stop = start + duration
        control.put((start, stop))
        events: list[tuple[float, str, float]] = []

        def chaos() -> None:
            rng = random.Random(7)
            admin = redis.Redis(port=env.rs.port, socket_timeout=1, socket_connect_timeout=1)
            kinds = ["kill", "flushall", "script_flush"] * 6
            order = kinds[:3]
            rng.shuffle(order)
            rest = kinds[3:]
            rng.shuffle(rest)
            plan = order + rest
            time.sleep(max(0.0, start - time.monotonic()) + rng.uniform(0.3, 0.8))
            for kind in plan:
                if time.monotonic() > stop - 1.0:
                    break
                t = time.monotonic()
                down = 0.0
                try:
                    if kind == "kill":
                        env.rs.kill()
                        time.sleep(rng.uniform(0.1, 0.6))
                        env.rs.start()
                        down = time.monotonic() - t
                    elif kind == "flushall":
                        admin.flushall()
                    else:
                        admin.script_flush()
                except redis.RedisError:
                    pass
                events.append((t - start, kind, down))
                time.sleep(rng.uniform(0.3, 1.0))
            admin.close()

        chaos_thread = threading.Thread(target=chaos, daemon=True)
        chaos_thread.start()
        parent_log = run_threads(cache, parent_plan, start, stop)
        parent_log["stats"] = cache.stats()
        chaos_thread.join(10)
        child_log = results.get(timeout=60)
        child.join(30)
        assert child.exitcode == 0
        if not env.rs.running:
            env.rs.start()
        verdict = judge(env.dsn, [parent_log, child_log])
        lost = lost_writes(env.dsn, verdict.ids)
        kinds = defaultdict(int)
        for _, k, _ in events:
            kinds[k] += 1
        downs = [d for _, k, d in events if k == "kill"]
        figure(f"{api}: chaos {duration:.0f} s, 2 processes x (3 writers, 4 readers, 1 invalidator) on {len(keys)} keys: "
               f"{verdict.writes} writes, {verdict.invals} invalidates, {verdict.reads} key reads "
               f"({verdict.judged} judged: a write or invalidate of the key had returned before they started)")
        figure(f"  chaos events: {dict(kinds)}; Redis down per kill: "
               f"{', '.join(f'{d * 1000:.0f}' for d in downs)} ms")
        figure(f"  stale reads after a write returned: {len(verdict.stale)}; worst staleness "
               f"{ms(verdict.worst)} (read start - return of the write/invalidate it missed); acknowledged writes "
               f"lost: {lost}; read errors: {len(verdict.read_errors)}; write errors: {len(verdict.write_errors)}")
        owed_calls = sum(w[4] for log in (parent_log, child_log) for w in log["writes"]) + \
            sum(i[3] for log in (parent_log, child_log) for i in log["invals"])
        outside = parent_log["owed_outside_calls"] + child_log["owed_outside_calls"]
        figure(f"  calls that returned with their kill owed: {owed_calls}; kills owed outside any logged call: {outside}")
        figure(f"  (not counted: {verdict.in_flight} reads older than PostgreSQL's latest at a logged fact whose own "
               f"write had committed but not yet returned: the commit -> Redis window)")
        for tag, log in (("parent", parent_log), ("child", child_log)):
            s = log["stats"]["redis"]
            figure(f"  {tag} redis tier: hits {s['hits']} misses {s['misses']} fills {s['fills']} refused "
                   f"{s['fills_refused']} errors {s['errors']} skipped {s['skipped']} breaker trips "
                   f"{s['breaker_trips']}" + (f"; relay {log['stats']['relay']}" if "relay" in log["stats"] else ""))
        if verdict.stale:
            owed = sum(1 for x in verdict.stale if x["kill_owed"])
            cross = sum(1 for x in verdict.stale if x["reader"] != x["writer"])
            figure(f"  of the stale reads: {owed} missed a change whose Redis kill was only *owed* when its call "
                   f"returned (lease skipped: breaker open/half-open or Redis down); {cross} read in the other "
                   f"process than the writer's; first: {verdict.stale[:4]}")
        state = settle(cache, env.dsn)
        if state != "closed":
            figure(f"  parent's breaker still {state!r} 3 s after the chaos ended")
        assert_verified(cache, figure)
        assert kinds["kill"] >= 1 and kinds["flushall"] >= 1 and kinds["script_flush"] >= 1
        assert verdict.judged > 1000
        assert not verdict.read_errors, verdict.read_errors[:5]
        assert not verdict.write_errors, verdict.write_errors[:5]
        assert lost == 0
        assert outside == 0, "a kill was owed that no call's mark saw: the owed-window excuse would be blind"
        # A change whose post-commit kill got no answer within redis_timeout (Redis down, or a machine so busy a
        # reply came late) is owed: its own process reads Redis only after the kill lands, another process may
        # serve the old row until the drainer or the relay lands it. That window is bounded, not zero.
        owed_window = [x for x in verdict.stale if x["kill_owed"] and x["reader"] != x["writer"]]
        stale = [x for x in verdict.stale if x not in owed_window]
        if owed_window:
            figure(f"  owed-kill window (another process, before the drainer or relay landed the kill): "
                   f"{len(owed_window)} reads, worst {ms(max(x['age'] for x in owed_window))}")
        assert all(x["age"] < 1.0 for x in owed_window), owed_window[:3]
        assert not stale, f"{len(stale)} stale reads after a write returned, e.g. {stale[:3]}"
    finally:
        cache.close()
        if child.is_alive():
            child.kill()
        if not env.rs.running:
            env.rs.start()


# --------------------------------------------------------------------------- PostgreSQL stopped


@pytest.mark.fault
@pytest.mark.slow
def test_postgres_stopped_reads_from_redis_writes_fail_cleanly_pool_recovers(api: str, env: Servers,
                                                                             figure: Callable[[str], None]) -> None:
    """PostgreSQL down for a few seconds: cached reads keep working, writes fail with StoreUnavailable in about
    pool_timeout and leave no row and no Redis change; after the restart the same TieredCache writes again."""
    pool_timeout = 1.0
    keys = [f"pgdown-{i}" for i in range(20)]
    cache = connect_cache(api, env.dsn, env.rs.url, relay=True, pool_timeout=pool_timeout, connect_timeout=1)
    direct = redis.Redis.from_url(env.rs.url)
    problems: list[str] = []
    try:
        for k in keys:
            cache.write_cache(CT, SITE, k, {"v": 1})
        settle(cache, env.dsn)
        before = cache.get_many(CT, SITE, keys)
        assert all(before[k] is not None for k in keys)
        entries = {k: direct.get(cache.keys.entry(CT, SITE, k)) for k in keys}
        assert all(entries.values())

        t_stop = time.monotonic()
        env.pg.stop("fast")
        stopped_for = time.monotonic() - t_stop
        # cached reads: served by Redis
        read_times = []
        for _ in range(5):
            for k in keys:
                t0 = time.monotonic()
                row = cache.get_latest(CT, SITE, k)
                read_times.append(time.monotonic() - t0)
                assert row == before[k]
            t0 = time.monotonic()
            assert cache.get_many(CT, SITE, keys) == before
            read_times.append(time.monotonic() - t0)
        # writes: fail clearly within about pool_timeout, for a cached key
        victim = keys[0]
        write_times = []
        for attempt in range(3):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                cache.write_cache(CT, SITE, victim, {"v": "during-outage", "attempt": attempt})
            write_times.append(time.monotonic() - t0)
            assert isinstance(info.value, TieredCacheError)
        after_entry = direct.get(cache.keys.entry(CT, SITE, victim))
        if after_entry != entries[victim]:
            problems.append(f"failed write changed Redis: entry of {victim!r} was {entries[victim]!r:.60}, "
                            f"now {after_entry!r:.60}")
        try:
            t0 = time.monotonic()
            row = cache.get_latest(CT, SITE, victim)
            if row != before[victim]:
                problems.append(f"read of {victim!r} after the failed write returned {row!r:.80}")
        except TieredCacheError as exc:
            problems.append(f"read of {victim!r} after the failed write raised {type(exc).__name__} after "
                            f"{ms(time.monotonic() - t0)}: the failed write evicted a key PostgreSQL cannot refill")
        other_ok = all(cache.get_latest(CT, SITE, k) == before[k] for k in keys[1:])
        outage_len = time.monotonic() - t_stop
        time.sleep(max(0.0, 3.0 - outage_len))

        t_restart = time.monotonic()
        env.pg.start()
        t_up = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                new_id = cache.write_cache(CT, SITE, keys[1], {"v": 2})
                break
            except StoreUnavailable:
                if time.monotonic() - t_up > 30:
                    raise
                time.sleep(0.05)
        t_ok = time.monotonic()
        row = cache.get_latest(CT, SITE, keys[1])
        assert row is not None and row["id"] == new_id and row["result_json"] == {"v": 2}
        with psycopg.connect(env.dsn, autocommit=True) as conn:
            half_done = conn.execute(
                "SELECT count(*) FROM biz.ai_cache WHERE result_json->>'v' = 'during-outage'").fetchone()[0]  # type: ignore[index]
        figure(f"{api}: postgres stopped ({ms(stopped_for)} to stop) for {t_restart - t_stop:.1f} s: "
               f"{len(read_times)} cached reads p50 {ms(statistics.median(read_times))} max {ms(max(read_times))}, "
               f"0 errors; writes failed with StoreUnavailable after "
               f"{', '.join(ms(w) for w in write_times)} (pool_timeout {pool_timeout:.1f} s); rows left by them: {half_done}")
        figure(f"  recovery: server start took {ms(t_up - t_restart)}; first successful write {ms(t_ok - t_up)} after "
               f"the server answered ({ms(t_ok - t_restart)} after start was called), {attempts} attempts, same TieredCache")
        if problems:
            figure("  PROBLEMS: " + " | ".join(problems))
        assert half_done == 0
        assert other_ok
        settle(cache, env.dsn)
        assert_verified(cache, figure)
        assert max(write_times) < pool_timeout + 0.5, f"writes failed after {write_times} s"
        assert not problems, problems
    finally:
        if not env.pg.running:
            env.pg.start()
        cache.close()
        direct.close()


# --------------------------------------------------------------------------- Redis slow, then blackholed


LOAD_THREAD = "fault-load-"


def _timed_load(cache: TieredCache, keys: list[str], seconds: float, threads: int, *, store_only: bool = False,
                errors: list[str] | None = None) -> dict[str, list[float]]:
    """Threads doing get_latest (70%), get_many (20%) and write_cache (10%); every call's duration, by kind."""
    stop = time.monotonic() + seconds
    durations: dict[str, list[float]] = {"get_latest": [], "get_many": [], "write_cache": []}
    target = cache.store if store_only else cache

    def run(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < stop:
            x = rng.random()
            kind = "get_latest" if x < 0.7 else "get_many" if x < 0.9 else "write_cache"
            t0 = time.monotonic()
            try:
                if kind == "get_latest":
                    target.get_latest(CT, SITE, rng.choice(keys))
                elif kind == "get_many":
                    target.get_many(CT, SITE, rng.sample(keys, 5))
                else:
                    target.write_cache(CT, SITE, rng.choice(keys), {"i": i})
            except Exception as exc:  # noqa: BLE001
                if errors is not None:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            durations[kind].append(time.monotonic() - t0)

    ts = [threading.Thread(target=run, args=(i,), name=f"{LOAD_THREAD}{i}", daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 30)
    return durations


def _library_threads() -> int:
    """Live threads other than this test's load generators."""
    return sum(1 for t in threading.enumerate() if not t.name.startswith(LOAD_THREAD))


def _all(d: dict[str, list[float]]) -> list[float]:
    return [x for v in d.values() for x in v]


@pytest.mark.fault
@pytest.mark.slow
def test_redis_slow_then_blackholed_calls_stay_bounded(api: str, env: Servers, figure: Callable[[str], None]) -> None:
    """200 ms of latency, then a blackhole, between the cache and Redis: with redis_timeout=0.05 every call
    costs at most about the timeout plus its PostgreSQL time; threads and connections do not pile up."""
    timeout = 0.05
    threads = 6
    keys = [f"slow-{i}" for i in range(50)]
    proxy = FaultProxy(env.rs.port).start()
    admin = redis.Redis.from_url(env.rs.url)
    cache = connect_cache(api, env.dsn, f"redis://127.0.0.1:{proxy.port}/0", relay=True, redis_timeout=timeout)
    errors: list[str] = []
    try:
        for k in keys:
            cache.write_cache(CT, SITE, k, {"v": 0})
        settle(cache, env.dsn)
        pg = _timed_load(cache, keys, 2.0, threads, store_only=True)
        healthy = _timed_load(cache, keys, 2.0, threads, errors=errors)
        settle(cache, env.dsn)
        threads_before = _library_threads()
        names_before = {t.name for t in threading.enumerate()}
        clients_before = admin.info("clients")["connected_clients"]
        pool_cap = cache.redis.client.connection_pool.max_connections
        proxy.max_active = proxy.active
        peak_threads = threads_before
        done = threading.Event()

        def sample_threads() -> None:
            nonlocal peak_threads
            while not done.is_set():
                peak_threads = max(peak_threads, _library_threads() - 1)  # minus this sampler
                time.sleep(0.02)

        sampler = threading.Thread(target=sample_threads, daemon=True)
        sampler.start()
        proxy.latency(0.2)
        slow = _timed_load(cache, keys, 3.0, threads, errors=errors)
        peak_proxy_slow = proxy.max_active
        proxy.blackhole()
        hole = _timed_load(cache, keys, 3.0, threads, errors=errors)
        done.set()
        sampler.join()
        peak_proxy = proxy.max_active
        proxy.heal()
        breaker_after = settle(cache, env.dsn)
        pg_after = _timed_load(cache, keys, 2.0, threads, store_only=True)  # PostgreSQL's time may drift under load
        wait_until(lambda: admin.info("clients")["connected_clients"] <= clients_before + 2, 5, 0.05,
                   "Redis connections back to their level")
        deadline = time.monotonic() + 3.0  # the owed-kill drainer exits within its 1 s backoff once nothing is owed
        while _library_threads() > threads_before and time.monotonic() < deadline:
            time.sleep(0.05)
        threads_after = _library_threads()
        extra = sorted({t.name for t in threading.enumerate()} - names_before)
        clients_after = admin.info("clients")["connected_clients"]
        # The bound the issue sets, plus 25 ms for the scheduler: client, proxy and both servers share 2 cores,
        # and a p99 measured in one phase is only an estimate of the PostgreSQL time in the next (so the larger
        # of the phases before and after the faults). What it must catch is far larger: a call paying the
        # 200 ms latency, or a blackholed socket's seconds.
        bound = timeout + max(pct(_all(pg), 99), pct(_all(pg_after), 99)) + 0.025
        for name, d in (("postgres only", pg), ("healthy", healthy), ("latency 200 ms", slow), ("blackhole", hole)):
            every = _all(d)
            kinds = ", ".join(f"{k} p99 {ms(pct(v, 99))} max {ms(max(v))}" for k, v in d.items() if v)
            figure(f"{api}: redis {name:>14}: {len(every):6d} calls, p50 {ms(statistics.median(every))}, p99 "
                   f"{ms(pct(every, 99))}, max {ms(max(every))} ({kinds})")
        s = cache.stats()["redis"]
        figure(f"  bound = redis_timeout + PostgreSQL p99 + 25 ms scheduling slack = {ms(bound)}; library threads {threads_before} before, "
               f"peak {peak_threads} during, {threads_after} after; proxied connections peak {peak_proxy_slow} "
               f"slow / {peak_proxy} blackhole (pool cap {pool_cap}); Redis clients {clients_before} before, "
               f"{clients_after} after; breaker trips {s['breaker_trips']}, skipped {s['skipped']}, errors "
               f"{s['errors']}; caller errors {len(errors)}")
        figure(f"  3 s after heal: breaker {breaker_after!r}, owed kills {cache.redis.pending}, threads added since "
               f"before the faults: {extra}")
        assert not errors, errors[:5]
        assert pct(_all(slow), 99) < bound
        assert pct(_all(hole), 99) < bound
        assert peak_threads <= threads_before + 1  # at most the owed-kill drainer
        assert threads_after <= threads_before
        assert peak_proxy <= pool_cap
        assert clients_after <= clients_before + 2
        assert_verified(cache, figure)
    finally:
        cache.close()
        proxy.close()
        admin.close()


@pytest.mark.fault
def test_breaker_probe_taken_by_a_write_does_not_strand_redis(api: str, env: Servers,
                                                              figure: Callable[[str], None]) -> None:
    """After an outage, the first call to Redis once breaker_reset has passed is the half-open probe. When that
    call is a write (its lease), the breaker must still close again, and the write must reach other processes."""
    proxy = FaultProxy(env.rs.port).start()
    # A reaches Redis through the proxy (its outage); B, "another process", reaches it directly. No relay:
    # this is about the cache's own write path.
    a = connect_cache(api, env.dsn, f"redis://127.0.0.1:{proxy.port}/0", breaker_reset=0.3)
    b = connect_cache(api, env.dsn, env.rs.url)
    try:
        v1 = a.write_cache(CT, SITE, "probe", {"v": 1})
        assert b.get_latest(CT, SITE, "probe")["id"] == v1  # type: ignore[index]
        assert b.redis.stats.hits == 1  # served from Redis
        proxy.reset()
        for _ in range(3):
            assert a.get_latest(CT, SITE, "probe")["id"] == v1  # type: ignore[index]  # from PostgreSQL
        assert a.redis.breaker.state == "open"
        proxy.heal()
        time.sleep(0.35)
        v2 = a.write_cache(CT, SITE, "probe", {"v": 2})  # its lease_for_write is the half-open probe
        state_after_write = a.redis.breaker.state
        seen_by_b = b.get_latest(CT, SITE, "probe")["id"]  # type: ignore[index]
        hits0, skipped0 = a.redis.stats.hits, a.redis.stats.skipped
        deadline = time.monotonic() + 1.5  # five breaker_reset periods
        while time.monotonic() < deadline:
            a.get_latest(CT, SITE, "probe")
            time.sleep(0.02)
        time.sleep(0.2)
        seen_by_b_later = b.get_latest(CT, SITE, "probe")["id"]  # type: ignore[index]
        figure(f"{api}: breaker probe taken by a write: breaker {state_after_write!r} after the write, "
               f"{a.redis.breaker.state!r} 1.5 s later; A's reads in those 1.5 s: {a.redis.stats.hits - hits0} from "
               f"Redis, {a.redis.stats.skipped - skipped0} skipped it; owed kills {a.redis.pending}; "
               f"B read id {seen_by_b} right after A's write of {v2} returned and {seen_by_b_later} 1.7 s later (v1={v1})")
        assert seen_by_b == v2, "another process read the old row after write_cache returned"
        assert a.redis.breaker.state == "closed", "Redis answers, but the breaker never closed again"
        assert a.redis.stats.hits > hits0
        assert_verified(a, figure)
    finally:
        a.close()
        b.close()
        proxy.close()


# --------------------------------------------------------------------------- Redis full


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["allkeys-lru", "noeviction"])
def test_redis_at_maxmemory_no_stale_reads(api: str, env: Servers, policy: str, figure: Callable[[str], None]) -> None:
    """Redis capped at 2 MB and filled far past it with many keys while the same hot keys are written and read:
    no stale read (leases may be evicted or refused), every call succeeds."""
    duration = 6.0
    hot = [f"hot-{i}" for i in range(30)]
    bulk = [f"bulk-{i}" for i in range(3000)]
    with RedisServer(maxmemory="2mb", maxmemory_policy=policy) as rs:
        plan = Plan(env.dsn, rs.url, hot, api, tag=policy, writers=2, readers=3, invalidators=1, pad=200,
                    bulk_keys=bulk, bulk_writers=2, bulk_readers=2, bulk_pad=1500)
        cache = connect_cache(api, env.dsn, rs.url, relay=True)
        admin = redis.Redis.from_url(rs.url)
        try:
            start = time.monotonic() + 0.1
            peak = [0]
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], admin.info("memory")["used_memory"])
                    time.sleep(0.1)

            w = threading.Thread(target=watch, daemon=True)
            w.start()
            log = run_threads(cache, plan, start, start + duration)
            done.set()
            w.join()
            verdict = judge(env.dsn, [log])
            info = admin.info()
            s = cache.stats()["redis"]
            figure(f"{api}: maxmemory 2mb {policy}: {verdict.writes} hot writes, {verdict.invals} invalidates, {verdict.reads} "
                   f"hot key reads ({verdict.judged} judged), {log['bulk_ops']} bulk calls over {len(bulk)} keys x 1.5 KB; "
                   f"peak used_memory {peak[0] / 1e6:.2f} MB, evicted_keys {info['evicted_keys']}, keys now "
                   f"{info.get('db0', {}).get('keys', 0)}")
            figure(f"  stale reads {len(verdict.stale)} (worst {ms(verdict.worst)}; {verdict.in_flight} in the commit -> "
                   f"Redis window, not counted); read errors {len(verdict.read_errors)}; "
                   f"write errors {len(verdict.write_errors)}; redis tier hits {s['hits']} fills {s['fills']} refused "
                   f"{s['fills_refused']} errors {s['errors']} (OOM answers) pending kills {s['pending_kills']}")
            if verdict.stale:
                figure(f"  first stale reads: {verdict.stale[:5]}")
            assert peak[0] > 1.5e6
            assert not verdict.read_errors, verdict.read_errors[:5]
            assert not verdict.write_errors, verdict.write_errors[:5]
            stale = len(verdict.stale)
            assert stale == 0, f"{stale} stale reads, e.g. {verdict.stale[:3]}"
            assert lost_writes(env.dsn, verdict.ids) == 0
            settle(cache, env.dsn)
            assert_verified(cache, figure)
        finally:
            cache.close()
            admin.close()


# --------------------------------------------------------------------------- crash between commit and Redis update


def crash_child(api: str, dsn: str, redis_url: str, key: str, ready: Any, go: Any, out_path: str) -> None:
    """Write v1 through a cache of `api`; on `go`, write v2 with the Redis update replaced by a crash (after the commit)."""
    from tiered_cache._async.redis_tier import AsyncRedisTier
    from tiered_cache.tiers.redis import RedisTier

    cache = connect_cache(api, dsn, redis_url)
    v1 = cache.write_cache(CT, SITE, key, {"v": 1})
    with open(out_path, "w") as f:
        f.write(f"{v1}\n")
    ready.set()
    if not go.wait(60):
        os._exit(3)

    def crash(self: Any, ks: Any, token: Any, latest: Any, txid: Any = None) -> None:
        # PostgreSQL has committed v2: record it, and die before Redis hears of it
        with open(out_path, "a") as f:
            f.write(f"{latest['id']} {time.monotonic()!r}\n")
            f.flush()
            os.fsync(f.fileno())
        os._exit(1)

    async def crash_async(self: Any, ks: Any, token: Any, latest: Any, txid: Any = None) -> None:
        crash(self, ks, token, latest, txid)

    if api == "sync":
        RedisTier.write_through = crash  # type: ignore[method-assign]
    else:
        AsyncRedisTier.write_through = crash_async  # type: ignore[method-assign]
    cache.write_cache(CT, SITE, key, {"v": 2})
    os._exit(2)  # not reached


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize("relay_running", [True, False], ids=["relay-running", "relay-started-1s-later"])
def test_crash_between_commit_and_redis_update(api: str, env: Servers, relay_running: bool, tmp_path: Any,
                                               figure: Callable[[str], None]) -> None:
    """A process commits v2 and dies before touching Redis, where v1 is cached: the relay removes the stale entry."""
    key = f"crash-{relay_running}"
    out = tmp_path / "child.txt"
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    cache = connect_cache(api, env.dsn, env.rs.url, relay=relay_running)
    direct = redis.Redis.from_url(env.rs.url)
    entry = cache.keys.entry(CT, SITE, key)
    relay: Relay | None = None
    child = ctx.Process(target=crash_child, args=(api, env.dsn, env.rs.url, key, ready, go, str(out)))
    child.start()
    try:
        assert ready.wait(60)
        v1 = int(out.read_text().split()[0])
        if relay_running:
            wait_until(lambda: outbox_count(env.dsn) == 0, 5)  # the relay also applies v1's own change row
        else:
            with psycopg.connect(env.dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM biz.ai_cache_changes")  # v1's row: already reflected in Redis
        row = cache.get_latest(CT, SITE, key)
        assert row is not None and row["id"] == v1
        v1_raw = direct.get(entry)
        assert v1_raw == encode_entry(row)
        gone_at: list[float] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                if direct.get(entry) != v1_raw:
                    gone_at.append(time.monotonic())
                    return
                time.sleep(0.0005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        go.set()
        child.join(30)
        t_death = time.monotonic()
        assert child.exitcode == 1, f"child exit code {child.exitcode}"
        lines = out.read_text().split("\n")
        v2_text, t_commit_text = lines[1].split()
        v2, t_commit = int(v2_text), float(t_commit_text)
        stale_reads_seen = 0
        if not relay_running:
            time.sleep(1.0)
            still = direct.get(entry) == v1_raw
            row = cache.get_latest(CT, SITE, key)
            stale_reads_seen = int(row is not None and row["id"] == v1)
            assert still and stale_reads_seen, "without a relay nothing else could have removed it"
            relay = Relay(env.dsn, cache.redis, name="late").start()
        watcher.join(10)
        stop.set()
        assert gone_at, "the stale v1 entry was never removed"
        row = cache.get_latest(CT, SITE, key)
        assert row is not None and row["id"] == v2 and row["result_json"] == {"v": 2}
        figure(f"{api}: crash after commit ({'relay running' if relay_running else 'relay started 1 s later'}): stale v1 entry "
               f"stayed {ms(gone_at[0] - t_commit)} after v2's commit, "
               f"{ms(gone_at[0] - t_death)} relative to the child's death being noticed "
               f"(negative: gone before); stale reads served meanwhile by this test: {stale_reads_seen}")
        settle(cache, env.dsn)
        assert_verified(cache, figure)
    finally:
        if relay is not None:
            relay.stop()
        if child.is_alive():
            child.kill()
        cache.close()
        direct.close()
