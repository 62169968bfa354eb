"""Redis answering errors instead of timing out: OOM, BUSY, MISCONF, READONLY, NOREPLICAS, an empty local pool.

Where a kill can still be applied (OOM, BUSY once it clears, a pool that frees up) no read that starts
after a write returned may see the old row: not from a second TieredCache object in this process, not
from a second OS process. Where Redis refuses every write but keeps serving reads (READONLY, MISCONF,
NOREPLICAS) the old row may be served until each reader's write probe sees the refusal: at most
PROBE_INTERVAL after it began (tiers/redis.py); measured here, per reader, from the write's return to
the start of the last read that still returned the old row.

Each scenario runs its own redis-server, so it can CONFIG it; PostgreSQL is the session's. The slow scenarios run
once per API (the `api` fixture): writer, readers here and readers in the second process all of that API.
Times are time.monotonic(): CLOCK_MONOTONIC, one clock for every process on the machine.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import shutil
import tempfile
from pathlib import Path
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis._parsers.base import BaseParser
from redis.backoff import NoBackoff
from redis.retry import Retry

from _apis import connect_cache
from faultproxy import FaultProxy
from tiered_cache import AsyncPostgresStore, PostgresStore, TieredCache
from tiered_cache.contracts import DOWN
from tiered_cache.facade import redis_client
from tiered_cache.policy.breaker import CLOSED
from tiered_cache.policy.failures import BUSY, NOSCRIPT, OOM, OTHER, OUTAGE, SATURATED, WRITES_REFUSED, classify
from tiered_cache.policy.keys import KeySpace
from tiered_cache.testing import RedisServer
from tiered_cache.tiers.redis import RedisTier
from _util import pct, wait_until

CT, SITE = "app3_clue", 31
PROBE_INTERVAL = 0.5  # RedisTier's default probe_interval: the documented bound
SLACK = 0.5  # a loaded 2-core machine may start a reader's next read late
NO_RETRY = Retry(NoBackoff(), 0)


def ident(row: dict[str, Any] | None) -> int | None:
    return None if row is None else row["id"]


def admin_of(server: RedisServer) -> redis.Redis:
    """A client for CONFIG and fault injection: long timeout, no retries."""
    return redis.Redis.from_url(server.url, socket_timeout=10, retry=NO_RETRY)


# --------------------------------------------------------------------------- the classifier, over real exceptions

# Error answers exactly as Redis 7.0 and 6.2 sent them (recorded from both), parsed by redis-py's own parser.
ANSWERS = {
    "OOM command not allowed when used memory > 'maxmemory'.": OOM,
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.": BUSY,
    "LOADING Redis is loading the dataset in memory": BUSY,
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.": BUSY,
    "NOSCRIPT No matching script. Please use EVAL.": NOSCRIPT,
    "READONLY You can't write against a read only replica.": WRITES_REFUSED,
    "READONLY You can't write against a read only replica. script: d06f, on @user_script:1.": WRITES_REFUSED,
    "ERR Error running script (call to f_d06f): @user_script:1: @user_script: 1: -READONLY You can't write "
    "against a read only replica.": WRITES_REFUSED,
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.": WRITES_REFUSED,
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk. "
    "script: d06f, on @user_script:1.": WRITES_REFUSED,
    "NOREPLICAS Not enough good replicas to write.": WRITES_REFUSED,
    "ERR Error running script (call to f_d06f): @user_script:1: @user_script: 1: -NOREPLICAS Not enough good "
    "replicas to write.": WRITES_REFUSED,
    "NOPERM this user has no permissions to run the 'del' command": WRITES_REFUSED,
    "WRONGTYPE Operation against a key holding the wrong kind of value": OTHER,
    "ERR unknown command 'EVALSHA', with args beginning with:": OTHER,
    "ERR Error running script (call to f_d06f): @user_script:1: Script killed by user with SCRIPT KILL...": OTHER,
}


@pytest.mark.parametrize("answer", sorted(ANSWERS))
def test_error_answers_are_classified_by_what_still_works(answer: str) -> None:
    """Each error answer, as redis-py raises it, gets its kind; none of them is an outage (the breaker ignores them)."""
    exc = BaseParser.parse_error(answer)
    assert classify(exc) is ANSWERS[answer]
    assert not classify(exc).outage


def test_no_answer_is_an_outage_and_an_empty_pool_is_not() -> None:
    """A refused connection and a timeout are outages; redis-py's 'No connection available.' (the local pool is
    empty: Redis may be fine) is saturation, and a kill may wait for a connection."""
    port = closed_port()
    with pytest.raises(redis.ConnectionError) as refused:
        redis.Redis(port=port, socket_connect_timeout=0.5, retry=NO_RETRY).ping()
    assert classify(refused.value) is OUTAGE
    assert classify(redis.TimeoutError("Timeout reading from socket")) is OUTAGE
    assert classify(ConnectionResetError(104, "Connection reset by peer")) is OUTAGE
    pool = redis.BlockingConnectionPool(port=port, max_connections=1, timeout=0.01)
    pool.pool.get_nowait()  # the one slot is taken (as by a busy thread), no server needed
    with pytest.raises(redis.ConnectionError) as empty:
        pool.get_connection()
    assert str(empty.value) == "No connection available." and classify(empty.value) is SATURATED
    assert SATURATED.retry_kill and not SATURATED.outage and not SATURATED.refusing
    unblocking = redis.ConnectionPool(port=port, max_connections=1)
    unblocking.make_connection()  # counted, not connected
    with pytest.raises(redis.ConnectionError) as too_many:
        unblocking.get_connection()
    assert classify(too_many.value) is SATURATED


def test_loading_is_busy_although_redis_py_makes_it_a_connection_error() -> None:
    """BusyLoadingError subclasses ConnectionError, yet Redis answered: transient, not an outage."""
    exc = BaseParser.parse_error("LOADING Redis is loading the dataset in memory")
    assert isinstance(exc, redis.ConnectionError)
    assert classify(exc) is BUSY and BUSY.retry_kill and BUSY.refusing and not BUSY.outage


# --------------------------------------------------------------------------- readers, here and in a second process


class Readers:
    """Several cache objects of one API in one process, each with its own Redis tier (so its own probe phase)."""

    def __init__(self, api: str, dsn: str, redis_url: str, n: int) -> None:
        # 1 s Redis timeout: these tests pin error answers; a stall past 50 ms on a loaded runner is the fault path.
        self.caches = [connect_cache(api, dsn, redis_url, redis_timeout=1.0) for _ in range(n)]

    def read(self, target: str) -> list[int | None]:
        """One read of the key by every object."""
        return [ident(c.get_latest(CT, SITE, target)) for c in self.caches]

    def warm(self, target: str, want: int, timeout: float) -> bool:
        """Until every object served `want` from Redis (a hit): the entry is cached and no tier holds off Redis."""
        waiting = set(range(len(self.caches)))
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for i in sorted(waiting):
                cache = self.caches[i]
                hits = cache.redis.stats.hits
                if ident(cache.get_latest(CT, SITE, target)) == want and cache.redis.stats.hits > hits:
                    waiting.discard(i)
            time.sleep(0.01)
        return not waiting

    def watch(self, target: str, old: int, seconds: float) -> list[float | None]:
        """Read the key round robin for `seconds`; per object, the start time of its last read that returned `old`."""
        last: list[float | None] = [None] * len(self.caches)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for i, cache in enumerate(self.caches):
                started = time.monotonic()
                if ident(cache.get_latest(CT, SITE, target)) == old:
                    last[i] = started
            time.sleep(0.0005)
        return last

    def close(self) -> None:
        for cache in self.caches:
            cache.close()


def serve_readers(api: str, dsn: str, redis_url: str, n: int, conn: Any) -> None:
    """Child process: Readers answering (method, *args) requests over a Pipe until ('stop',)."""
    try:
        readers = Readers(api, dsn, redis_url, n)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready",))
    try:
        while True:
            method, *args = conn.recv()
            if method == "stop":
                break
            conn.send(("ok", getattr(readers, method)(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        readers.close()


class Remote:
    """The test's end of a child process running serve_readers."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def send(self, method: str, *args: Any) -> None:
        self.conn.send((method, *args))

    def result(self, timeout: float = 60.0) -> Any:
        assert self.conn.poll(timeout), "the reader process did not answer"
        status, value = self.conn.recv()
        assert status == "ok", value
        return value

    def call(self, method: str, *args: Any) -> Any:
        self.send(method, *args)
        return self.result()


@contextlib.contextmanager
def remote_readers(api: str, dsn: str, redis_url: str, n: int) -> Iterator[Remote]:
    """A spawned process (it shares nothing with this one but the servers) holding n reader objects of `api`."""
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=serve_readers, args=(api, dsn, redis_url, n, there), daemon=True)
    proc.start()
    try:
        assert here.poll(60), "the reader process did not start"
        first = here.recv()
        assert first == ("ready",), first
        yield Remote(here)
        here.send(("stop",))
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def spread(values: list[float]) -> str:
    return (f"p50 {pct(values, 50) * 1000:.0f} ms, p99 {pct(values, 99) * 1000:.0f} ms, "
            f"max {max(values) * 1000:.0f} ms over {len(values)}")


# --------------------------------------------------------------------------- OOM: kills still land


def fill_until_oom(admin: redis.Redis) -> int:
    """SET junk until Redis answers OOM, then lower maxmemory 1 MB below what is used: every memory-growing
    command stays refused even though each kill frees an entry (and client buffers shrink when idle)."""
    for n in range(100_000):
        try:
            admin.set(f"junk:{n}", b"x" * 4096)
        except redis.OutOfMemoryError:
            break
    else:
        raise AssertionError("Redis never answered OOM")
    admin.config_set("maxmemory", admin.info("memory")["used_memory"] - (1 << 20))
    with pytest.raises(redis.OutOfMemoryError):
        admin.set("oom-check", 1, nx=True, px=5000)  # a lease-sized SET is refused too
    return n


@pytest.mark.fault
@pytest.mark.slow
def test_oom_noeviction_kills_land_before_the_write_returns(api: str, dsn: str, figure: Callable[[str], None]) -> None:
    """Redis full with noeviction (SET answers OOM, DEL works): after write_cache, finalize_cache or invalidate
    returned, a second cache object and a second process read the new state, never the old entry."""
    with RedisServer(maxmemory="4mb", maxmemory_policy="noeviction") as rs, \
            remote_readers(api, dsn, rs.url, 1) as remote:
        admin = admin_of(rs)
        writer = connect_cache(api, dsn, rs.url, redis_timeout=1.0)
        local = Readers(api, dsn, rs.url, 1)
        try:
            ops = ("write", "finalize", "invalidate")
            targets = [f"oom-{i}" for i in range(30)]
            expected: dict[str, Any] = {}
            gens: dict[str, int] = {}
            for i, target in enumerate(targets):
                v1 = writer.write_cache(CT, SITE, target, {"v": 1, "pad": "p" * 100})
                if ops[i % 3] == "finalize":
                    gens[target] = writer.set_generating(CT, SITE, target)  # v1 stays the latest until finalized
                assert local.warm(target, v1, 10) and remote.call("warm", target, v1, 10)
            junk = fill_until_oom(admin)
            stale: list[str] = []
            refused = 0
            for i, target in enumerate(targets):
                errors = writer.redis.stats.errors
                op = ops[i % 3]
                if op == "write":
                    expected[target] = writer.write_cache(CT, SITE, target, {"v": 2})
                elif op == "finalize":
                    assert writer.finalize_cache(gens[target], {"v": 2}) is True
                    expected[target] = gens[target]
                else:
                    writer.invalidate(CT, SITE, target)
                    expected[target] = None
                refused += writer.redis.stats.errors > errors  # the writer's lease was answered OOM
                seen = local.read(target) + remote.call("read", target)
                stale.extend(f"{op} {target}: read {s} after it returned {expected[target]}"
                             for s in seen if s != expected[target])
                assert writer.redis.pending == 0, "an OOM answer left the kill owed"
            figure(f"{api}: OOM (maxmemory 4mb, noeviction): {len(targets)} writes (write/finalize/invalidate), "
                   f"{refused} of them answered OOM; stale reads after the write returned: {len(stale)} of "
                   f"{2 * len(targets)} (a second object, a second process); breaker trips "
                   f"{writer.redis.breaker.trips}, junk keys {junk}")
            assert refused == len(targets), "Redis was not refusing every writer's lease: OOM not tested"
            assert not stale, stale[:5]
            assert writer.redis.breaker.trips == 0
        finally:
            writer.close()
            local.close()
            admin.close()


# --------------------------------------------------------------------------- BUSY: the kill waits for SCRIPT KILL


BUSY_SCRIPT = """
local t = redis.call('TIME')
local stop_at = tonumber(t[1]) + 5
while tonumber(redis.call('TIME')[1]) < stop_at do end
return 1
"""


def is_busy(admin: redis.Redis) -> bool:
    try:
        admin.get("anything")
    except redis.ResponseError as exc:
        return str(exc).startswith("BUSY")
    return False


@pytest.mark.fault
@pytest.mark.slow
def test_busy_script_kill_lands_once_script_kill_clears_it(api: str, dsn: str, figure: Callable[[str], None]) -> None:
    """A long Lua script makes Redis answer BUSY; a write during it retries its kill until SCRIPT KILL, so once the
    write returned a second object and a second process read the new row (no owed kill on a backoff)."""
    with RedisServer() as rs, remote_readers(api, dsn, rs.url, 1) as remote:
        admin = admin_of(rs)
        admin.config_set("lua-time-limit", 50)  # busy-reply-threshold on Redis 7: answer BUSY after 50 ms
        writer = connect_cache(api, dsn, rs.url, redis_timeout=1.0)
        local = Readers(api, dsn, rs.url, 1)
        try:
            stale: list[str] = []
            waited: list[float] = []
            for i in range(8):
                target = f"busy-{i}"
                v1 = writer.write_cache(CT, SITE, target, {"v": 1})
                assert local.warm(target, v1, 15) and remote.call("warm", target, v1, 15)
                blocker = redis.Redis.from_url(rs.url, socket_timeout=30, retry=NO_RETRY)

                def block(client: redis.Redis = blocker) -> None:
                    with contextlib.suppress(redis.ResponseError):  # "Script killed by user with SCRIPT KILL"
                        client.eval(BUSY_SCRIPT, 0)

                script = threading.Thread(target=block, daemon=True)
                script.start()
                wait_until(lambda: is_busy(admin), 10, interval=0.01, what="Redis answering BUSY")
                delay = random.uniform(0.05, 0.25)
                killer = threading.Timer(delay, admin.script_kill)
                start = time.monotonic()
                killer.start()
                v2 = writer.write_cache(CT, SITE, target, {"v": 2})
                returned = time.monotonic()
                killer.join()
                script.join(10)
                blocker.close()
                waited.append(returned - start)
                assert returned - start >= delay, "the write returned before SCRIPT KILL: its kill was not applied"
                seen = local.read(target) + remote.call("read", target)
                stale.extend(f"{target}: read {s}, not {v2}; SCRIPT KILL {delay * 1000:.0f} ms in, write returned "
                             f"{(returned - start) * 1000:.0f} ms in" for s in seen if s != v2)
            figure(f"{api}: BUSY (script, SCRIPT KILL 50-250 ms into the write): {len(waited)} writes, write took "
                   f"{spread(waited)}; stale reads after the write returned: {len(stale)} of {2 * len(waited)}; "
                   f"owed kills {writer.redis.pending}")
            assert not stale, stale
            assert writer.redis.pending == 0
        finally:
            writer.close()
            local.close()
            admin.close()


# --------------------------------------------------------------------------- writes refused, reads served


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flush_announced(pubsub: Any, timeout: float) -> bool:
    """Was a flush ('publisher:seq:*') announced on the change channel (within timeout)?"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.05)
        if msg and msg["type"] == "message" and msg["data"].endswith(b":*"):
            return True
    return False


class Refusal:
    """How to make one Redis refuse every write while it keeps serving reads, and how to undo it."""

    def __init__(self, kind: str, admin: redis.Redis, rdb_dir: str) -> None:
        self.kind = kind
        self.admin = admin
        self.rdb_dir = rdb_dir

    def prepare(self) -> None:
        if self.kind == "MISCONF":
            # A save point (stop-writes-on-bgsave-error needs one), then a BGSAVE that fails: its dir is gone.
            self.admin.config_set("stop-writes-on-bgsave-error", "no")
            self.admin.config_set("save", "3600 1000000")
            shutil.rmtree(self.rdb_dir)
            self.admin.bgsave()
            wait_until(lambda: self.admin.info("persistence")["rdb_last_bgsave_status"] == "err", 10,
                       interval=0.05, what="BGSAVE failed")

    def start(self) -> None:
        if self.kind == "MISCONF":
            self.admin.config_set("stop-writes-on-bgsave-error", "yes")
        elif self.kind == "READONLY":
            self.admin.execute_command("REPLICAOF", "127.0.0.1", closed_port())  # keeps its data, serves reads
        else:
            self.admin.config_set("min-replicas-to-write", 1)
        with pytest.raises(redis.ResponseError, match=self.kind if self.kind != "READONLY" else "read only"):
            self.admin.set("refusal-check", 1)

    def stop(self) -> None:
        if self.kind == "MISCONF":
            self.admin.config_set("stop-writes-on-bgsave-error", "no")
        elif self.kind == "READONLY":
            self.admin.execute_command("REPLICAOF", "NO", "ONE")
        else:
            self.admin.config_set("min-replicas-to-write", 0)
        self.admin.delete("refusal-check")


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["READONLY", "MISCONF", "NOREPLICAS"])
def test_writes_refused_reads_served_old_row_is_served_only_within_the_probe_bound(
        api: str, kind: str, dsn: str, request: pytest.FixtureRequest, figure: Callable[[str], None]) -> None:
    """Redis refuses every write (the kill too) but serves reads: each reader stops serving its entries within
    PROBE_INTERVAL (+ slack) of the write's return, in this process and in another; the writer at once."""
    # Not under tmp_path: as root the server runs as an unprivileged user, who cannot enter pytest's 0700 dirs.
    rdb_dir = Path(tempfile.mkdtemp(prefix="tc-rdb-"))
    rdb_dir.chmod(0o777)
    request.addfinalizer(lambda: shutil.rmtree(rdb_dir, ignore_errors=True))
    episodes, before, after = 3, (0.2, 0.6), 2.5
    with RedisServer(extra_args=("--dir", str(rdb_dir))) as rs, remote_readers(api, dsn, rs.url, 3) as remote:
        admin = admin_of(rs)
        refusal = Refusal(kind, admin, str(rdb_dir))
        refusal.prepare()
        writer = connect_cache(api, dsn, rs.url, redis_timeout=1.0)
        local = Readers(api, dsn, rs.url, 3)
        staleness: list[float] = []
        back: list[float] = []
        announced = admin.pubsub(ignore_subscribe_messages=True)
        announced.subscribe(writer.keys.channel)
        try:
            for episode in range(episodes):
                target = f"{kind}-{episode}"
                v1 = writer.write_cache(CT, SITE, target, {"v": 1})
                assert local.warm(target, v1, 20) and remote.call("warm", target, v1, 20), "readers not on Redis"
                lead = random.uniform(*before)
                remote.send("watch", target, v1, lead + after)
                watched: list[list[float | None]] = []
                watcher = threading.Thread(target=lambda: watched.append(local.watch(target, v1, lead + after)))
                watcher.start()
                time.sleep(lead)  # every reader is serving v1 from Redis
                refusal.start()
                v2 = writer.write_cache(CT, SITE, target, {"v": 2})
                returned = time.monotonic()
                assert flush_announced(announced, 5), "no flush announced for the near tiers"
                assert ident(writer.get_latest(CT, SITE, target)) == v2, "the writer served its old entry"
                assert writer.redis.pending == 1, "the refused kill must be owed"
                watcher.join(lead + after + 30)
                last = watched[0] + remote.result()
                assert all(t is not None for t in last), f"a reader never served v1 before the write: {last}"
                staleness.extend(max(0.0, t - returned) for t in last)  # type: ignore[operator]
                refusal.stop()
                stopped = time.monotonic()
                wait_until(lambda: writer.redis.pending == 0, 10, what="the owed kill landing")
                back.append(time.monotonic() - stopped)
                assert local.read(target) + remote.call("read", target) == [v2] * 6
            figure(f"{api} {kind}: old row served after the write returned, per reader (3 objects here, 3 in another "
                   f"process, {episodes} writes): {spread(staleness)}; bound {PROBE_INTERVAL * 1000:.0f} ms "
                   f"(probe_interval); owed kill landed {spread(back)} after writes were accepted again")
            assert max(staleness) <= PROBE_INTERVAL + SLACK, f"old row served {max(staleness):.3f} s after the write"
        finally:
            announced.close()
            writer.close()
            local.close()
            admin.close()


# --------------------------------------------------------------------------- an empty local pool is not an outage


def test_an_empty_pool_is_not_an_outage_and_the_kill_waits_for_a_connection(
        api: str, dsn: str, redis_url: str, make_cache: Callable[..., TieredCache]) -> None:
    """With every pooled connection in use, reads go to PostgreSQL without tripping the breaker, and a write's
    kill waits (bounded) for a connection instead of being owed: another object reads the new row at once."""
    from _apis import new_cache, new_redis_client, open_store

    store_class = PostgresStore if api == "sync" else AsyncPostgresStore
    client = new_redis_client(api, redis_url, timeout=0.05, max_connections=2)
    writer = new_cache(api, open_store(api, store_class, dsn), client, owns_clients=True)
    other = make_cache(dsn, redis_url, redis_timeout=1.0)
    try:
        v1 = writer.write_cache(CT, SITE, "pool", {"v": 1})
        assert ident(other.get_latest(CT, SITE, "pool")) == v1
        pool = client.connection_pool
        held = [pool.get_connection() for _ in range(2)]
        for _ in range(5):
            assert ident(writer.get_latest(CT, SITE, "pool")) == v1  # from PostgreSQL
        assert writer.redis.breaker.state == CLOSED and writer.redis.breaker.trips == 0, "a full pool tripped it"
        releaser = threading.Timer(0.3, lambda: [pool.release(c) for c in held])
        releaser.start()
        v2 = writer.write_cache(CT, SITE, "pool", {"v": 2})
        releaser.join()
        assert writer.redis.pending == 0, "the kill was owed instead of waiting for a connection"
        assert ident(other.get_latest(CT, SITE, "pool")) == v2
        assert writer.redis.breaker.trips == 0
    finally:
        writer.close()


async def _async_tier_on(url: str, namespace: str, **client_options: Any) -> Any:
    """An AsyncRedisTier on the bounded redis.asyncio client, built inside the loop that drives it."""
    from tiered_cache._async.client import async_redis_client
    from tiered_cache._async.redis_tier import AsyncRedisTier

    return AsyncRedisTier(async_redis_client(url, **client_options), KeySpace(namespace))


@pytest.mark.parametrize("api", ["sync", "async"])
def test_an_empty_pool_is_saturated_not_an_outage_on_either_client(redis_url: str, api: str) -> None:
    """Both clients' blocking pools say 'No connection available.' when empty: a read answers DOWN without counting
    toward the breaker, and a kill waits (up to kill_wait) for a connection instead of being owed."""
    from _apis import blocking

    admin = redis.Redis.from_url(redis_url)
    if api == "sync":
        tier: Any = RedisTier(redis_client(redis_url, timeout=0.05, max_connections=1), KeySpace("pool"))
    else:
        tier = blocking(_async_tier_on)(redis_url, "pool", timeout=0.05, max_connections=1)
    ks = tier.keys.keyset(CT, SITE, "k")
    try:
        admin.set(ks.entry, b"stale")
        assert tier.get_raw(ks.entry) == b"stale"
        pool = tier.client.connection_pool
        held = pool.get_connection()
        for _ in range(3):
            assert tier.get_raw(ks.entry) is DOWN
        assert tier.stats.saturated == 3 and tier.breaker.failures == 0 and tier.breaker.trips == 0
        releaser = threading.Timer(0.3, pool.release, (held,))  # the async pool's release runs on the loop (Blocking)
        releaser.start()
        tier.kill([ks])
        releaser.join()
        assert tier.pending == 0, "the kill was owed instead of waiting for a connection"
        assert admin.exists(ks.entry) == 0
    finally:
        tier.close()
        if api == "async":
            tier.client.aclose()
        admin.close()


# --------------------------------------------------------------------------- owed kills are bounded


@pytest.mark.fault
def test_owed_kills_are_bounded_then_the_namespace_is_dropped(dsn: str, redis_url: str,
                                                             make_cache: Callable[..., TieredCache]) -> None:
    """Past max_owed owed kills the tier stops remembering keys and owes one namespace drop instead; once Redis
    answers, the drop lands (even untouched keys go) and only then does the writer read Redis again."""
    proxy = FaultProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0])).start()
    writer = make_cache(dsn, f"redis://127.0.0.1:{proxy.port}/0", redis_timeout=0.2)
    other = make_cache(dsn, redis_url, redis_timeout=1.0)
    admin = redis.Redis.from_url(redis_url)
    try:
        writer.redis.max_owed = 20
        targets = [f"owed-{i}" for i in range(30)]
        v1 = {t: writer.write_cache(CT, SITE, t, {"v": 1}) for t in targets + ["untouched"]}
        assert [ident(other.get_latest(CT, SITE, t)) for t in targets] == [v1[t] for t in targets]
        proxy.reset()
        v2 = {t: writer.write_cache(CT, SITE, t, {"v": 2}) for t in targets}
        assert len(writer.redis._owed.keys) <= 20, "the owed-kill set grew past its bound"
        assert writer.redis.pending >= 30 and writer.redis.stats.owed_overflows == 1
        assert [ident(writer.get_latest(CT, SITE, t)) for t in targets] == [v2[t] for t in targets]
        assert admin.exists(writer.keyset(CT, SITE, "untouched").entry)
        proxy.heal()
        wait_until(lambda: writer.redis.pending == 0, 10, what="the namespace drop landing")
        assert not admin.exists(writer.keyset(CT, SITE, "untouched").entry), "the namespace was not dropped"
        assert [ident(other.get_latest(CT, SITE, t)) for t in targets] == [v2[t] for t in targets]
        hits = writer.redis.stats.hits
        assert [ident(writer.get_latest(CT, SITE, t)) for t in targets] == [v2[t] for t in targets]
        assert writer.redis.stats.hits > hits, "the writer never read Redis again"
    finally:
        admin.close()
        proxy.close()


# --------------------------------------------------------------------------- fork


def test_a_forked_child_gets_new_locks_and_keeps_its_owed_kills(redis_url: str, tmp_path: Any) -> None:
    """Forked while other threads held the tier's locks: the child can still owe, drain and read (no deadlock),
    keeps the parent's owed kills, restarts the drainer it lost, and takes its own lease-token prefix."""
    proxy = FaultProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0])).start()
    client = redis_client(f"redis://127.0.0.1:{proxy.port}/0", timeout=0.2)
    keys = KeySpace("forked")
    tier = RedisTier(client, keys)
    admin = redis.Redis.from_url(redis_url)
    out = tmp_path / "child.txt"
    try:
        old, new = keys.keyset("t", 1, "old"), keys.keyset("t", 1, "new")
        admin.set(old.entry, b"stale")
        admin.set(new.entry, b"stale")
        proxy.reset()
        tier.kill([old])
        assert tier.pending == 1
        watch = client.connection_pool.connection_kwargs["redis_connect_func"]
        locks = [tier._owed.lock, tier._owed.drain_lock, tier._probe.lock, tier.breaker._lock, watch._lock]
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            for lock in locks:
                lock.acquire()
            held.set()
            release.wait(30)
            for lock in locks:
                lock.release()

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: only this thread survived; every lock above looks held
            code = 1
            try:
                tier.kill([new])  # owes: takes the owed-kill lock
                assert tier.pending == 2, tier.pending
                assert tier.get_raw(new.entry) is DOWN
                deadline = time.monotonic() + 20
                while tier.pending and time.monotonic() < deadline:
                    time.sleep(0.02)
                out.write_text(f"{tier.pending} {tier.publisher}\n")
                code = 0
            finally:
                os._exit(code)
        release.set()
        holder.join(10)
        time.sleep(0.3)
        proxy.heal()
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung (a lock inherited held)")
        assert os.waitstatus_to_exitcode(status) == 0
        pending, publisher = out.read_text().split()
        assert pending == "0", "the child's owed kills never landed"
        assert publisher != tier.publisher, "the child announces and leases as its parent"
        assert not admin.exists(old.entry, new.entry)
    finally:
        tier.close()
        client.close()
        admin.close()
        proxy.close()
