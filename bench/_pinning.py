"""CPU placement for a benchmark run: the client on one CPU, the servers on the others, for the whole run.

On this 2-core VM a loopback Redis round trip costs ~30-45 us when the client and redis-server happen to
run on the same core and ~120-140 us when they run on different ones (a cross-core wakeup; measured with
sched_setaffinity, 3 rounds). Left to the scheduler, placement follows how long a contender computes between
round trips: the floor's tight GET loop got pulled onto Redis's core (64 us a chat op with every contender
in the process, 140 us with only a few), TieredCache's did not (119-142 us), so its ratio to the floor read
0.79x in one run and 1.57x in another. Pinned, every contender gets the same, deployment-like placement:
the client never shares a core with the servers, as it would not share a machine.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def _children(pid: int) -> list[int]:
    out = []
    for task in _threads(pid):
        with contextlib.suppress(OSError):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def pin(server_pids: list[int]) -> dict[str, list[int]] | None:
    """This process (and the threads it starts from now on) on CPU 0; each server, its threads and children on the rest.

    None where it cannot be done (one CPU, no sched_setaffinity, a server not ours to move): the run goes on unpinned.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    client, servers = {cpus[0]}, set(cpus[1:])
    try:
        todo = list(server_pids)
        while todo:  # postmaster's backends and workers too; new backends inherit from the postmaster
            pid = todo.pop()
            for task in _threads(pid):
                os.sched_setaffinity(task, servers)
            todo += _children(pid)
        os.sched_setaffinity(0, client)
    except OSError:
        return None
    return {"client": sorted(client), "servers": sorted(servers)}


def server_pids(dsn: str, redis_url: str) -> list[int]:
    """The postmaster behind dsn and the redis-server behind redis_url (asked of the servers themselves)."""
    import psycopg
    import redis

    with psycopg.connect(dsn, autocommit=True) as conn:
        backend = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    with contextlib.suppress(OSError, IndexError, ValueError):
        stat = Path(f"/proc/{backend}/stat").read_text()
        postmaster = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: the parent
    client = redis.Redis.from_url(redis_url)
    try:
        redis_pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    return [postmaster, redis_pid]
