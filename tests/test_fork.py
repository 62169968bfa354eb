"""fork() after construction (gunicorn --preload, multiprocessing 'fork'): the child never serves the parent's past.

The parent builds its TieredCache, warms a near entry, then forks. A child inherits the near tier's
entries and flags but not the listener thread that kept them coherent, nor the relay thread; the
library's fork hook switches the near tier off, empties it and starts both threads again in the child.

Until PostgresStore resets its own pool in a child (its `_after_fork_in_child`), the child here is
given a fresh PostgresStore: the inherited pool's sockets are the parent's sessions. The child leaves
with os._exit (multiprocessing's fork start method), never closing what it inherited.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from _util import wait_until
from tiered_cache import PostgresStore, TieredCache

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

CT = "fork_t"  # no expiry policy: rows never expire
SITE = 3
KEY = (CT, SITE, "forked")
#: Reads starting this long after a write returned must see it in the other process: far above the
#: announcement delay (README: p99 2-8 ms) even on a loaded machine, far below near_max_age (30 s here),
#: which is how long the unfixed child served the parent's old entry.
BOUND = 0.5
WATCH = 1.5  # seconds of reads after the write


def _near(dsn: str, redis_url: str, **options: Any) -> TieredCache:
    cache = TieredCache.connect(dsn, redis_url, redis_timeout=1.0, near_max_entries=1000, near_max_age=30.0, **options)
    assert cache.listener is not None and cache.listener.subscribed.wait(10), "listener did not subscribe"
    return cache


def _warm(c: TieredCache) -> Any:
    """Read KEY until the near tier serves it."""
    hits = c.near.stats.hits  # type: ignore[union-attr]
    for _ in range(50):
        row = c.get_latest(*KEY)
        if c.near.stats.hits > hits:  # type: ignore[union-attr]
            return row
    raise AssertionError("the key never became a near hit")


def _own_store(cache: TieredCache, dsn: str) -> None:
    """In the child: a store of its own unless PostgresStore resets its pool after fork itself."""
    if not hasattr(cache.store, "_after_fork_in_child"):
        cache.store = PostgresStore(dsn)  # the inherited one is dropped, never closed


def _recv(conn: Any, timeout: float) -> tuple:
    if not conn.poll(timeout):
        raise AssertionError(f"no message from the forked child within {timeout} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise AssertionError("forked child failed:\n" + msg[1])
    return msg  # type: ignore[no-any-return]


@contextmanager
def _forked(target: Callable[..., None], *args: Any) -> Iterator[Any]:
    """Fork now (multiprocessing 'fork': os.fork, then target(*args, conn), then os._exit); yields our end."""
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_guarded, args=(target, *args, there), daemon=True)
    proc.start()
    try:
        yield here
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def _guarded(target: Callable[..., None], *args: Any) -> None:
    conn = args[-1]
    try:
        target(*args)
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def _read_loop(cache: TieredCache, until: Callable[[], bool]) -> list[tuple[float, float, int | None]]:
    """get_latest(KEY) until `until()`, each as (start, end, id)."""
    out = []
    while not until():
        s = time.monotonic()
        row = cache.get_latest(*KEY)
        out.append((s, time.monotonic(), None if row is None else row["id"]))
        time.sleep(0.0005)
    return out


def _stale(records: list[tuple[float, float, int | None]], rid: int, returned: float) -> tuple[int, int, int]:
    """(reads started after the write returned, of them not its row, of them started later than BOUND and not its row)."""
    after = [r for r in records if r[0] > returned]
    return (len(after), sum(r[2] != rid for r in after),
            sum(r[2] != rid for r in after if r[0] > returned + BOUND))


# ------------------------------------------------------------------ the parent writes, the child reads


def _child_reads(cache: TieredCache, dsn: str, conn: Any) -> None:
    _own_store(cache, dsn)
    first = cache.get_latest(*KEY)
    conn.send(("reading", None if first is None else first["id"]))
    notice: list[Any] = []

    def done() -> bool:
        if not notice and conn.poll():
            notice.append(conn.recv())
            notice.append(time.monotonic() + WATCH)
        return bool(notice) and time.monotonic() > notice[1]

    records = _read_loop(cache, done)
    listeners = sum(t.name == "tiered_cache-coherence" for t in threading.enumerate())
    conn.send(("done", records, cache.stats(), listeners, cache.near.active))  # type: ignore[union-attr]


def test_a_forked_child_sees_the_parents_write(dsn: str, redis_url: str, figure: Callable[[str], None]) -> None:
    """The parent's near entry is not served by the child after the parent changed it; the child's near tier works."""
    with _near(dsn, redis_url) as c:
        old = c.write_cache(*KEY, {"v": "old"})
        assert _warm(c)["id"] == old
        with _forked(_child_reads, c, dsn) as conn:
            assert _recv(conn, 30)[0] == "reading"
            new = c.write_cache(*KEY, {"v": "new"})
            returned = time.monotonic()
            conn.send(("written", new, returned))
            _, records, stats, listeners, active = _recv(conn, 30)
        assert _warm(c)["id"] == new  # the parent's own near tier is still coherent
    after, stale, beyond = _stale(records, new, returned)
    figure(f"[fork] child reads after the parent's write: {after}, not yet the new row {stale}, "
           f"beyond {BOUND} s {beyond}; child near hits {stats['near']['hits']}, listener threads {listeners}")
    assert after > 100
    assert beyond == 0, f"the child served the parent's old row {beyond} times more than {BOUND} s after the write"
    assert listeners == 1 and active, "the child's near tier did not come back with its own listener"
    assert stats["near"]["hits"] > 0, "the child's near tier never served"


# ------------------------------------------------------------------ the child writes, the parent reads


def _child_writes(cache: TieredCache, dsn: str, conn: Any) -> None:
    _own_store(cache, dsn)
    assert conn.recv()[0] == "go"
    rid = cache.write_cache(*KEY, {"v": "child"})
    returned = time.monotonic()
    row = cache.get_latest(*KEY)  # read-your-writes in the child too
    conn.send(("written", rid, returned, None if row is None else row["id"]))


def test_the_parent_sees_a_forked_childs_write(dsn: str, redis_url: str, figure: Callable[[str], None]) -> None:
    """A write made in a forked child reaches the parent's near tier by the announcement, as from any process."""
    with _near(dsn, redis_url) as c:
        old = c.write_cache(*KEY, {"v": "old"})
        assert _warm(c)["id"] == old
        with _forked(_child_writes, c, dsn) as conn:
            conn.send(("go",))
            news: list[Any] = []

            def done() -> bool:
                if not news and conn.poll():
                    news.append(_recv(conn, 0))
                return bool(news) and time.monotonic() > news[0][2] + WATCH

            records = _read_loop(c, done)
        _, rid, returned, child_read = news[0]
        assert child_read == rid
        after, stale, beyond = _stale(records, rid, returned)
        figure(f"[fork] parent reads after the child's write: {after}, not yet the new row {stale}, beyond {BOUND} s {beyond}")
        assert after > 100 and beyond == 0
        assert _warm(c)["id"] == rid


# ------------------------------------------------------------------ the relay


def _backends(dsn: str) -> set[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")}


def _child_relay(cache: TieredCache, dsn: str, conn: Any) -> None:
    _own_store(cache, dsn)
    relay = cache.relay
    assert relay is not None
    wait_until(lambda: relay._conn is not None and relay._listen is not None, 10, what="the child's relay connections")
    conn.send(("relaying", relay._thread is not None and relay._thread.is_alive(),
               relay._conn.info.backend_pid, relay._listen.info.backend_pid))  # type: ignore[union-attr]
    assert conn.recv()[0] == "changed"
    wait_until(lambda: relay.stats.changes >= 1, 10, what="the child's relay to apply the change")
    conn.send(("applied", relay.stats.changes))


def test_a_forked_child_runs_its_own_relay_on_fresh_connections(dsn: str, redis_url: str) -> None:
    """relay=True: the child restarts the relay on connections of its own; the parent's sessions survive."""
    with TieredCache.connect(dsn, redis_url, relay=True) as c:
        relay = c.relay
        assert relay is not None
        wait_until(lambda: relay._conn is not None and relay._listen is not None, 10, what="the relay to connect")
        parents = {relay._conn.info.backend_pid, relay._listen.info.backend_pid}  # type: ignore[union-attr]
        with _forked(_child_relay, c, dsn) as conn:
            _, alive, *childs = _recv(conn, 30)
            assert alive, "no relay thread in the child"
            assert not parents & set(childs), "the child relays on the parent's sessions"
            assert parents <= _backends(dsn), "the child closed the parent's relay sessions"
            relay.stop()  # from now on only the child's relay can apply the outbox
            with psycopg.connect(dsn, autocommit=True) as raw:
                raw.execute("INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, status) "
                            "VALUES (%s, %s, %s, '{}', 'valid')", KEY)
            conn.send(("changed",))
            assert _recv(conn, 30)[0] == "applied"


# ------------------------------------------------------------------ identities a child must not share


def _child_identity(cache: TieredCache, dsn: str, conn: Any) -> None:
    conn.send(("identity", cache.redis.publisher, cache.redis._token()))


def test_a_forked_child_announces_and_leases_under_its_own_name(dsn: str, redis_url: str) -> None:
    """A child sharing the parent's publisher id and counters would interleave its announcement numbers with the
    parent's (false gaps, hidden losses) and take lease tokens equal to the parent's (a stale fill accepted)."""
    with TieredCache.connect(dsn, redis_url) as c:
        with _forked(_child_identity, c, dsn) as conn:
            _, publisher, token = _recv(conn, 30)
        assert publisher != c.redis.publisher
        assert token != c.redis._token()
