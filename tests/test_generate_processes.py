"""get_or_generate across OS processes, sync and async side by side: one generate() per key, takeovers, fencing.

Each process is tests/_gen_worker.py; generate() calls are counted outside the library (a file each call
appends to). Nothing here asserts a duration: orderings are made deterministic with marker files, and the
figures (how long callers took, how long a takeover took) are printed for the closing notes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import redis

from tiered_cache.policy.keys import KeySpace
from tiered_cache.testing import RedisServer

CT = "app3_clue"
SITE = 101
WORKER = str(Path(__file__).with_name("_gen_worker.py"))
LIMIT = 90.0  # seconds before the test calls a process hung


def sql(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


class Run:
    """Worker processes sharing one folder of markers."""

    def __init__(self, folder: Path, dsn: str, url: str) -> None:
        self.dir, self.dsn, self.url = folder, dsn, url
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, api: str, target: str, callers: int, **opts: Any) -> subprocess.Popen[bytes]:
        args = {"dsn": self.dsn, "url": self.url, "api": api, "target": target, "callers": callers,
                "dir": str(self.dir), **opts}
        proc = subprocess.Popen([sys.executable, WORKER, json.dumps(args)])
        self.procs.append(proc)
        return proc

    def until(self, what: str, test: Any, limit: float = LIMIT) -> None:
        deadline = time.monotonic() + limit
        while not test():
            for p in self.procs:
                if p.poll() not in (None, 0, -signal.SIGKILL):
                    raise AssertionError(f"worker {p.pid} exited with {p.returncode} while waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.005)

    def ready(self, procs: list[subprocess.Popen[bytes]]) -> None:
        self.until("workers ready", lambda: all((self.dir / f"ready-{p.pid}").exists() for p in procs))

    def go(self) -> None:
        (self.dir / "go").touch()

    def release(self) -> None:
        (self.dir / "release").touch()

    def calls(self) -> list[int]:
        path = self.dir / "calls"
        return [int(x) for x in path.read_text().split()] if path.exists() else []

    def started(self) -> list[int]:
        return [int(p.name.split("-")[1]) for p in self.dir.glob("started-*")]

    def out(self, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        assert proc.wait(LIMIT) == 0
        return json.loads((self.dir / f"out-{proc.pid}.json").read_text())

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                p.kill()
                p.wait(10)


@pytest.fixture
def run(tmp_path: Path, dsn: str, redis_url: str) -> Iterator[Run]:
    r = Run(tmp_path, dsn, redis_url)
    yield r
    r.close()


def _expired_row(dsn: str, target: str) -> int:
    return sql(dsn, "INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, status, expires_at, created_at)"
                    " VALUES (%s, %s, %s, '{\"text\": \"previous\"}', 'valid', now() - interval '1 minute',"
                    " now() - interval '8 days') RETURNING id", (CT, SITE, target))[0][0]


def _spread(values: list[float]) -> str:
    values = sorted(values)
    return f"p50 {values[len(values) // 2] * 1000:.1f} ms, max {values[-1] * 1000:.1f} ms"


def test_200_callers_over_4_processes_run_one_generation(run: Run, dsn: str) -> None:
    procs = [run.spawn(api, "cold", 50, seconds=0.3, settle=True, peers=4) for api in ("sync", "async", "sync", "async")]
    run.ready(procs)
    run.go()
    outs = [run.out(p) for p in procs]
    results = [r for o in outs for r in o["results"]]
    assert len(results) == 200
    assert [r.get("error") for r in results if "error" in r] == []
    assert len(run.calls()) == 1, run.calls()
    assert len({(r["id"], r["text"]) for r in results}) == 1
    assert {o["after"] for o in outs} == {results[0]["id"]}
    assert sql(dsn, "SELECT count(*), max(gen_token) FROM biz.ai_cache") == [(1, 1)]
    print(f"\n200 cold callers, one 0.3 s generation: {_spread([r['end'] - r['start'] for r in results])}")


def test_with_a_previous_result_every_other_caller_returns_while_the_generation_runs(run: Run, dsn: str) -> None:
    previous = _expired_row(dsn, "warm")
    winner = run.spawn("sync", "warm", 1)
    run.ready([winner])
    run.go()
    run.until("the generation started", lambda: run.started())
    procs = [run.spawn(api, "warm", 50, go="go-2", settle=True, peers=4) for api in ("sync", "async", "sync", "async")]
    run.ready(procs)
    (run.dir / "go-2").touch()
    outs = [run.out(p) for p in procs]  # all 200 return while generate() is still held
    results = [r for o in outs for r in o["results"]]
    assert len(results) == 200 and {r.get("id") for r in results} == {previous}
    run.release()
    won = run.out(winner)["results"][0]
    assert won["text"] == f"by {winner.pid}" and len(run.calls()) == 1
    print(f"\n200 callers during a generation, previous result served: {_spread([r['end'] - r['start'] for r in results])}"
          + "".join(f"\n  {api} process: {_spread([r['end'] - r['start'] for r in o['results']])}, "
                    f"first start to last end {(max(r['end'] for r in o['results']) - min(r['start'] for r in o['results'])) * 1000:.1f} ms"
                    for api, o in zip(("sync", "async", "sync", "async"), outs)))


def test_a_generator_killed_mid_call_is_taken_over_within_its_lease(run: Run, dsn: str) -> None:
    lease_ttl = 2.0
    victim = run.spawn("sync", "k", 1, lease_ttl=lease_ttl)
    run.ready([victim])
    run.go()
    run.until("the generation started", lambda: run.started())
    heir = run.spawn("async", "k", 3, lease_ttl=lease_ttl, wait=30.0, seconds=0.0)
    run.ready([heir])
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.time()
    victim.wait(10)
    results = run.out(heir)["results"]
    assert [r.get("text") for r in results] == [f"by {heir.pid}"] * 3
    assert run.calls() == [victim.pid, heir.pid]
    took = max(r["end"] for r in results) - killed_at
    assert sql(dsn, "SELECT gen_token, status FROM biz.ai_cache ORDER BY id") == [(1, "expired"), (2, "valid")]
    print(f"\nkill -9 of the generator: taken over and finished {took:.2f} s after the kill (lease_ttl {lease_ttl} s)")


def test_a_stopped_generator_past_its_lease_is_fenced_out_after_a_takeover(run: Run, dsn: str,
                                                                           redis_url: str) -> None:
    lease_ttl = 1.0
    old = run.spawn("async", "s", 1, lease_ttl=lease_ttl, near=True)
    run.ready([old])
    run.go()
    run.until("the generation started", lambda: run.started())
    os.kill(old.pid, signal.SIGSTOP)  # no heartbeat from here on
    run.until("the lease lapsed", lambda: sql(dsn, "SELECT expires_at < now() FROM biz.ai_cache_leases")[0][0],
              limit=lease_ttl * 10 + 10)
    newer = run.spawn("sync", "s", 2, lease_ttl=lease_ttl, seconds=0.0, near=True)
    taken = run.out(newer)["results"]
    assert {r.get("text") for r in taken} == {f"by {newer.pid}"}
    run.release()
    os.kill(old.pid, signal.SIGCONT)
    late = run.out(old)
    # The old generator's finalize was refused: it returned the newer result, and read it back afterwards.
    assert late["results"][0]["id"] == taken[0]["id"] and late["after"] == taken[0]["id"]
    assert sql(dsn, "SELECT gen_token, status, result_json->>'text' FROM biz.ai_cache ORDER BY id") == [
        (1, "expired", None), (2, "valid", f"by {newer.pid}")]
    r = redis.Redis.from_url(redis_url)
    raw = r.get(KeySpace("tc").entry(CT, SITE, "s"))
    r.close()
    assert raw is not None and orjson.loads(raw)["id"] == taken[0]["id"]


def test_with_redis_down_during_a_generation_it_is_still_one_generate_and_nothing_stale(
        run: Run, dsn: str, redis_server: RedisServer, redis_url: str) -> None:
    first = run.spawn("sync", "r", 1)
    run.ready([first])
    run.go()
    run.until("the generation started", lambda: run.started())
    redis_server.kill()  # SIGKILL, as a crash; it restarts from whatever it had on disk
    try:
        others = [run.spawn(api, "r", 20) for api in ("sync", "async")]
        run.ready(others)
        run.release()
        outs = [run.out(p) for p in [first, *others]]
    finally:
        redis_server.start()
    results = [r for o in outs for r in o["results"]]
    assert [r.get("error") for r in results if "error" in r] == []
    assert len(run.calls()) == 1 and {r["text"] for r in results} == {f"by {first.pid}"}
    # Redis back: no process reads anything but the new row.
    after = run.spawn("async", "r", 5)
    run.ready([after])
    assert {r["id"] for r in run.out(after)["results"]} == {results[0]["id"]}
    assert len(run.calls()) == 1
