"""Never stale after a write returns, on both APIs: deterministic interleavings and a randomized multi-thread stress run."""

from __future__ import annotations

import bisect
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
import redis

from _apis import new_cache, new_redis_client, open_store, with_hooks
from tiered_cache import AsyncPostgresStore, PostgresStore, TieredCache

CT = "app3_clue"
SITE = 101
WAIT = 10.0  # seconds any step may take before the test calls it hung


class PausePoints:
    """Named pause points of a store: when armed, the next call passing one stops there until the test releases it."""

    def __init__(self, dsn: str, **options: Any) -> None:
        super().__init__(dsn, **options)  # type: ignore[call-arg]
        self._points: dict[str, tuple[threading.Event, threading.Event]] = {}
        self._all_releases: list[threading.Event] = []

    def arm(self, point: str) -> tuple[threading.Event, threading.Event]:
        """Pause the next call that passes `point`; returns (reached, release)."""
        events = (threading.Event(), threading.Event())
        self._points[point] = events
        self._all_releases.append(events[1])
        return events

    def _hold(self, point: str) -> None:
        events = self._points.pop(point, None)
        if events is not None:
            events[0].set()
            if not events[1].wait(WAIT):
                raise RuntimeError(f"{point}: never released")

    def release_all(self) -> None:
        for ev in self._all_releases:
            ev.set()


def _at(point: str) -> Callable[..., None]:
    return lambda store, *_: store._hold(point)


# Reads pause after PostgreSQL answered, i.e. between the snapshot and the Redis fill. Writes pause before their
# statement (lease already taken) and after their commit (before write-through).
PAUSES = {
    "get_latest": (None, _at("get_latest")),
    "fetch_many": (None, _at("fetch_many")),
    "get_history": (None, _at("get_history")),
    "write": (_at("write:before"), _at("write:after")),
    "finalize": (_at("finalize:before"), _at("finalize:after")),
    "invalidate_outcome": (_at("invalidate:before"), _at("invalidate:after")),
    "invalidate_site_keys": (_at("invalidate_site:before"), _at("invalidate_site:after")),
}
PAUSING = {base: with_hooks(base, PAUSES, f"Pausing{base.__name__}", (PausePoints,))
           for base in (PostgresStore, AsyncPostgresStore)}


def store_base(api: str) -> type:
    return PostgresStore if api == "sync" else AsyncPostgresStore


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as ex:
        yield ex


@pytest.fixture
def make_paused(api: str, dsn: str, redis_url: str) -> Iterator[Callable[[], TieredCache]]:
    """Build caches of the API under test over a pausing store (another process each); all released and closed after."""
    made: list[tuple[TieredCache, Any]] = []

    def make() -> TieredCache:
        store = open_store(api, PAUSING[store_base(api)], dsn)
        cache = new_cache(api, store, new_redis_client(api, redis_url), owns_clients=True)
        made.append((cache, store))
        return cache

    yield make
    for cache, store in made:
        store.release_all()
        cache.close()


@pytest.fixture
def writer(dsn: str, redis_url: str, make_cache: Callable[..., TieredCache]) -> TieredCache:
    return make_cache(dsn, redis_url)


def entry_of(r: redis.Redis, cache: TieredCache, target: str) -> Any:
    raw = r.get(cache.keyset(CT, SITE, target).entry)
    return "ABSENT" if raw is None else orjson.loads(raw)


def ident(row: dict[str, Any] | None) -> int | None:
    return None if row is None else row["id"]


def wait(ev: threading.Event, what: str) -> None:
    assert ev.wait(WAIT), f"never reached: {what}"


# -- a reader paused between its PostgreSQL read and its Redis fill -----------------------------


@dataclass
class Change:
    """A change made while the reader is paused, and what get_latest of 'k' must return after it."""

    name: str
    apply: Callable[[TieredCache, dict[str, int]], Any]
    expect: Callable[[dict[str, int]], int | None]


CHANGES = {
    "write_cache": Change("write_cache", lambda c, ids: ids.__setitem__("new", c.write_cache(CT, SITE, "k", {"v": 2})),
                          lambda ids: ids["new"]),
    "finalize_cache": Change("finalize_cache",
                             lambda c, ids: c.finalize_cache(ids["gen"], {"v": "final"}) or pytest.fail("not finalized"),
                             lambda ids: ids["gen"]),
    "invalidate": Change("invalidate", lambda c, ids: c.invalidate(CT, SITE, "k") == 1 or pytest.fail("count"),
                         lambda ids: None),
    "invalidate_site": Change("invalidate_site", lambda c, ids: c.invalidate_site(SITE) >= 1 or pytest.fail("count"),
                              lambda ids: None),
}


def _seed(store: PostgresStore) -> dict[str, int]:
    """k has a valid row v1 and a placeholder; 'other' has a row too. PostgreSQL only: Redis starts cold."""
    ids = {"v1": store.write_cache(CT, SITE, "k", {"v": 1})}
    ids["gen"] = store.set_generating(CT, SITE, "k")
    ids["other"] = store.write_cache(CT, SITE, "other", {"v": "other"})
    return ids


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_paused_get_latest_fill_is_refused_after_a_change(change: str, make_paused: Callable[[], TieredCache],
                                                          writer: TieredCache, r: redis.Redis,
                                                          pool: ThreadPoolExecutor) -> None:
    """A get_latest that read PostgreSQL before a change returned may not fill Redis after it; the next read is new."""
    ids = _seed(writer.store)
    reader = make_paused()
    reached, release = reader.store.arm("get_latest")  # type: ignore[attr-defined]
    fut = pool.submit(reader.get_latest, CT, SITE, "k")
    wait(reached, "reader's PostgreSQL read")
    assert r.exists(reader.keyset(CT, SITE, "k").lease) == 1, "the reader leased before reading"
    CHANGES[change].apply(writer, ids)  # committed and returned
    expected = CHANGES[change].expect(ids)
    release.set()
    assert ident(fut.result(WAIT)) == ids["v1"]  # its snapshot predates the change: fine, it started before
    assert reader.redis.stats.fills_refused == 1 and reader.redis.stats.fills == 0
    stored = entry_of(r, reader, "k")
    assert stored == "ABSENT" or ident(stored) == expected
    assert ident(reader.get_latest(CT, SITE, "k")) == expected
    assert ident(writer.get_latest(CT, SITE, "k")) == expected
    assert ident(writer.store.get_latest(CT, SITE, "k")) == expected


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_paused_get_many_fill_is_refused_only_for_the_changed_cell(change: str,
                                                                   make_paused: Callable[[], TieredCache],
                                                                   writer: TieredCache, r: redis.Redis,
                                                                   pool: ThreadPoolExecutor) -> None:
    """A get_many paused in fetch_many has its fill of a changed cell refused; unchanged cells still fill."""
    ids = _seed(writer.store)
    if change == "invalidate_site":
        writer.store.invalidate(CT, SITE, "other")  # keep 'other' unchanged by the site-wide invalidation
        ids["other"] = None  # type: ignore[assignment]
    reader = make_paused()
    reached, release = reader.store.arm("fetch_many")  # type: ignore[attr-defined]
    fut = pool.submit(reader.get_many, CT, SITE, ["k", "other"])
    wait(reached, "reader's PostgreSQL read")
    CHANGES[change].apply(writer, ids)
    expected = CHANGES[change].expect(ids)
    release.set()
    got = fut.result(WAIT)
    assert ident(got["k"]) == ids["v1"] and ident(got["other"]) == ids["other"]
    if change == "invalidate_site":  # it drops every key of the site that has a row: 'other' too
        assert reader.redis.stats.fills_refused == 2 and reader.redis.stats.fills == 0
    else:
        assert reader.redis.stats.fills_refused == 1 and reader.redis.stats.fills == 1
        assert ident(entry_of(r, reader, "other")) == ids["other"]
    stored = entry_of(r, reader, "k")
    assert stored == "ABSENT" or ident(stored) == expected
    again = reader.get_many(CT, SITE, ["k", "other"])
    assert ident(again["k"]) == expected and ident(again["other"]) == ids["other"]
    assert again == writer.store.get_many(CT, SITE, ["k", "other"])


HISTORY_CHANGES = dict(CHANGES)
HISTORY_CHANGES["set_generating"] = Change("set_generating", lambda c, ids: c.set_generating(CT, SITE, "k"),
                                           lambda ids: ids["v1"])


@pytest.mark.parametrize("change", sorted(HISTORY_CHANGES))
def test_paused_get_history_fill_is_refused_after_a_change(change: str, make_paused: Callable[[], TieredCache],
                                                           writer: TieredCache, r: redis.Redis,
                                                           pool: ThreadPoolExecutor) -> None:
    """A get_history that read before a change returned may not cache its answer; the next one is the store's."""
    ids = _seed(writer.store)
    reader = make_paused()
    before = writer.store.get_history(CT, SITE, "k", limit=5)
    reached, release = reader.store.arm("get_history")  # type: ignore[attr-defined]
    fut = pool.submit(reader.get_history, CT, SITE, "k", 5)
    wait(reached, "reader's PostgreSQL read")
    HISTORY_CHANGES[change].apply(writer, ids)
    release.set()
    assert fut.result(WAIT) == before
    assert reader.redis.stats.fills_refused == 1 and reader.redis.stats.fills == 0
    assert r.exists(reader.keyset(CT, SITE, "k").history) == 0
    now = writer.store.get_history(CT, SITE, "k", limit=5)
    assert reader.get_history(CT, SITE, "k", 5) == now
    assert writer.get_history(CT, SITE, "k", 5) == now
    if change in ("write_cache", "set_generating", "finalize_cache"):
        assert now != before


def test_fill_of_a_row_that_expired_while_paused_is_refused(make_paused: Callable[[], TieredCache],
                                                            writer: TieredCache, r: redis.Redis,
                                                            pool: ThreadPoolExecutor) -> None:
    """A reader whose row expires between its PostgreSQL read and its fill stores nothing; the next read moves on."""
    older = writer.store.write_cache(CT, SITE, "k", {"v": "older"})
    soon = datetime.now(timezone.utc) + timedelta(milliseconds=250)
    writer.store.write_cache(CT, SITE, "k", {"v": "short"}, expires_at=soon)
    reader = make_paused()
    reached, release = reader.store.arm("get_latest")  # type: ignore[attr-defined]
    fut = pool.submit(reader.get_latest, CT, SITE, "k")
    wait(reached, "reader's PostgreSQL read")
    time.sleep(max(0.0, (soon - datetime.now(timezone.utc)).total_seconds()) + 0.05)
    release.set()
    assert fut.result(WAIT)["result_json"] == {"v": "short"}
    assert reader.redis.stats.fills_refused == 1 and reader.redis.stats.fills == 0
    assert entry_of(r, reader, "k") == "ABSENT"
    assert ident(reader.get_latest(CT, SITE, "k")) == older


# -- a writer paused between its commit and its write-through -----------------------------------


@pytest.mark.parametrize("cached_before", [False, True])
def test_reader_cannot_fill_while_a_write_is_in_flight(cached_before: bool, make_paused: Callable[[], TieredCache],
                                                       writer: TieredCache, r: redis.Redis,
                                                       pool: ThreadPoolExecutor) -> None:
    """Between a writer's commit and its write-through a reader cannot fill (the writer holds the lease)."""
    v1 = writer.write_cache(CT, SITE, "k", {"v": 1})
    if not cached_before:
        r.delete(writer.keyset(CT, SITE, "k").entry)
    w = make_paused()
    reached, release = w.store.arm("write:after")  # type: ignore[attr-defined]
    fut: Future[int] = pool.submit(w.write_cache, CT, SITE, "k", {"v": 2})
    wait(reached, "writer's commit")
    v2 = writer.store.get_latest(CT, SITE, "k")["id"]
    assert v2 != v1
    during = writer.get_latest(CT, SITE, "k")  # the write has not returned: old or new are both allowed
    if cached_before:
        assert ident(during) == v1 and writer.redis.stats.hits == 1  # the old entry, from Redis
        assert ident(entry_of(r, writer, "k")) == v1
    else:
        assert ident(during) == v2  # PostgreSQL, committed
        assert entry_of(r, writer, "k") == "ABSENT"
    assert writer.redis.stats.fills == 0 and writer.redis.stats.fills_refused == 0, "a fill under the writer's lease"
    release.set()
    assert fut.result(WAIT) == v2
    assert ident(entry_of(r, writer, "k")) == v2
    assert ident(writer.get_latest(CT, SITE, "k")) == v2


# -- two writers: the one returning first must not leave a state the other already superseded ----

FIRST_WRITERS: dict[str, tuple[str, Callable[[TieredCache, dict[str, int]], Any]]] = {
    "write_cache": ("write", lambda c, ids: c.write_cache(CT, SITE, "k", {"v": "first"})),
    "finalize_cache": ("finalize", lambda c, ids: c.finalize_cache(ids["gen"], {"v": "first"})),
    "invalidate": ("invalidate", lambda c, ids: c.invalidate(CT, SITE, "k")),
}


@pytest.mark.parametrize("first", sorted(FIRST_WRITERS))
def test_write_returning_after_a_concurrent_commit_is_not_stale(first: str, make_paused: Callable[[], TieredCache],
                                                                writer: TieredCache, r: redis.Redis,
                                                                pool: ThreadPoolExecutor) -> None:
    """Once a write returns, reads see at least what PostgreSQL had then, even if another writer committed meanwhile.

    Interleaving: B leases; A leases (displacing B's lease); A commits; B commits a newer row; A writes through
    and returns; only then does B write through. Between A's return and B's write-through, a reader must not be
    served A's state, which PostgreSQL had already superseded when A returned.
    """
    ids = _seed(writer.store)
    op, run_a = FIRST_WRITERS[first]
    a, b = make_paused(), make_paused()
    b_before, b_release_before = b.store.arm("write:before")  # type: ignore[attr-defined]
    b_after, b_release_after = b.store.arm("write:after")  # type: ignore[attr-defined]
    fut_b: Future[int] = pool.submit(b.write_cache, CT, SITE, "k", {"v": "second"})
    wait(b_before, "B's lease")
    a_after, a_release_after = a.store.arm(f"{op}:after")  # type: ignore[attr-defined]
    fut_a = pool.submit(run_a, a, ids)
    wait(a_after, "A's commit")
    b_release_before.set()
    wait(b_after, "B's commit")
    a_release_after.set()
    fut_a.result(WAIT)  # A returned
    truth = writer.store.get_latest(CT, SITE, "k")
    assert truth is not None and truth["result_json"] == {"v": "second"}, "B's row is PostgreSQL's latest"
    b_id = truth["id"]
    try:
        served = writer.get_latest(CT, SITE, "k")  # started after A returned
        stored = entry_of(r, writer, "k")
        assert ident(served) == b_id, (
            f"stale read after {first} returned: served {served and served['result_json']}, "
            f"PostgreSQL had row {b_id} (Redis entry: {stored if stored in ('ABSENT', None) else stored['id']})")
    finally:
        b_release_after.set()
        assert fut_b.result(WAIT) == b_id
    assert ident(writer.get_latest(CT, SITE, "k")) == b_id


def test_write_returning_after_a_concurrent_invalidate_site_is_not_stale(make_paused: Callable[[], TieredCache],
                                                                         writer: TieredCache, r: redis.Redis,
                                                                         pool: ThreadPoolExecutor) -> None:
    """Once write_cache returns, reads see what PostgreSQL had then, even if invalidate_site committed meanwhile.

    Interleaving: A leases and commits a row; invalidate_site (which takes no lease) commits, invalidating it;
    A writes its row through and returns; only then does invalidate_site drop the key.
    """
    _seed(writer.store)
    a, b = make_paused(), make_paused()
    a_after, a_release = a.store.arm("write:after")  # type: ignore[attr-defined]
    fut_a: Future[int] = pool.submit(a.write_cache, CT, SITE, "k", {"v": "first"})
    wait(a_after, "A's commit")
    b_after, b_release = b.store.arm("invalidate_site:after")  # type: ignore[attr-defined]
    fut_b: Future[int] = pool.submit(b.invalidate_site, SITE)
    wait(b_after, "invalidate_site's commit")
    a_release.set()
    a_id = fut_a.result(WAIT)  # A returned
    assert writer.store.get_latest(CT, SITE, "k") is None, "A's row was invalidated before A returned"
    try:
        served = writer.get_latest(CT, SITE, "k")  # started after A returned
        assert served is None, (
            f"stale read after write_cache returned: served row {served and served['id']} (A's = {a_id}), "
            "PostgreSQL had no servable row")
    finally:
        b_release.set()
        assert fut_b.result(WAIT) >= 2
    assert writer.get_latest(CT, SITE, "k") is None


# -- randomized stress ----------------------------------------------------------------------------
#
# The property (from the brief): a read is stale if some write of its key RETURNED before the read STARTED and
# the read returned a state older than the one PostgreSQL had at that write's return.
#
# "Writes" here are the calls that change what get_latest serves: write_cache, finalize_cache (True),
# invalidate and invalidate_site (for the keys it changed). set_generating and a finalize that changes nothing
# are excluded: by contract they keep the previous entry in Redis, so they cannot bind readers to a commit of a
# concurrent writer that has not returned yet.
#
# "What PostgreSQL had at that write's return" is observed inside the write itself: the writers' store reads
# get_latest right after its own commit (before the write-through and the return), so everything the
# observation saw was committed before the write returned. Reading it after the return instead would also see
# commits of writers still in flight, which no cache can be asked to show yet.

KEYS = ["k0", "k1", "k2"]
DURATION = {"sync": 7.0, "async": 4.0}  # seconds; the async leg repeats the protocol on one loop, shorter
N_WRITERS = 4
N_READERS = 6

Order = tuple[datetime, int]  # (created_at, id): PostgreSQL's "newest" order


def _order(row: dict[str, Any] | None) -> Order | None:
    return None if row is None else (datetime.fromisoformat(row["created_at"]), row["id"])


@dataclass(frozen=True)
class Read:
    start: int
    end: int
    key: str
    row: Order | None  # what get_latest / get_many returned for the key


@dataclass(frozen=True)
class Observation:
    """PostgreSQL's latest of a key, read after a write's commit; it binds reads starting after `bind`."""

    snap_start: int
    snap_end: int
    bind: int  # when the write that made this observation returned
    key: str
    row: Order | None
    after: str


class ObservationLog:
    """A writer's store that records what each key it just changed serves after the commit: for writes and
    finalizes as computed by the writing statement itself; for invalidations by a read right after."""

    def __init__(self, dsn: str, **options: Any) -> None:
        super().__init__(dsn, **options)  # type: ignore[call-arg]
        self.pending: list[tuple[int, int, str, Order | None, str]] = []
        self.observer: Any = self  # what reads PostgreSQL after an invalidation: a sync store (the async one's own)

    def _observe(self, keys: list[str], after: str) -> None:
        for key in keys:
            s = time.monotonic_ns()
            row = self.observer.get_latest(CT, SITE, key)
            self.pending.append((s, time.monotonic_ns(), key, _order(row), after))

    def _observed(self, key: str, latest: dict[str, Any] | None, after: str, start: int) -> None:
        """What the writing statement itself said get_latest serves at its commit: atomic with that commit,
        so a concurrent writer's later commit (whose write has not returned) cannot leak into the oracle."""
        self.pending.append((start, time.monotonic_ns(), key, _order(latest), after))

    def returned(self, into: list[Observation]) -> None:
        """The write returned now: its observations start binding readers."""
        bind = time.monotonic_ns()
        into.extend(Observation(s, e, bind, key, row, after) for s, e, key, row, after in self.pending)
        self.pending.clear()


def _started(store: Any, args: tuple[Any, ...]) -> int:
    return time.monotonic_ns()


OBSERVATIONS = {
    "write": (_started, lambda s, a, out, start: s._observed(a[0]["target_id"], out.latest, "write_cache", start)),
    "finalize": (_started, lambda s, a, out, start: out.changed and s._observed(a[0]["target_id"], out.latest,
                                                                               "finalize_cache", start)),
    "invalidate_outcome": (None, lambda s, a, out, _: s._observe([a[0]["target_id"]], "invalidate")),
    "invalidate_site_keys": (None, lambda s, a, out, _: s._observe(sorted(t for (_, _, t) in out), "invalidate_site")),
}
OBSERVING = {base: with_hooks(base, OBSERVATIONS, f"Observing{base.__name__}", (ObservationLog,))
             for base in (PostgresStore, AsyncPostgresStore)}


def find_stale(reads: list[Read], observations: list[Observation],
               invalidations: dict[str, list[tuple[int, int]]], servable_since: dict[int, int]) -> list[str]:
    """Reads that break the property; both rules are sound (never flag a correct cache), neither is complete.

    Rule 1 (monotonic): after an observation of latest X binds, with no invalidation overlapping
    [observation, read end], the read must return X or a row after it in (created_at, id) order: without
    invalidation the servable set only grows, so its newest row only moves forward.
    Rule 2 (dead rows): a row servable before an observation that did not return it is dead for good (only an
    invalidation removes a servable row, and it removes every older one too), so no read bound by that
    observation may return it.
    """
    inf = float("inf")
    by_bind: dict[str, list[Observation]] = defaultdict(list)
    by_start: dict[str, list[Observation]] = defaultdict(list)
    for o in observations:
        by_bind[o.key].append(o)
        by_start[o.key].append(o)
    for k in list(by_bind):
        by_bind[k].sort(key=lambda o: o.bind)
        by_start[k].sort(key=lambda o: o.snap_start)
    binds = {k: [o.bind for o in v] for k, v in by_bind.items()}
    starts = {k: [o.snap_start for o in v] for k, v in by_start.items()}
    inv_starts: dict[str, list[int]] = {}
    inv_max_end: dict[str, list[int]] = {}  # running max of end over the invalidations sorted by start
    for k, spans in invalidations.items():
        spans = sorted(spans)
        inv_starts[k] = [s for s, _ in spans]
        run, acc = -1, []
        for _, e in spans:
            run = max(run, e)
            acc.append(run)
        inv_max_end[k] = acc
    death: dict[int, tuple[float, Observation | None]] = {}

    def death_of(key: str, rid: int) -> tuple[float, Observation | None]:
        """From when row rid is proven superseded for every later read (and by which observation)."""
        if rid not in death:
            since = servable_since.get(rid)
            best: tuple[float, Observation | None] = (inf, None)
            if since is not None:
                obs = by_start[key]
                i = bisect.bisect_right(starts[key], since)
                while i < len(obs) and obs[i].snap_start < best[0]:
                    if (obs[i].row is None or obs[i].row[1] != rid) and obs[i].bind < best[0]:
                        best = (obs[i].bind, obs[i])
                    i += 1
            death[rid] = best
        return death[rid]

    stale: list[str] = []
    for rd in reads:
        if rd.row is not None:
            when, by = death_of(rd.key, rd.row[1])
            if when < rd.start:
                assert by is not None
                stale.append(f"{rd.key}: read row {rd.row[1]} {(rd.start - when) / 1e6:.3f} ms after a {by.after} "
                             f"returned having seen PostgreSQL's latest = {by.row and by.row[1]}")
                continue
        obs = by_bind.get(rd.key, [])
        n = bisect.bisect_left(binds.get(rd.key, []), rd.start)  # obs[:n] bind this read
        i = bisect.bisect_left(inv_starts.get(rd.key, []), rd.end)  # invalidations started before the read ended
        floor = inv_max_end[rd.key][i - 1] if i else -1
        newest: Observation | None = None
        for j in range(n - 1, -1, -1):
            o = obs[j]
            if o.bind < floor:
                break
            if o.snap_start >= floor and o.row is not None and (newest is None or o.row > newest.row):  # type: ignore[operator]
                newest = o
        if newest is not None and (rd.row is None or rd.row < newest.row):  # type: ignore[operator]
            stale.append(f"{rd.key}: read {rd.row and rd.row[1]} after a {newest.after} returned having seen "
                         f"PostgreSQL's latest = {newest.row[1]}, with no invalidation since")  # type: ignore[index]
    return stale


@pytest.mark.slow
def test_randomized_stress_never_serves_stale_after_a_write(api: str, dsn: str, redis_url: str, r: redis.Redis,
                                                            make_cache: Callable[..., TieredCache]) -> None:
    """Writers and readers hammer 3 keys for seconds; no read is older than PostgreSQL at an earlier write's return.

    With the async API every thread calls through Blocking into the one event loop: ten caches sharing a loop,
    as the tasks of one async service do.
    """
    stores = [open_store(api, OBSERVING[store_base(api)], dsn, max_size=3) for _ in range(N_WRITERS)]
    observers = [PostgresStore(dsn, max_size=1) for _ in stores] if api == "async" else []
    for store, observer in zip(stores, observers):
        store.observer = observer
    # A generous Redis timeout: this test pins the lease protocol under contention, not fault handling
    # (test_faults.py), and a loaded 2-core machine can stall a reply past the 50 ms default.
    writers = [new_cache(api, s, new_redis_client(api, redis_url, timeout=2.0), owns_clients=True) for s in stores]
    readers = [make_cache(dsn, redis_url, max_size=3, redis_timeout=2.0) for _ in range(N_READERS)]
    caches = writers + readers
    reads: list[Read] = []
    observations: list[Observation] = []
    invalidations: dict[str, list[tuple[int, int]]] = defaultdict(list)
    servable_since: dict[int, int] = {}  # row id -> return time of the call that made it servable
    errors: list[BaseException] = []
    counts: dict[str, int] = defaultdict(int)
    lock = threading.Lock()
    deadline = time.monotonic() + DURATION[api]
    now = time.monotonic_ns

    def count(what: str) -> None:
        with lock:
            counts[what] += 1

    def write_loop(i: int) -> None:
        c, store = writers[i], stores[i]
        rng = random.Random(1000 + i)
        n = 0
        try:
            while time.monotonic() < deadline:
                key = rng.choice(KEYS)
                p = rng.random()
                n += 1
                if p < 0.45:
                    new = c.write_cache(CT, SITE, key, {"w": i, "n": n})
                    store.returned(observations)
                    servable_since[new] = now()
                    count("write_cache")
                elif p < 0.75:
                    gen = c.set_generating(CT, SITE, key, triggered_by=f"w{i}")
                    count("set_generating")
                    if rng.random() < 0.5:
                        time.sleep(rng.random() * 0.002)
                    done = c.finalize_cache(gen, {"w": i, "n": n, "final": True})
                    store.returned(observations)
                    if done:
                        servable_since[gen] = now()
                    count("finalize_true" if done else "finalize_false")
                    if rng.random() < 0.1:  # a late duplicate finalize must change nothing
                        assert c.finalize_cache(gen, {"dup": True}) is False
                        store.returned(observations)
                        count("finalize_false")
                elif p < 0.95:
                    s = now()
                    c.invalidate(CT, SITE, key)
                    store.returned(observations)
                    invalidations[key].append((s, now()))
                    count("invalidate")
                else:
                    s = now()
                    c.invalidate_site(SITE)
                    store.returned(observations)
                    e = now()
                    for k in KEYS:
                        invalidations[k].append((s, e))
                    count("invalidate_site")
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    def read_loop(j: int) -> None:
        c = readers[j]
        rng = random.Random(2000 + j)
        try:
            while time.monotonic() < deadline:
                if rng.random() < 0.6:
                    key = rng.choice(KEYS)
                    s = now()
                    row = c.get_latest(CT, SITE, key)
                    reads.append(Read(s, now(), key, _order(row)))
                    count("get_latest")
                else:
                    s = now()
                    rows = c.get_many(CT, SITE, KEYS)
                    e = now()
                    reads.extend(Read(s, e, k, _order(rows[k])) for k in KEYS)
                    count("get_many")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write_loop, args=(i,)) for i in range(N_WRITERS)]
    threads += [threading.Thread(target=read_loop, args=(j,)) for j in range(N_READERS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(DURATION[api] + 30)
        assert not any(t.is_alive() for t in threads), "a worker hung"
        assert not errors, errors[0]

        stale = find_stale(reads, observations, invalidations, servable_since)
        n_writes = sum(v for k, v in counts.items() if k not in ("get_latest", "get_many"))
        stats = {f: sum(getattr(c.redis.stats, f) for c in caches) for f in ("hits", "fills", "fills_refused")}
        print(f"\nstress: {n_writes + counts['get_latest'] + counts['get_many']} ops; {len(reads)} key reads "
              f"({counts['get_latest']} get_latest, {counts['get_many']} get_many); {n_writes} writes "
              f"{ {k: v for k, v in counts.items() if not k.startswith('get_')} }; {len(observations)} "
              f"observations; redis {stats}; stale reads: {len(stale)}")
        assert counts["get_latest"] > 100 and n_writes > 100 and counts["invalidate"] > 0
        assert counts["finalize_true"] > 0 and counts["finalize_false"] > 0
        assert stats["hits"] > 0 and stats["fills"] > 0 and stats["fills_refused"] > 0
        assert not stale, f"{len(stale)} stale reads of {len(reads)}, e.g. {stale[:5]}"
    finally:
        for c in caches:
            c.close()
        for o in observers:
            o.close()

    # Final consistency: every cached entry and history is exactly what PostgreSQL says now.
    with TieredCache.connect(dsn, redis_url) as checker:
        for key in KEYS:
            ks = checker.keyset(CT, SITE, key)
            truth = checker.store.get_latest(CT, SITE, key)
            raw = r.get(ks.entry)
            if raw is not None:
                assert orjson.loads(raw) == truth, f"{key}: Redis entry differs from PostgreSQL"
            for field, value in r.hgetall(ks.history).items():
                assert orjson.loads(value) == checker.store.get_history(CT, SITE, key, limit=int(field))
            assert checker.get_latest(CT, SITE, key) == truth
            assert r.exists(ks.lease) == 0, "a lease outlived every reader and writer"
