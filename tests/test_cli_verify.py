"""`tiered-cache verify --continuous`: the probe schedule on a fake clock, then probes on the real servers."""

from __future__ import annotations

import math
import re
import threading

import orjson
import psycopg
import pytest
import redis

from tiered_cache.cli import main
from tiered_cache.contracts import DOWN, MISS
from tiered_cache.errors import ConfigurationError
from tiered_cache.policy.keys import KeySpace
from tiered_cache.verify import FRESH, MISSED, PROBE_TYPE, STALE, UNREACHABLE, ProbeSchedule, Tally, classify

# -- pure: schedule and scoring ---------------------------------------------------------------


def test_schedule_writes_on_the_interval_and_reads_back_after_each_window() -> None:
    """Probes go out every interval, rotating targets; each is read back once per window, then the run ends."""
    s = ProbeSchedule(interval=1.0, windows=(10.0, 0.1, 1.0), duration=2.5, targets=2, start=100.0)
    assert s.write_due(100.0) == "p0"
    first = s.wrote("p0", 11, now=100.0)
    assert first is not None and first.row_id == 11
    assert s.write_due(100.05) is None and s.due_reads(100.05) == []
    assert s.next_event(100.05) == pytest.approx(100.1)
    assert s.due_reads(100.1) == [(first, 0.1)]
    assert s.write_due(101.0) == "p1"
    second = s.wrote("p1", 12, now=101.0)
    assert s.due_reads(101.0) == [(first, 1.0)]
    assert s.write_due(102.0) == "p0"
    s.wrote("p0", None, now=102.0)  # a failed write: no read-backs for it
    assert s.write_due(103.0) is None  # 103 is past start + duration
    assert [(p.seq, w) for p, w in s.due_reads(105.0)] == [(2, 0.1), (2, 1.0)]
    assert s.next_event(105.0) == pytest.approx(110.0)
    assert s.due_reads(111.0) == [(first, 10.0), (second, 10.0)]
    assert s.next_event(111.0) is None


def test_schedule_skips_instead_of_bursting_after_a_stall() -> None:
    """A loop that fell behind writes one probe, then waits a full interval (no catch-up burst)."""
    s = ProbeSchedule(interval=1.0, windows=(0.1,), duration=100, targets=1, start=0.0)
    s.wrote(s.write_due(0.0), 1, now=0.0)  # type: ignore[arg-type]
    assert s.write_due(5.5) == "p0"
    s.wrote("p0", 2, now=5.5)
    assert s.write_due(5.9) is None and s.write_due(6.5) == "p0"


def test_schedule_stop_drops_pending_reads_and_rejects_nonsense() -> None:
    """stop_writing ends the run now; a zero interval or an empty window list is a configuration error."""
    s = ProbeSchedule(interval=1.0, windows=(0.1, 10.0), duration=100, targets=1, start=0.0)
    s.wrote("p0", 1, now=0.0)
    s.stop_writing(0.5)
    assert s.write_due(1.0) is None and s.next_event(0.5) is None
    for bad in ({"interval": 0}, {"windows": ()}, {"targets": 0}):
        with pytest.raises(ConfigurationError):
            ProbeSchedule(**{"interval": 1.0, "windows": (1.0,), "duration": 1.0, "targets": 1, "start": 0.0, **bad})


def test_classify_and_nines() -> None:
    """The write's row or newer is fresh; older or 'no row' is stale; a miss is consistent; 'down' is not counted."""
    assert classify({"id": 7}, 7) == FRESH and classify({"id": 8}, 7) == FRESH
    assert classify({"id": 6}, 7) == STALE and classify(None, 7) == STALE
    assert classify(MISS, 7) == MISSED and classify(DOWN, 7) == UNREACHABLE
    t = Tally()
    for outcome in [FRESH] * 998 + [MISSED, STALE, UNREACHABLE]:
        t.add(outcome)
    assert (t.checked, t.consistent, t.misses, t.unreachable) == (1000, 999, 1, 1)
    assert t.nines == pytest.approx(3.0)
    assert math.isinf(Tally(checked=5, consistent=5).nines)


# -- against the servers ----------------------------------------------------------------------

_FAST = ["--interval", "0.2", "--duration", "3", "--windows", "0.1,0.5,1", "--report-every", "1"]


def _summary(out: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(window, tier) -> (consistent, checked) from the summary table."""
    rows = re.findall(r"^\s+([\d.]+)s (\w+)\s+(\d+)/(\d+) ", out, flags=re.MULTILINE)
    return {(w, tier): (int(c), int(n)) for w, tier, c, n in rows}


def _probe_statuses(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM biz.ai_cache GROUP BY status").fetchall())


def test_verify_continuous_is_all_consistent_on_a_healthy_deployment(dsn: str, redis_url: str, capsys, figure) -> None:  # type: ignore[no-untyped-def]
    """A few seconds of probes: every window of every tier consistent, a line per period, probe rows invalidated."""
    code = main(["--dsn", dsn, "--redis-url", redis_url, "verify", "--continuous", *_FAST, "--min-nines", "3"])
    out = capsys.readouterr().out
    for line in out.splitlines():
        figure(f"verify healthy: {line}")
    assert code == 0, out
    assert len(re.findall(r"^verify\s+[\d.]+ s: \d+ probes", out, flags=re.MULTILINE)) >= 2
    probes = int(re.search(r"summary: (\d+) probes written, 0 writes failed", out).group(1))  # type: ignore[union-attr]
    assert probes >= 5
    table = _summary(out)
    assert {tier for _, tier in table} == {"near", "redis", "postgres", "get_latest"}
    for (window, tier), (consistent, checked) in table.items():
        assert checked == probes and consistent == checked, (window, tier)
    assert "sampled comparison (Redis against PostgreSQL): 4/4 consistent" in out  # one entry per probe target
    assert f"probe rows invalidated: {probes}" in out
    assert _probe_statuses(dsn) == {"invalidated": probes}
    client = redis.Redis.from_url(redis_url)
    assert not list(client.scan_iter(match="tc:e:{" + PROBE_TYPE + "*"))


def test_verify_continuous_reports_a_stale_redis_entry(dsn: str, redis_url: str, capsys, figure) -> None:  # type: ignore[no-untyped-def]
    """An old value SET straight into Redis after each probe write shows up as inconsistent; exit 1 under --min-nines."""
    client = redis.Redis.from_url(redis_url)
    entry = KeySpace("tc").entry(PROBE_TYPE, 0, "p0")
    done = threading.Event()
    planted: list[int] = []

    def plant_stale() -> None:
        """Remember the first probe row Redis holds; whenever a newer one replaces it, put the old one back."""
        first: bytes | None = None
        while not done.is_set():
            raw = client.get(entry)
            if raw is not None and raw != b"null":
                if first is None:
                    first = raw
                elif orjson.loads(raw)["id"] > orjson.loads(first)["id"]:
                    client.set(entry, first, px=60_000)
                    planted.append(orjson.loads(raw)["id"])
            done.wait(0.003)

    saboteur = threading.Thread(target=plant_stale, daemon=True)
    saboteur.start()
    try:
        code = main(["--dsn", dsn, "--redis-url", redis_url, "verify", "--continuous", *_FAST, "--targets", "1",
                     "--min-nines", "1"])
    finally:
        done.set()
        saboteur.join(10)
    out = capsys.readouterr().out
    for line in out.splitlines():
        figure(f"verify stale: {line}")
    assert planted, "the saboteur never saw a second probe"
    table = _summary(out)
    consistent, checked = table["0.1", "redis"]
    assert consistent < checked, out
    assert table["0.1", "get_latest"][0] < checked  # the reader was served the planted row too
    assert all(c == n for (w, tier), (c, n) in table.items() if tier == "postgres")
    assert "sampled comparison (Redis against PostgreSQL): 0/1 consistent" in out  # verify() sees it too
    assert code == 1 and "below --min-nines 1" in out


def test_a_write_slot_reached_after_the_end_does_not_keep_the_run_alive() -> None:
    """A loop that wakes after the run's end with a write slot still before it has nothing left to do."""
    schedule = ProbeSchedule(interval=0.2, windows=(0.1,), duration=1.0, targets=1, start=0.0)
    schedule.wrote("p0", 1, 0.95)  # the last write, late: the next slot (1.15 s) lies past the end
    schedule._next_write = 0.99  # a slot before the end that the loop only reaches at 1.2 s
    assert [w for _, w in schedule.due_reads(1.2)] == [0.1]
    assert schedule.write_due(1.2) is None
    assert schedule.next_event(1.2) is None
