"""Listener micro-benchmark: what the coherence listener thread costs this process per change announcement.

A near-enabled TieredCache listens on its change channel while this process's main thread spins in pure
Python (a CPU-bound handler: the listener must win the GIL from it on every wake-up). Another process,
pinned to the other CPU, publishes announcements of another publisher at --rate per second for --seconds;
this process is pinned to one CPU. The figure is the listener thread's own CPU time (utime + stime from
/proc/self/task) per announcement it applied, with `gather` 0 (drain at each wake-up) and the default
(wait `gather` seconds after a wake-up, so what arrives meanwhile shares one drain), taking turns for
--runs rounds each. Clock-tick resolution: 10 ms over --rate x --seconds announcements.

    python -m bench.lmicro [--rate 300] [--seconds 5] [--runs 3]
"""

from __future__ import annotations

import argparse
import inspect
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Sequence


def _publish(url: str, channel: str, rate: int, seconds: float, ready: object, start: object) -> None:
    import redis

    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    client = redis.Redis.from_url(url)
    client.ping()
    ready.set()  # type: ignore[attr-defined]
    start.wait()  # type: ignore[attr-defined]
    t0, n = time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        n += 1
        client.publish(channel, f"bench-peer:{n}:lmicro:{{k{n % 500}}}")
        ahead = t0 + n / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    client.close()


def _thread_cpu(native_id: int) -> float:
    fields = open(f"/proc/self/task/{native_id}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            pass


def measure(dsn: str, url: str, rate: int, seconds: float, runs: int) -> dict[float, list[float]]:
    """Listener thread CPU (us) per announcement applied, per `gather` setting (0 and the default), per round."""
    from tiered_cache import TieredCache
    from tiered_cache.coherence import CoherenceListener

    default = inspect.signature(CoherenceListener).parameters["gather"].default
    per_msg: dict[float, list[float]] = {0.0: [], default: []}
    cache = TieredCache.connect(dsn, url, namespace="lmicro", near_max_entries=1000)
    try:
        listener = cache.listener
        assert listener is not None and listener.subscribed.wait(5), "listener did not subscribe"
        ctx = mp.get_context("spawn")
        for i in range(2 * runs):
            gather = (0.0, default)[i % 2]
            listener.gather = gather
            ready, start = ctx.Event(), ctx.Event()
            pub = ctx.Process(target=_publish, args=(url, listener.channel, rate, seconds + 0.5, ready, start))
            pub.start()
            if not ready.wait(60):  # a spawned interpreter's imports and connect, however busy the machine
                pub.kill()
                raise RuntimeError("the publisher process never connected")
            start.set()
            time.sleep(0.25)
            tid = listener._thread.native_id
            m0, c0 = listener.stats.messages, _thread_cpu(tid)
            _spin(seconds)
            m1, c1 = listener.stats.messages, _thread_cpu(tid)
            pub.join()
            if m1 == m0:
                raise RuntimeError("the listener applied no announcement")
            per_msg[gather].append((c1 - c0) / (m1 - m0) * 1e6)
    finally:
        cache.close()
    return per_msg


def render(per_msg: dict[float, list[float]], rate: int, seconds: float) -> str:
    runs = len(next(iter(per_msg.values())))
    lines = [f"coherence listener, {rate} announcements/s, main thread CPU-bound, {runs} rounds of {seconds:g} s "
             f"per setting (listener thread CPU per announcement, median and min-max)"]
    for gather, values in per_msg.items():
        lines.append(f"  gather={gather:g} s: {statistics.median(values):.1f} us ({min(values):.1f}-{max(values):.1f})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lmicro", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=int, default=300, help="announcements per second")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per round")
    p.add_argument("--runs", type=int, default=3, help="rounds per setting (taking turns)")
    args = p.parse_args(argv)
    from tiered_cache.testing import embedded_servers

    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    with embedded_servers() as (dsn, url):
        per_msg = measure(dsn, url, args.rate, args.seconds, args.runs)
    print(render(per_msg, args.rate, args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
