"""Coherence when the reading process is CPU-bound: its reading thread applies announcements already received."""

from __future__ import annotations

import multiprocessing
import random
import time
from collections.abc import Callable

from tiered_cache import TieredCache

from _spin_worker import spin
from _util import pct

CT, SITE = "app3_clue", 401


def test_a_spinning_reader_sees_a_write_within_milliseconds(
    dsn: str, redis_url: str, figure: Callable[[str], None]
) -> None:
    """A process spinning on near hits (never sleeping) sees another process's write soon after it returned.

    Without the reader-side poll the listener thread must win the GIL from the spinning thread once per
    blocking call: p50 11 ms, p99 22-27 ms were measured. The bound asserted here is loose (a busy CI
    machine); the figure printed is the one to read.
    """
    ctx = multiprocessing.get_context("spawn")
    key = (CT, SITE, "busy")
    with TieredCache.connect(dsn, redis_url, redis_timeout=1.0) as writer:
        first = writer.write_cache(*key, {"n": 0})
        here, there = ctx.Pipe()
        stop = ctx.Event()
        child = ctx.Process(target=spin, args=(dsn, redis_url, key, there, stop), daemon=True)
        child.start()
        try:
            msg = here.recv() if here.poll(60) else ("error", "child did not start within 60 s")
            assert msg == ("ready",), msg
            seen: dict[int, float] = {}

            def collect(timeout: float = 0.0) -> None:
                while here.poll(timeout):
                    m = here.recv()
                    assert m[0] == "seen", m
                    if m[1] is not None:
                        seen.setdefault(m[1], m[2])
                    timeout = 0.0

            deadline = time.monotonic() + 30
            while first not in seen:
                collect(0.1)
                assert time.monotonic() < deadline, "the spinning reader never read the first row"
            rng = random.Random(9)
            returned: dict[int, float] = {}
            for n in range(1, 201):
                rid = writer.write_cache(*key, {"n": n})
                returned[rid] = time.monotonic()
                time.sleep(rng.uniform(0.005, 0.015))
                collect()
            deadline = time.monotonic() + 30
            while not set(returned) <= set(seen) and time.monotonic() < deadline:
                collect(0.1)
        finally:
            stop.set()
            child.join(30)
            if child.is_alive():
                child.kill()
        # The reader may skip a row that was overwritten before it looked; a later row counts for it then.
        ids = sorted(returned)
        delays = []
        for i, rid in enumerate(ids):
            later = [seen[r] for r in ids[i:] if r in seen]
            assert later, f"row {rid} and every later row were never seen"
            delays.append(max(0.0, min(later) - returned[rid]))
        p50, p99, worst = pct(delays, 50) * 1e3, pct(delays, 99) * 1e3, max(delays) * 1e3
        figure(f"[near] spinning reader in another process: write seen after p50 {p50:.2f} ms, "
               f"p99 {p99:.2f} ms, max {worst:.2f} ms over {len(delays)} writes")
        assert p50 < 250, "a spinning reader should see writes within milliseconds, not near_max_age"
