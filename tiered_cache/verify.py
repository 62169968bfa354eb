"""Consistency checks: a sampled Redis-against-PostgreSQL comparison, and continuous probes measured in nines."""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._deployment import close_sync
from ._sync_client import relay_tier
from .contracts import DOWN, MISS
from .errors import ConfigurationError, StoreUnavailable
from .facade import TieredCache
from .policy.entries import decode
from .tiers.postgres import PostgresStore

if TYPE_CHECKING:
    from ._async.facade import AsyncTieredCache
    from ._async.store import AsyncPostgresStore
    from ._sync.redis_tier import RedisTier
    from .policy.keys import KeySpace


@dataclass
class VerifyReport:
    """How many sampled entries agreed with PostgreSQL, and which did not."""

    sampled: int = 0
    consistent: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def share(self) -> float:
        """Consistent share of the sample (1.0 for an empty sample)."""
        return 1.0 if self.sampled == 0 else self.consistent / self.sampled

    @property
    def nines(self) -> float:
        """The share as a count of nines (inf when every entry agreed)."""
        return math.inf if self.share >= 1.0 else max(0.0, -math.log10(1.0 - self.share))

    def summary(self) -> str:
        nines = "all" if math.isinf(self.nines) else f"{self.nines:.2f} nines"
        return f"{self.consistent}/{self.sampled} consistent ({self.share:.6f}, {nines}); {len(self.mismatches)} mismatches"


def verify(cache: TieredCache | AsyncTieredCache, *, sample: int = 1000, seed: int | None = None) -> VerifyReport:
    """Compare sampled Redis entries with PostgreSQL; a mismatch is re-read once, since a write may race the check.

    It blocks: an AsyncTieredCache is read through sync connections of verify's own (as its relay is), so from
    async code run it in a thread (`await asyncio.to_thread(verify, cache)`).
    """
    tier = relay_tier(cache.redis)  # the cache's own tier if it is sync, else one on a sync client of its own
    store = cache.store if isinstance(cache.store, PostgresStore) else _sync_store(cache.store)
    try:
        return _verify(cache.keys, tier, store, sample, seed)
    finally:
        if tier is not cache.redis:
            tier.close()
            close_sync(tier.client)
        if store is not cache.store:
            store.close()


def _sync_store(store: AsyncPostgresStore) -> PostgresStore:
    """A one-connection sync store that reads what the async store reads (same DSN, zone and limits)."""
    return PostgresStore(store.dsn, policy=store.policy, limits=store.limits, min_size=1, max_size=1,
                         pool_timeout=store.pool_timeout)


def _verify(keys: KeySpace, tier: RedisTier, store: PostgresStore, sample: int, seed: int | None) -> VerifyReport:
    entries: list[str] = []
    for key in tier.client.scan_iter(match=keys.namespace + ":e:*", count=1000):
        entries.append(key.decode() if isinstance(key, bytes) else key)
    random.Random(seed).shuffle(entries)
    report = VerifyReport()
    for entry in entries[:sample]:
        key = keys.parse_entry(entry)
        first = _compare(tier, store, entry, key)
        if first is None:
            continue
        report.sampled += 1
        if first == ():
            report.consistent += 1
            continue
        again = _compare(tier, store, entry, key)
        if again is None or again == ():
            report.consistent += 1
        else:
            report.mismatches.append({"key": list(key), "redis": again[0], "postgres": again[1]})
    return report


def _compare(tier: RedisTier, store: PostgresStore, entry: str, key: tuple[str, int, str]) -> Any:
    """None if the entry is gone; () if Redis and PostgreSQL agree; else (redis_row, postgres_row)."""
    raw = tier.get_raw(entry)
    if raw is MISS or raw is DOWN:
        return None
    cached = decode(raw)
    truth = store.get_latest(*key)
    return () if cached == truth else (cached, truth)


# -- continuous probing (`tiered-cache verify --continuous`) ------------------------------------

#: The probes' own cache type: the leading underscore keeps it apart from any product type.
PROBE_TYPE = "_tc_probe"
#: Where a read-back looks: the reader's near tier, Redis, PostgreSQL, and what the reader's get_latest returns.
TIERS = ("near", "redis", "postgres", "get_latest")
FRESH, STALE, MISSED, UNREACHABLE = "fresh", "stale", "miss", "down"


@dataclass(frozen=True)
class Probe:
    """One probe write: its target, the row id it wrote, and when the write returned."""

    seq: int
    target: str
    row_id: int
    written_at: float


class ProbeSchedule:
    """When the next probe is due and which read-backs are; no I/O, every method takes `now`, so tests tick a clock."""

    def __init__(self, *, interval: float, windows: Sequence[float], duration: float, targets: int, start: float) -> None:
        if not interval > 0 or not duration > 0 or targets < 1 or not windows or min(windows) <= 0:
            raise ConfigurationError("probe schedule: interval, duration and windows must be > 0, targets >= 1")
        self.interval = interval
        self.windows = tuple(sorted(windows))
        self.targets = targets
        self.end = start + duration
        self._next_write = start
        self._seq = 0
        self._reads: list[tuple[float, int, float, Probe]] = []  # heap of (due, seq, window, probe)

    @property
    def next_seq(self) -> int:
        """The sequence number the next probe will carry."""
        return self._seq + 1

    def write_due(self, now: float) -> str | None:
        """The target of the probe to write now, or None (not yet, or the run is over)."""
        if now < self._next_write or now >= self.end:
            return None
        return f"p{self._seq % self.targets}"

    def wrote(self, target: str, row_id: int | None, now: float) -> Probe | None:
        """Record a write (row_id None: it failed) and schedule its read-backs; a late loop skips, never bursts."""
        self._seq += 1
        self._next_write += self.interval
        if self._next_write <= now:
            self._next_write = now + self.interval
        if row_id is None:
            return None
        probe = Probe(self._seq, target, row_id, now)
        for window in self.windows:
            heapq.heappush(self._reads, (now + window, probe.seq, window, probe))
        return probe

    def due_reads(self, now: float) -> list[tuple[Probe, float]]:
        """Read-backs whose delay has passed, oldest first, as (probe, window)."""
        due = []
        while self._reads and self._reads[0][0] <= now:
            _, _, window, probe = heapq.heappop(self._reads)
            due.append((probe, window))
        return due

    def stop_writing(self, now: float) -> None:
        """End the run early (a signal): no more writes, pending read-backs are dropped."""
        self.end = min(self.end, now)
        self._reads.clear()

    def next_event(self, now: float) -> float | None:
        """When something is next due; None once the run is over and every read-back done."""
        times = [self._reads[0][0]] if self._reads else []
        if self._next_write < self.end and now < self.end:  # a slot the loop reached too late is no event
            times.append(self._next_write)
        return min(times) if times else None


@dataclass
class Tally:
    """Read-backs of one tier at one delay; a miss counts as consistent (a reader falls through), 'down' is not counted."""

    checked: int = 0
    consistent: int = 0
    misses: int = 0
    unreachable: int = 0

    def add(self, outcome: str) -> None:
        """Count one classified read-back."""
        if outcome == UNREACHABLE:
            self.unreachable += 1
            return
        self.checked += 1
        if outcome != STALE:
            self.consistent += 1
        if outcome == MISSED:
            self.misses += 1

    @property
    def share(self) -> float:
        """Consistent share of the read-backs counted (1.0 when none was)."""
        return 1.0 if self.checked == 0 else self.consistent / self.checked

    @property
    def nines(self) -> float:
        """-log10 of the inconsistent share (inf when nothing was stale), as Polaris reports cache consistency."""
        return math.inf if self.share >= 1.0 else max(0.0, -math.log10(1.0 - self.share))


class Tallies:
    """A Tally per (window, tier)."""

    def __init__(self, windows: Sequence[float]) -> None:
        self.windows = tuple(windows)
        self.probes = 0
        self.failed_writes = 0
        self.by: dict[tuple[float, str], Tally] = {(w, t): Tally() for w in self.windows for t in TIERS}

    def add(self, window: float, outcomes: dict[str, str]) -> None:
        """Count one probe's read-back at `window`, every tier at once."""
        for tier, outcome in outcomes.items():
            self.by[window, tier].add(outcome)

    def worst_nines(self) -> float:
        """The lowest nines of any window and tier that saw a read-back."""
        return min((t.nines for t in self.by.values() if t.checked), default=math.inf)


def classify(observed: Any, row_id: int) -> str:
    """A read-back against the probe's write: the write's row or a newer one is fresh; an older row or 'no row' is stale."""
    if observed is MISS:
        return MISSED
    if observed is DOWN:
        return UNREACHABLE
    if isinstance(observed, dict) and isinstance(observed.get("id"), int) and observed["id"] >= row_id:
        return FRESH
    return STALE


class ContinuousVerifier:
    """Writes probe rows through a TieredCache and reads each back from every tier at the schedule's delays.

    The reader is a second TieredCache (near tier on, like another process): its near tier is read
    first, then its get_latest, which also refills it; Redis and PostgreSQL are read directly.
    """

    def __init__(
        self, writer: TieredCache, reader: TieredCache | None, schedule: ProbeSchedule, *, site: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer, self.reader, self.schedule, self.site, self.clock = writer, reader, schedule, site, clock
        self.total = Tallies(schedule.windows)

    def _key(self, target: str) -> tuple[str, int, str]:
        """The probe key of a target: its own cache type and site, apart from product keys."""
        return PROBE_TYPE, self.site, target

    def write(self, probe_seq: int, target: str) -> int | None:
        """One probe row through the library; None if PostgreSQL refused it."""
        try:
            return self.writer.write_cache(*self._key(target), {"probe": probe_seq, "at": time.time()},
                                           triggered_by="tiered-cache verify")
        except StoreUnavailable:
            return None

    def read_back(self, probe: Probe) -> dict[str, str]:
        """Each tier's answer for the probe's key, classified against the probe's row id."""
        key = self._key(probe.target)
        entry = self.writer.keyset(*key).entry
        out: dict[str, str] = {}
        reader = self.reader
        if reader is not None and reader.near is not None:
            out["near"] = classify(reader.near.get(entry), probe.row_id)
        raw = self.writer.redis.get_raw(entry)
        out["redis"] = classify(raw if raw is MISS or raw is DOWN else decode(raw), probe.row_id)
        try:
            out["postgres"] = classify(self.writer.store.get_latest(*key), probe.row_id)
        except StoreUnavailable:
            out["postgres"] = UNREACHABLE
        try:
            out["get_latest"] = classify((reader or self.writer).get_latest(*key), probe.row_id)
        except StoreUnavailable:
            out["get_latest"] = UNREACHABLE
        return out

    def run(self, *, report_every: float, report: Callable[[float, Tallies], None], stop: Any) -> Tallies:
        """Probe until the schedule ends (or stop is set); report(elapsed, period) every report_every seconds."""
        schedule, started = self.schedule, self.clock()
        period = Tallies(schedule.windows)
        next_report = started + report_every
        while True:
            now = self.clock()
            if stop.is_set():
                schedule.stop_writing(now)
            target = schedule.write_due(now)
            if target is not None:
                row_id = self.write(schedule.next_seq, target)
                for t in (period, self.total):
                    t.probes += row_id is not None
                    t.failed_writes += row_id is None
                schedule.wrote(target, row_id, self.clock())
            for probe, window in schedule.due_reads(self.clock()):
                outcomes = self.read_back(probe)
                period.add(window, outcomes)
                self.total.add(window, outcomes)
            now = self.clock()
            if now >= next_report:
                report(now - started, period)
                period = Tallies(schedule.windows)
                next_report += report_every
            due = schedule.next_event(now)
            if due is None:
                return self.total
            stop.wait(max(0.0, min(due, next_report) - self.clock()))

    def cleanup(self) -> int:
        """Invalidate every probe row, so no probe entry stays in any tier."""
        return self.writer.invalidate_site(self.site, cache_type=PROBE_TYPE)
