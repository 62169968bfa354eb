"""Fresh single flight (tiered_cache/_async/flights.py), on both APIs: callers of one key share a request only if
it was sent after they began; and get_latest's misses share PostgreSQL reads without ever missing a write."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from _apis import loop_thread, target
from tiered_cache import TieredCache
from tiered_cache._async.flights import AsyncFlights
from tiered_cache._sync.flights import Flights

CT = "app3_clue"
SITE = 101
WAIT = 20.0


class Server:
    """A request the test holds: each call is numbered, records when it was sent, and waits for its release."""

    def __init__(self) -> None:
        self.sent: list[float] = []
        self.releases: list[threading.Event] = []
        self.error: Exception | None = None
        self._guard = threading.Lock()

    def _begin(self) -> tuple[int, threading.Event]:
        with self._guard:
            self.sent.append(time.monotonic())
            self.releases.append(threading.Event())
            return len(self.sent), self.releases[-1]

    def sync(self) -> int:
        n, release = self._begin()
        assert release.wait(WAIT)
        if self.error is not None:
            raise self.error
        return n

    async def asynchronous(self) -> int:
        n, release = self._begin()
        while not release.is_set():
            await asyncio.sleep(0.001)
        if self.error is not None:
            raise self.error
        return n

    def wait_sent(self, n: int) -> None:
        deadline = time.monotonic() + WAIT
        while len(self.sent) < n:
            assert time.monotonic() < deadline, f"request {n} never sent"
            time.sleep(0.001)


class Asker:
    """flights.ask from a thread (sync API) or as a task on the test loop (async API): a future per call."""

    def __init__(self, api: str, server: Server) -> None:
        self.api, self.server = api, server
        self.flights: Any = Flights() if api == "sync" else AsyncFlights()
        self.pool = ThreadPoolExecutor(max_workers=64)
        self.began: list[float] = []

    def ask(self, key: str = "k") -> Any:
        began = time.monotonic()
        self.began.append(began)
        if self.api == "sync":
            return self.pool.submit(self.flights.ask, key, began, self.server.sync)
        return asyncio.run_coroutine_threadsafe(self.flights.ask(key, began, self.server.asynchronous),
                                                loop_thread().loop)

    def close(self) -> None:
        for release in self.server.releases:
            release.set()
        self.pool.shutdown(wait=True)


@pytest.fixture
def asker(api: str) -> Any:
    a = Asker(api, Server())
    yield a
    a.close()


def test_a_caller_never_gets_an_answer_sent_before_it_began(asker: Asker) -> None:
    """A request in the air older than a caller is not shared with it: it gets the next one, sent after both."""
    first = asker.ask()
    asker.server.wait_sent(1)
    late = [asker.ask() for _ in range(5)]  # all began after request 1 was sent
    asker.server.releases[0].set()
    assert first.result(WAIT) == (1, True)
    asker.server.wait_sent(2)
    asker.server.releases[1].set()
    answers = [f.result(WAIT) for f in late]
    assert sorted(n for n, _ in answers) == [2] * 5 and sum(mine for _, mine in answers) == 1
    assert len(asker.server.sent) == 2 and asker.server.sent[1] > max(asker.began)
    assert len(asker.flights) == 0


def test_a_burst_costs_two_requests_and_other_keys_are_apart(asker: Asker) -> None:
    """Thirty callers arriving while one request is in the air share one more request; another key has its own."""
    first = asker.ask()
    asker.server.wait_sent(1)
    burst = [asker.ask() for _ in range(30)]
    other = asker.ask("other")
    asker.server.wait_sent(2)  # the other key's, not queued behind this key's
    asker.server.releases[1].set()
    assert other.result(WAIT) == (2, True)
    asker.server.releases[0].set()
    first.result(WAIT)
    asker.server.wait_sent(3)
    asker.server.releases[2].set()
    assert {f.result(WAIT)[0] for f in burst} == {3}
    assert len(asker.server.sent) == 3


def test_an_error_answers_everyone_who_shared_the_request(asker: Asker) -> None:
    """The request raised: its sender and every caller that shared it get the error; the next call asks anew."""
    asker.server.error = RuntimeError("store down")
    first = asker.ask()
    asker.server.wait_sent(1)
    joined = [asker.ask() for _ in range(3)]
    asker.server.wait_sent(1)
    asker.server.releases[0].set()
    with pytest.raises(RuntimeError, match="store down"):
        first.result(WAIT)
    asker.server.wait_sent(2)
    asker.server.releases[1].set()
    for f in joined:
        with pytest.raises(RuntimeError, match="store down"):
            f.result(WAIT)
    asker.server.error = None
    again = asker.ask()
    asker.server.wait_sent(3)
    asker.server.releases[2].set()
    assert again.result(WAIT) == (3, True)


def test_a_cancelled_sender_leaves_its_sharers_asking_again() -> None:
    """A sender cancelled before its request was answered: whoever shared it sends (or shares) a new one."""
    server = Server()
    flights = AsyncFlights()
    loop = loop_thread().loop

    async def scenario() -> list[tuple[int, bool]]:
        sender = asyncio.ensure_future(flights.ask("k", time.monotonic() - 1, server.asynchronous))
        while not server.sent:
            await asyncio.sleep(0.001)
        began = time.monotonic() - 1  # began before request 1: it may share it
        sharers = [asyncio.ensure_future(flights.ask("k", began, server.asynchronous)) for _ in range(3)]
        await asyncio.sleep(0.01)
        sender.cancel()
        while len(server.sent) < 2:
            await asyncio.sleep(0.001)
        server.releases[1].set()
        return list(await asyncio.gather(*sharers))

    answers = asyncio.run_coroutine_threadsafe(scenario(), loop).result(WAIT)
    assert sorted(n for n, _ in answers) == [2, 2, 2] and sum(mine for _, mine in answers) == 1
    assert len(flights) == 0


# -- get_latest's misses ----------------------------------------------------------------------------


def hold_reads(cache: TieredCache, api: str) -> tuple[list[str], threading.Event, threading.Event]:
    """Count the store's reads; the first one pauses after PostgreSQL answered until the test releases it."""
    store = target(cache.store)
    original = store._read
    reads: list[str] = []
    held, release = threading.Event(), threading.Event()

    def pause(index: int) -> None:
        if index == 0:
            held.set()
            assert release.wait(WAIT), "never released"

    if api == "sync":
        def read(sql: str, params: Any, op: str) -> Any:
            reads.append(op)
            index = len(reads) - 1
            out = original(sql, params, op)
            pause(index)
            return out
    else:
        async def read(sql: str, params: Any, op: str) -> Any:
            reads.append(op)
            index = len(reads) - 1
            out = await original(sql, params, op)
            await asyncio.to_thread(pause, index)
            return out
    store._read = read
    return reads, held, release


def count_asks(cache: TieredCache, api: str) -> Callable[[], int]:
    """How many callers have asked the cache's shared get_latest reads so far."""
    flights = target(cache)._latest_reads
    original = flights.ask
    asked = [0]
    if api == "sync":
        def ask(*a: Any) -> Any:
            asked[0] += 1
            return original(*a)
    else:
        async def ask(*a: Any) -> Any:
            asked[0] += 1
            return await original(*a)
    flights.ask = ask
    return lambda: asked[0]


def wait_until(what: str, test: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not test():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def test_fifty_concurrent_misses_of_one_key_send_two_postgresql_reads(cache: TieredCache, api: str,
                                                                      r: redis.Redis) -> None:
    """A burst of get_latest misses in one process: one read in the air, one shared by everyone who came later."""
    row_id = cache.write_cache(CT, SITE, "hot", {"n": 1})
    entry = cache.keyset(CT, SITE, "hot").entry
    r.delete(entry)
    reads, held, release = hold_reads(cache, api)
    asked = count_asks(cache, api)
    with ThreadPoolExecutor(max_workers=50) as pool:
        futures = [pool.submit(cache.get_latest, CT, SITE, "hot") for _ in range(50)]
        assert held.wait(WAIT)
        wait_until("every caller asked", lambda: asked() == 50)
        release.set()
        rows = [f.result(WAIT) for f in futures]
    assert {r["id"] for r in rows} == {row_id} and len({id(r) for r in rows}) == 50  # a dict of its own each
    assert reads == ["get_latest"] * len(reads) and 1 <= len(reads) <= 2
    assert r.get(entry) is not None  # filled, under the one lease a caller got


def test_a_write_that_returned_before_a_miss_began_is_seen_while_an_older_read_is_in_the_air(
        cache: TieredCache, api: str, r: redis.Redis) -> None:
    """The read in the air predates the write: a call that began after the write never shares it."""
    cache.write_cache(CT, SITE, "k", {"v": "old"})
    entry = cache.keyset(CT, SITE, "k").entry
    r.delete(entry)
    reads, held, release = hold_reads(cache, api)
    asked = count_asks(cache, api)
    with ThreadPoolExecutor(max_workers=2) as pool:
        before = pool.submit(cache.get_latest, CT, SITE, "k")
        assert held.wait(WAIT)  # its read answered 'old' and is held before it returns
        new_id = cache.write_cache(CT, SITE, "k", {"v": "new"})
        r.delete(entry)  # so the next call misses Redis and asks PostgreSQL
        after = pool.submit(cache.get_latest, CT, SITE, "k")
        wait_until("the second call asked", lambda: asked() == 2)
        release.set()
        assert before.result(WAIT)["result_json"] == {"v": "old"}
        assert after.result(WAIT)["id"] == new_id
    assert len(reads) == 2


def test_get_latest_json_misses_share_reads_too(cache: TieredCache, api: str) -> None:
    """The JSON twin answers the shared read's bytes; a key with no row answers None for everyone."""
    reads, held, release = hold_reads(cache, api)
    asked = count_asks(cache, api)
    with ThreadPoolExecutor(max_workers=10) as pool:
        futures = [pool.submit(cache.get_latest_json, CT, SITE, "nothing") for _ in range(10)]
        assert held.wait(WAIT)
        wait_until("every caller asked", lambda: asked() == 10)
        release.set()
        assert [f.result(WAIT) for f in futures] == [None] * 10
    assert 1 <= len(reads) <= 2


@pytest.fixture
def r(redis_url: str) -> Any:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def hold_first_lease(cache: TieredCache, api: str) -> tuple[threading.Event, threading.Event]:
    """The first fill lease a caller asks for waits, before it is sent, until the test releases it."""
    tier = target(cache.redis)
    original = tier.lease
    reached, release = threading.Event(), threading.Event()

    def hold() -> None:
        if not reached.is_set():
            reached.set()
            assert release.wait(WAIT), "never released"

    if api == "sync":
        def lease(key: str) -> Any:
            hold()
            return original(key)
    else:
        async def lease(key: str) -> Any:
            await asyncio.to_thread(hold)
            return await original(key)
    tier.lease = lease
    return reached, release


def test_a_lease_granted_after_a_shared_read_was_sent_never_fills_that_read(cache: TieredCache, api: str,
                                                                           r: redis.Redis) -> None:
    """B began, then A's read went out and answered 'old', a write committed, then B's lease was granted: B must
    not fill A's answer under that lease (its snapshot predates the lease), so Redis never holds 'old' again."""
    cache.write_cache(CT, SITE, "k", {"v": "old"})
    entry = cache.keyset(CT, SITE, "k").entry
    r.delete(entry)
    lease_reached, lease_release = hold_first_lease(cache, api)
    reads, read_held, read_release = hold_reads(cache, api)
    asked = count_asks(cache, api)
    with ThreadPoolExecutor(max_workers=2) as pool:
        b = pool.submit(cache.get_latest, CT, SITE, "k")
        assert lease_reached.wait(WAIT)  # B missed Redis; its lease is not sent yet
        a = pool.submit(cache.get_latest, CT, SITE, "k")
        assert read_held.wait(WAIT)  # A took the lease, its read (sent after B began) answered 'old'
        new_id = cache.write_cache(CT, SITE, "k", {"v": "new"})  # kills A's lease
        lease_release.set()  # B's lease is granted now, after the write
        wait_until("B asked", lambda: asked() == 2)
        read_release.set()
        assert a.result(WAIT)["result_json"] == {"v": "old"}  # A began before the write: fine
        assert b.result(WAIT)["id"] == new_id
    raw = r.get(entry)
    assert raw is None or b'"new"' in raw
    assert cache.get_latest(CT, SITE, "k")["id"] == new_id


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_waits_for_a_request_its_parent_had_in_the_air() -> None:
    """The thread that sent it does not exist in the child: the child asks on its own and gets an answer."""
    server = Server()
    flights = Flights()
    with ThreadPoolExecutor(max_workers=1) as pool:
        held = pool.submit(flights.ask, "k", time.monotonic(), server.sync)
        server.wait_sent(1)
        pid = os.fork()
        if pid == 0:  # the child: leave with os._exit, never running the parent's cleanups
            code = 1
            try:
                done = threading.Event()
                threading.Thread(target=lambda: (flights.ask("k", time.monotonic(), lambda: 7), done.set()),
                                 daemon=True).start()
                code = 0 if done.wait(WAIT) else 2
            finally:
                os._exit(code)
        try:
            deadline = time.monotonic() + WAIT + 10
            while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0:
                assert time.monotonic() < deadline, "the child hung"
                time.sleep(0.01)
            assert os.waitstatus_to_exitcode(waited[1]) == 0
        finally:
            server.releases[0].set()
        assert held.result(WAIT) == (1, True)
