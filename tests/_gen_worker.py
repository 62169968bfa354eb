"""A process of get_or_generate callers for tests/test_generate_processes.py (sync threads or async tasks).

argv[1] is a JSON object: dsn, url, api ("sync"|"async"), target, callers, dir (shared folder), lease_ttl,
wait, and optional near (bool), settle (bool: warm up until a round met no Redis error, then collect
garbage, so a measurement starts from a settled process) and peers (int: after its callers are done, wait
until that many workers touched dir/done-<pid> before closing, so no worker's shutdown runs while another's
callers are still being measured). generate() appends this pid to dir/calls (counted
outside the library), touches dir/started-<pid>, then waits for dir/release (or `seconds`). Every caller's
outcome goes to dir/out-<pid>.json once all are done: start and end (time.time()), row id, result text, or the
error.
Callers start when dir/go (or the file named by `go`) exists, after this process wrote dir/ready-<pid>.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tiered_cache.policy.breaker import CLOSED

CT = "app3_clue"
SITE = 101


#: Warm-up rounds at most: until one opened every connection it needed without a Redis error.
_WARM_ROUNDS = 10


def _redis_trouble(cache: Any) -> tuple[int, int]:
    """Redis errors and skipped reads so far: a warm-up round that added none left the client settled."""
    return cache.redis.stats.errors, cache.redis.stats.skipped


def _after_peers(folder: Path, opts: dict[str, Any]) -> None:
    """Tell the others this process's callers are done; with `peers`, wait (a bounded while) until theirs are too."""
    (folder / f"done-{os.getpid()}").touch()
    deadline = time.monotonic() + 60.0
    while len(list(folder.glob("done-*"))) < opts.get("peers", 0) and time.monotonic() < deadline:
        time.sleep(0.005)


def _wait_for(path: Path, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.005)


def main() -> None:
    opts: dict[str, Any] = json.loads(sys.argv[1])
    folder = Path(opts["dir"])
    pid = os.getpid()

    def produced() -> dict[str, Any]:
        with open(folder / "calls", "a") as f:
            f.write(f"{pid}\n")
        (folder / f"started-{pid}").touch()
        return {"text": f"by {pid}"}

    def released() -> bool:
        return (folder / "release").exists()

    def outcome(start: float, fn: Any) -> dict[str, Any]:
        try:
            row = fn()
            return {"start": start, "end": time.time(), "id": row["id"], "text": row["result_json"]["text"]}
        except Exception as exc:
            return {"start": start, "end": time.time(), "error": f"{type(exc).__name__}: {exc}"}

    kwargs = {"lease_ttl": opts.get("lease_ttl", 30.0), "wait": opts.get("wait", 30.0)}
    near = {"near_max_entries": 1000} if opts.get("near") else {}
    seconds = opts.get("seconds")
    if opts["api"] == "sync":
        from tiered_cache import TieredCache

        cache = TieredCache.connect(opts["dsn"], opts["url"], **near, max_size=20)

        def generate() -> dict[str, Any]:
            result = produced()
            deadline = time.monotonic() + (seconds if seconds is not None else 120)
            while not released() and time.monotonic() < deadline:
                time.sleep(0.005)
            return result

        results: list[dict[str, Any]] = []
        guard = threading.Lock()

        def warm_round() -> None:
            warm = [threading.Thread(target=cache.get_latest, args=(CT, SITE, f"warm-{i}")) for i in range(opts["callers"])]
            for t in warm:
                t.start()
            for t in warm:
                t.join()

        for _ in range(_WARM_ROUNDS if opts.get("settle") else 1):
            before = _redis_trouble(cache)
            warm_round()
            if _redis_trouble(cache) == before and cache.redis.breaker.state is CLOSED:
                break
            time.sleep(0.2)
        if opts.get("settle"):
            gc.collect()  # startup's garbage is not the callers' to collect (a server collects, or freezes, once started)
        (folder / f"ready-{pid}").touch()
        _wait_for(folder / opts.get("go", "go"))

        def caller() -> None:
            start = time.time()
            got = outcome(start, lambda: cache.get_or_generate(CT, SITE, opts["target"], generate, **kwargs))
            with guard:
                results.append(got)

        threads = [threading.Thread(target=caller) for _ in range(opts["callers"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _after_peers(folder, opts)
        after = cache.get_latest(CT, SITE, opts["target"])
        cache.close()
    else:
        from tiered_cache import AsyncTieredCache

        async def run() -> tuple[list[dict[str, Any]], Any]:
            cache = await AsyncTieredCache.connect(opts["dsn"], opts["url"], **near, max_size=20)

            async def generate() -> dict[str, Any]:
                result = produced()
                deadline = time.monotonic() + (seconds if seconds is not None else 120)
                while not released() and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                return result

            async def caller() -> dict[str, Any]:
                start = time.time()
                try:
                    row = await cache.get_or_generate(CT, SITE, opts["target"], generate, **kwargs)
                    return {"start": start, "end": time.time(), "id": row["id"], "text": row["result_json"]["text"]}
                except Exception as exc:
                    return {"start": start, "end": time.time(), "error": f"{type(exc).__name__}: {exc}"}

            for _ in range(_WARM_ROUNDS if opts.get("settle") else 1):
                before = _redis_trouble(cache)
                await asyncio.gather(*(cache.get_latest(CT, SITE, f"warm-{i}") for i in range(opts["callers"])))
                if _redis_trouble(cache) == before and cache.redis.breaker.state is CLOSED:
                    break
                await asyncio.sleep(0.2)
            if opts.get("settle"):
                gc.collect()
            (folder / f"ready-{pid}").touch()
            while not (folder / opts.get("go", "go")).exists():
                await asyncio.sleep(0.005)
            got = await asyncio.gather(*(caller() for _ in range(opts["callers"])))
            await asyncio.to_thread(_after_peers, folder, opts)
            after = await cache.get_latest(CT, SITE, opts["target"])
            await cache.close()
            return list(got), after

        results, after = asyncio.run(run())
    out = {"pid": pid, "results": results, "after": None if after is None else after["id"]}
    tmp = folder / f"out-{pid}.tmp"
    tmp.write_text(json.dumps(out))
    tmp.rename(folder / f"out-{pid}.json")


if __name__ == "__main__":
    main()
