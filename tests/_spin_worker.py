"""Child side of tests/test_near_busy.py: a process whose reading thread spins on near hits without pausing."""

from __future__ import annotations

import time
import traceback
from typing import Any


def spin(dsn: str, redis_url: str, key: tuple[str, int, str], conn: Any, stop: Any) -> None:
    """Read `key` in a tight loop (a CPU-bound worker: it never sleeps); send ("seen", id, t) on each change."""
    from tiered_cache import TieredCache

    try:
        cache = TieredCache.connect(dsn, redis_url, redis_timeout=1.0, near_max_entries=1000, near_max_age=30.0)
        if not cache.listener.subscribed.wait(10):
            raise RuntimeError("coherence listener did not subscribe within 10 s")
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        conn.send(("ready",))
        last: Any = object()
        reads = 0
        while not stop.is_set():
            row = cache.get_latest(*key)
            reads += 1
            rid = None if row is None else row["id"]
            if rid != last:
                conn.send(("seen", rid, time.monotonic()))
                last = rid
        conn.send(("done", reads, cache.stats()))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        cache.close()
