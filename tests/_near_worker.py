"""Child-process side of tests/test_near.py: a second process with its own near-enabled TieredCache.

Started with multiprocessing's spawn context, so the child shares nothing with the test process but
Redis and PostgreSQL. Every target reports over a Pipe: ("ready",), then its results, or ("error", text).
Times are time.monotonic(): CLOCK_MONOTONIC, one clock for every process on the machine.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from typing import Any

#: The stress workload's keys: one venue, one cache_type without an expiry policy (rows never expire).
STRESS_TYPE = "near_stress"
STRESS_SITE = 7
STRESS_KEYS = tuple(f"t{i}" for i in range(8))


def build(dsn: str, redis_url: str, near_max_age: float) -> Any:
    """A near-enabled TieredCache whose listener is subscribed (its near tier is active)."""
    from tiered_cache import TieredCache

    # 1 s Redis timeout: these tests pin coherence; a loaded 2-core runner can stall a reply past the
    # 50 ms default, which is the fault path (test_faults.py).
    cache = TieredCache.connect(
        dsn, redis_url, redis_timeout=1.0, near_max_entries=1000, near_max_age=near_max_age)
    if not cache.listener.subscribed.wait(10):
        cache.close()
        raise RuntimeError("coherence listener did not subscribe within 10 s")
    return cache


# -- latency: follow one key and report every new id the moment it is first read -----------------


def follow(dsn: str, redis_url: str, key: tuple[str, int, str], near_max_age: float, conn: Any, stop: Any) -> None:
    """Read `key` in a loop (with a 0.1 ms pause, as a request thread would leave the GIL); send ("seen", id, t) on each change."""
    try:
        cache = build(dsn, redis_url, near_max_age)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        conn.send(("ready",))
        last: Any = object()
        reads = 0
        while not stop.is_set():
            row = cache.get_latest(*key)
            now = time.monotonic()
            reads += 1
            rid = None if row is None else row["id"]
            if rid != last:
                conn.send(("seen", rid, now))
                last = rid
            time.sleep(0.0001)
        conn.send(("done", reads, cache.stats()))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        cache.close()


# -- stress: writers and readers recording every call ---------------------------------------------


def run_mix(cache: Any, proc: str, t_start: float, t_stop: float, seed: int, writers: int = 2, readers: int = 2) -> list[tuple]:
    """Writers and readers on STRESS_KEYS from t_start to t_stop; every completed call as a record.

    ("w", proc, k, start, end, row_id): a write_cache, or a finalize_cache that turned row_id valid;
    ("i", proc, k, start, end, None): an invalidate of key k (invalidate_site records every key);
    ("r", proc, k, start, end, row_id or None): what get_latest / get_many returned for key k.
    """
    records: list[tuple] = []
    lock = threading.Lock()
    errors: list[str] = []
    n_keys = len(STRESS_KEYS)
    # Writers here change keys 0-5 (parent) or 2-7 (child): t0, t1 only ever change in the parent and t6, t7
    # only in the child, so the other process's near tier keeps them until an announcement (or max_age).
    lo, hi = (0, n_keys - 2) if proc == "parent" else (2, n_keys)

    def writer(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        out: list[tuple] = []
        n = 0
        try:
            while time.monotonic() < t_stop:
                k = rng.randrange(lo, hi)
                target = STRESS_KEYS[k]
                p = rng.random()
                n += 1
                if p < 0.75:
                    s = time.monotonic()
                    rid = cache.write_cache(STRESS_TYPE, STRESS_SITE, target, {"p": proc, "w": i, "n": n})
                    out.append(("w", proc, k, s, time.monotonic(), rid))
                elif p < 0.87:
                    gid = cache.set_generating(STRESS_TYPE, STRESS_SITE, target, triggered_by=proc)
                    s = time.monotonic()
                    if cache.finalize_cache(gid, {"p": proc, "w": i, "n": n, "final": True}):
                        out.append(("w", proc, k, s, time.monotonic(), gid))
                elif p < 0.98:
                    s = time.monotonic()
                    cache.invalidate(STRESS_TYPE, STRESS_SITE, target)
                    out.append(("i", proc, k, s, time.monotonic(), None))
                else:
                    s = time.monotonic()
                    cache.invalidate_site(STRESS_SITE, STRESS_TYPE)
                    e = time.monotonic()
                    out.extend(("i", proc, kk, s, e, None) for kk in range(n_keys))
                time.sleep(rng.uniform(0.0, 0.006))
        except BaseException:
            errors.append(traceback.format_exc())
        with lock:
            records.extend(out)

    def reader(i: int) -> None:
        rng = random.Random(seed * 1000 + 500 + i)
        out: list[tuple] = []
        try:
            while time.monotonic() < t_stop:
                if rng.random() < 0.85:
                    k = rng.randrange(n_keys)
                    s = time.monotonic()
                    row = cache.get_latest(STRESS_TYPE, STRESS_SITE, STRESS_KEYS[k])
                    out.append(("r", proc, k, s, time.monotonic(), None if row is None else row["id"]))
                else:
                    s = time.monotonic()
                    rows = cache.get_many(STRESS_TYPE, STRESS_SITE, list(STRESS_KEYS))
                    e = time.monotonic()
                    for k, target in enumerate(STRESS_KEYS):
                        row = rows[target]
                        out.append(("r", proc, k, s, e, None if row is None else row["id"]))
                time.sleep(rng.uniform(0.0, 0.0005))
        except BaseException:
            errors.append(traceback.format_exc())
        with lock:
            records.extend(out)

    threads = [threading.Thread(target=writer, args=(i,), name=f"{proc}-writer-{i}") for i in range(writers)]
    threads += [threading.Thread(target=reader, args=(i,), name=f"{proc}-reader-{i}") for i in range(readers)]
    delay = t_start - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{proc}: {len(errors)} worker thread(s) failed:\n" + "\n".join(errors))
    return records


def stress(dsn: str, redis_url: str, near_max_age: float, seed: int, conn: Any) -> None:
    """Child side of the stress test: build, say ready, wait for ("go", t_start, t_stop), run, send records and stats."""
    try:
        cache = build(dsn, redis_url, near_max_age)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        conn.send(("ready",))
        msg = conn.recv()
        assert msg[0] == "go", msg
        records = run_mix(cache, "child", msg[1], msg[2], seed)
        conn.send(("done", records, cache.stats()))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        cache.close()
