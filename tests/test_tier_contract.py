"""The Redis tier's contract, run on a real redis-server and on fakeredis: what tiered_cache_fake may be trusted with.

Every tier test runs three times, once per backend ('real': the session's redis-server; 'real-async': the
same server under AsyncRedisTier on a redis.asyncio client, driven through tests/_apis.py's blocking view on
a real event loop; 'fake': fakeredis on a new FakeServer, with lupa for the Lua scripts). Each checks the
answers Redis itself gives (GET, PEXPIRETIME, PTTL, HGET, pub/sub), not only the tier's return values, so a
gap in fakeredis, or a difference between the sync and async tiers, shows.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
import redis
import redis.asyncio as aioredis

from tiered_cache import PostgresStore, TieredCache
from tiered_cache._async.client import async_redis_client, ready_client
from tiered_cache._feed import ChangeFeed
from tiered_cache._async.redis_tier import AsyncRedisTier
from tiered_cache._sync.client import redis_client
from tiered_cache.contracts import MISS
from tiered_cache.policy.entries import NEGATIVE, encode, encode_entry, expires_at_ms
from tiered_cache.policy.keys import KeySet, KeySpace
from tiered_cache.testing.fake import fake_redis_client
from tiered_cache.tiers.lua_scripts import FILL
from tiered_cache.tiers.redis import CONTENDED, RedisTier

from _apis import blocking
from _util import wait_until

LEASE_TTL = 30.0  # long enough that no lease expires by itself on a busy machine during a test
NEGATIVE_TTL, NO_EXPIRY_TTL, HISTORY_TTL = 10.0, 3600.0, 1800.0
CT, SITE = "app3_clue", 101
FILL_SHA = hashlib.sha1(FILL.encode()).hexdigest()
_NOW = datetime.now(timezone.utc)  # one instant for every row(), so row(1) always encodes the same bytes


@dataclass
class Backend:
    """One Redis to run the contract on: a client for the tier and a way to open more on the same data."""

    name: str
    client: redis.Redis
    new_client: Callable[[], redis.Redis]
    make_tier: Callable[..., RedisTier]  # (namespace, **options): a sync tier, or a blocking view of an async one


async def _async_tier(url: str, namespace: str, **options: Any) -> AsyncRedisTier:
    """An AsyncRedisTier on its own redis.asyncio client, built inside the event loop that will drive it."""
    client = aioredis.Redis.from_url(url) if url.startswith("redis://") else await ready_client(async_redis_client(url))
    return AsyncRedisTier(client, KeySpace(namespace), **options)


#: Where the contract runs: the session's redis-server (sync, async), a 3-primary cluster and a
#: Sentinel-watched primary (tests/_deployments.py; sync, async), and fakeredis.
BACKENDS = ["real", "real-async", "cluster", "cluster-async", "sentinel", "sentinel-async", "fake"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The session's flushed redis-server, a flushed cluster or Sentinel deployment, or a fakeredis on a new
    FakeServer shared by every client of the test."""
    opened: list[Any] = []
    tiers: list[Any] = []
    kind = request.param.removesuffix("-async")
    if kind in ("cluster", "sentinel"):
        url = request.getfixturevalue(f"clean_{kind}").url

        def new_client() -> redis.Redis:  # the library's own client for the URL: watched, bounded
            opened.append(redis_client(url, timeout=1.0))
            return opened[-1]
    elif request.param.startswith("real"):
        url = request.getfixturevalue("redis_url")

        def new_client() -> redis.Redis:
            opened.append(redis.Redis.from_url(url))
            return opened[-1]
    else:
        import fakeredis

        server = fakeredis.FakeServer()

        def new_client() -> redis.Redis:
            opened.append(fake_redis_client(server))
            return opened[-1]

    client = new_client()

    def make_tier(namespace: str, **options: Any) -> Any:
        if request.param.endswith("-async"):
            tiers.append(blocking(_async_tier)(url, namespace, **options))
        else:
            tiers.append(RedisTier(client, KeySpace(namespace), **options))
        return tiers[-1]

    yield Backend(request.param, client, new_client, make_tier)
    for t in tiers:
        t.close()
        if request.param.endswith("-async"):
            t.client.aclose()
    for c in opened:
        c.close()


@pytest.fixture
def tier(backend: Backend) -> RedisTier:
    """A RedisTier on the backend, namespace 'contract' (closed with the backend)."""
    return backend.make_tier("contract", negative_ttl=NEGATIVE_TTL, no_expiry_ttl=NO_EXPIRY_TTL,
                             history_ttl=HISTORY_TTL, lease_ttl=LEASE_TTL)


def ks_of(tier: RedisTier, target: str = "k") -> KeySet:
    return tier.keys.keyset(CT, SITE, target)


def row(row_id: int = 1, *, expires_in: timedelta | None = timedelta(days=7)) -> dict[str, Any]:
    """A row as the store returns it: only id and expires_at matter to the tier."""
    at = None if expires_in is None else (_NOW + expires_in).isoformat()
    return {"id": row_id, "expires_at": at, "result_json": {"v": row_id}}


def expire_time(client: redis.Redis, key: str) -> tuple[int, int]:
    """(absolute expiry in Unix ms, tolerance): PEXPIRETIME on Redis 7+, else TIME + PTTL in one MULTI."""
    try:
        return client.pexpiretime(key), 0
    except redis.ResponseError:  # the embedded 6.2 fallback has no PEXPIRETIME
        pipe = client.pipeline(transaction=True)
        pipe.time()
        pipe.pttl(key)
        (sec, usec), pttl = pipe.execute()
        return sec * 1000 + usec // 1000 + pttl, 2


def assert_expires_at(client: redis.Redis, key: str, expected: int) -> None:
    got, tolerance = expire_time(client, key)
    assert abs(got - expected) <= tolerance, (key, got, expected)


def assert_pttl_near(client: redis.Redis, key: str, seconds: float) -> None:
    """PTTL set from `seconds`, allowing a minute of a slow machine."""
    ttl = client.pttl(key)
    assert seconds * 1000 - 60_000 < ttl <= seconds * 1000, (key, ttl)


def fill(tier: RedisTier, ks: KeySet, r: dict[str, Any] | None) -> str:
    """Lease then fill, as a reader that missed does; returns the token."""
    token = tier.lease(ks.lease)
    assert token is not None
    tier.fill_entry(ks, token, encode_entry(r), r)
    return token


# -- leases and fills ---------------------------------------------------------------------------


def test_a_miss_takes_a_lease_that_a_second_reader_cannot_take(tier: RedisTier, backend: Backend) -> None:
    """A missed key's lease is SET NX PX lease_ttl with a unique token; a second lease() gets None."""
    ks = ks_of(tier)
    assert tier.get_raw(ks.entry) is MISS
    token = tier.lease(ks.lease)
    assert token is not None and backend.client.get(ks.lease) == token.encode()
    assert 0 < backend.client.pttl(ks.lease) <= LEASE_TTL * 1000
    assert tier.lease(ks.lease) is None
    other = ks_of(tier, "other")
    held, taken = tier.leases([ks.lease, other.lease])  # the pipelined form: one SET NX PX per key
    assert held is None and taken is not None and backend.client.get(other.lease) == taken.encode()


def test_a_fill_under_its_lease_stores_until_the_rows_expiry(tier: RedisTier, backend: Backend) -> None:
    """A fill under a standing lease stores the entry with PXAT = the row's expires_at and consumes the lease."""
    ks, r = ks_of(tier), row()
    fill(tier, ks, r)
    assert backend.client.get(ks.entry) == encode_entry(r)
    assert_expires_at(backend.client, ks.entry, expires_at_ms(r))  # type: ignore[arg-type]
    assert backend.client.exists(ks.lease) == 0
    assert tier.get_raw(ks.entry) == encode_entry(r)
    assert (tier.stats.fills, tier.stats.fills_refused, tier.stats.hits) == (1, 0, 1)


def test_a_row_without_expiry_is_stored_for_the_no_expiry_cap(tier: RedisTier, backend: Backend) -> None:
    """A row with expires_at NULL is stored with PX no_expiry_ttl."""
    ks = ks_of(tier)
    fill(tier, ks, row(expires_in=None))
    assert_pttl_near(backend.client, ks.entry, NO_EXPIRY_TTL)


def test_a_fill_of_an_already_expired_row_is_refused(tier: RedisTier, backend: Backend) -> None:
    """The fill script compares PXAT with Redis's TIME: a row already expired is never stored."""
    ks = ks_of(tier)
    fill(tier, ks, row(expires_in=timedelta(seconds=-5)))
    assert backend.client.exists(ks.entry) == 0
    assert (tier.stats.fills, tier.stats.fills_refused) == (0, 1)


def test_a_negative_entry_is_stored_for_negative_ttl(tier: RedisTier, backend: Backend) -> None:
    """A fill of 'no row' stores NEGATIVE with PX negative_ttl, and get_raw serves it."""
    ks = ks_of(tier)
    fill(tier, ks, None)
    assert backend.client.get(ks.entry) == NEGATIVE
    assert_pttl_near(backend.client, ks.entry, NEGATIVE_TTL)
    assert tier.get_raw(ks.entry) == NEGATIVE


def test_a_fill_after_a_kill_is_refused(tier: RedisTier, backend: Backend) -> None:
    """A kill between lease and fill removes the lease, so the reader's (older) view is not stored."""
    ks = ks_of(tier)
    token = tier.lease(ks.lease)
    assert token is not None
    tier.kill([ks])
    tier.fill_entry(ks, token, encode_entry(row()), row())
    assert backend.client.exists(ks.entry) == 0
    assert (tier.stats.fills, tier.stats.fills_refused) == (0, 1)


def test_fills_in_one_pipeline_keep_the_lease_rule_per_key(tier: RedisTier, backend: Backend) -> None:
    """fill_entries stores the keys whose lease stood and refuses the one killed meanwhile."""
    a, b = ks_of(tier, "a"), ks_of(tier, "b")
    ta, tb = tier.leases([a.lease, b.lease])
    assert ta is not None and tb is not None
    tier.kill([b])
    tier.fill_entries([(a, ta, encode_entry(row(1)), row(1)), (b, tb, encode_entry(row(2)), row(2))])
    assert backend.client.get(a.entry) == encode_entry(row(1)) and backend.client.exists(b.entry) == 0
    assert (tier.stats.fills, tier.stats.fills_refused) == (1, 1)


def test_scripts_flushed_from_redis_are_loaded_again(tier: RedisTier, backend: Backend) -> None:
    """After SCRIPT FLUSH, EVALSHA's NOSCRIPT (alone and inside a pipeline) loads the script and retries."""
    a, b = ks_of(tier, "a"), ks_of(tier, "b")
    fill(tier, a, row(1))
    assert backend.client.script_exists(FILL_SHA) == [True]
    backend.client.script_flush()
    assert backend.client.script_exists(FILL_SHA) == [False]
    fill(tier, b, row(2))
    backend.client.script_flush()
    c = ks_of(tier, "c")
    (tc,) = tier.leases([c.lease])
    tier.fill_entries([(c, tc, encode_entry(row(3)), row(3))])  # type: ignore[list-item]
    assert [backend.client.get(k.entry) for k in (a, b, c)] == [encode_entry(row(i)) for i in (1, 2, 3)]
    assert tier.stats.errors == 0


# -- writers ------------------------------------------------------------------------------------


def test_a_writer_lease_displaces_a_reader_lease(tier: RedisTier, backend: Backend) -> None:
    """lease_for_write overwrites a reader's lease (SET GET), so that reader's fill is refused."""
    ks = ks_of(tier)
    reader = tier.lease(ks.lease)
    writer = tier.lease_for_write(ks)
    assert isinstance(writer, str) and writer.startswith("w") and reader is not None
    assert backend.client.get(ks.lease) == writer.encode()
    tier.fill_entry(ks, reader, encode_entry(row()), row())
    assert backend.client.exists(ks.entry) == 0 and tier.stats.fills_refused == 1


def test_two_writers_in_flight_both_only_kill(tier: RedisTier, backend: Backend) -> None:
    """The second writer's lease displaces the first's: it gets CONTENDED, and neither write-through stores."""
    ks = ks_of(tier)
    fill(tier, ks, row(1))
    first = tier.lease_for_write(ks)
    second = tier.lease_for_write(ks)
    assert isinstance(first, str) and second is CONTENDED
    tier.write_through(ks, second, row(3), "1002")
    assert backend.client.exists(*ks.all) == 0
    tier.write_through(ks, first, row(2), "1001")  # its lease was displaced, then killed
    assert backend.client.exists(*ks.all) == 0
    assert tier.stats.writes_through == 1 and tier.stats.kills == 1


def test_write_through_stores_only_if_the_writer_lease_stood(tier: RedisTier, backend: Backend) -> None:
    """A standing writer lease: entry and writer txid stored with PXAT = expiry. A lease killed meanwhile: nothing."""
    ks, r = ks_of(tier), row(5)
    token = tier.lease_for_write(ks)
    tier.write_through(ks, token, r, "777")
    assert backend.client.get(ks.entry) == encode_entry(r) and backend.client.get(ks.writer) == b"777"
    for key in (ks.entry, ks.writer):
        assert_expires_at(backend.client, key, expires_at_ms(r))  # type: ignore[arg-type]
    assert backend.client.exists(ks.lease) == 0

    token = tier.lease_for_write(ks)
    tier.kill([ks])  # another process's change committed in between
    tier.write_through(ks, token, row(6), "778")
    assert backend.client.exists(*ks.all) == 0


def test_write_through_of_no_row_stores_a_negative_entry(tier: RedisTier, backend: Backend) -> None:
    """invalidate's write-through stores NEGATIVE for negative_ttl."""
    ks = ks_of(tier)
    tier.write_through(ks, tier.lease_for_write(ks), None, "9")
    assert backend.client.get(ks.entry) == NEGATIVE
    assert_pttl_near(backend.client, ks.entry, NEGATIVE_TTL)


def test_write_through_of_an_expired_row_stores_nothing(tier: RedisTier, backend: Backend) -> None:
    """A write whose row is already expired (by Redis's TIME) only kills."""
    ks = ks_of(tier)
    fill(tier, ks, row(1))
    tier.write_through(ks, tier.lease_for_write(ks), row(2, expires_in=timedelta(seconds=-5)), "10")
    assert backend.client.exists(*ks.all) == 0


def test_writer_leases_on_many_keys_refuse_every_fill_in_flight(tier: RedisTier, backend: Backend) -> None:
    """leases_for_write (invalidate_site, before its commit) displaces each key's reader lease in one pipeline."""
    keysets = [ks_of(tier, t) for t in "abc"]
    tokens = tier.leases([ks.lease for ks in keysets])
    tier.leases_for_write(keysets)
    assert all(backend.client.get(ks.lease).startswith(b"w") for ks in keysets)  # type: ignore[union-attr]
    tier.fill_entries([(ks, t, encode_entry(row(1)), row(1)) for ks, t in zip(keysets, tokens)])  # type: ignore[misc]
    assert backend.client.exists(*(ks.entry for ks in keysets)) == 0 and tier.stats.fills_refused == 3


def test_release_deletes_only_its_own_token(tier: RedisTier, backend: Backend) -> None:
    """release() with a token that is not the current lease leaves the lease; with its own it deletes it."""
    ks = ks_of(tier)
    reader = tier.lease(ks.lease)
    writer = tier.lease_for_write(ks)
    tier.release(ks, reader)
    assert backend.client.get(ks.lease) == writer.encode()
    tier.release(ks, writer)
    assert backend.client.exists(ks.lease) == 0
    tier.release(ks, CONTENDED)  # no-op sentinels touch nothing
    tier.release(ks, None)
    assert tier.stats.errors == 0


# -- kills --------------------------------------------------------------------------------------


class _Announcements:
    """What the tier announces, as a listener receives it (on a cluster: every slot's channel on its primary)."""

    def __init__(self, backend: Backend, channel: str) -> None:
        self.feed = ChangeFeed(backend.new_client(), channel, timeout=5.0)
        self.feed.open(threading.Event(), 30.0)
        self.waiting: list[str] = []

    def next(self) -> str:
        def arrived() -> bool:
            self.waiting += [d.decode() if isinstance(d, bytes) else d for d in self.feed.drain(time.monotonic())]
            if not self.waiting:
                time.sleep(0.01)
            return bool(self.waiting)

        wait_until(arrived, timeout=30, what="announcement")
        return self.waiting.pop(0)

    def close(self) -> None:
        self.feed.shutdown()


def subscribe(backend: Backend, channel: str) -> _Announcements:
    """Subscribed (every confirmation received) wherever the tier announces."""
    return _Announcements(backend, channel)


def next_message(pubsub: _Announcements) -> str:
    """The next announcement's data, polled with a generous bound."""
    return pubsub.next()


def seed_all_keys(tier: RedisTier, ks: KeySet) -> None:
    """An entry (with writer txid), a history hash, a fill lease, a history lease and a regeneration marker."""
    tier.write_through(ks, tier.lease_for_write(ks), row(1), "500")
    token = tier.lease(ks.history_lease)
    tier.fill_history(ks, token, 2, encode([row(1)]))  # type: ignore[arg-type]
    tier.lease(ks.lease)
    tier.lease(ks.history_lease)
    tier.client.set(ks.regenerating, encode(row(0)), px=30_000)
    assert tier.client.exists(*ks.all) == 6  # the tier's own client: redis.asyncio on 'real-async'


def test_a_kill_removes_entry_history_and_leases_and_publishes(tier: RedisTier, backend: Backend) -> None:
    """kill() deletes all six keys of the key and announces 'publisher:seq:entry' on the change channel."""
    ks, other = ks_of(tier), ks_of(tier, "untouched")
    pubsub = subscribe(backend, tier.keys.channel)
    seed_all_keys(tier, ks)
    fill(tier, other, row(9))
    assert re.fullmatch(rf"{tier.publisher}:\d+:{re.escape(ks.entry)}", next_message(pubsub))  # the write-through
    tier.kill([ks])
    assert backend.client.exists(*ks.all) == 0 and backend.client.exists(other.entry) == 1
    assert re.fullmatch(rf"{tier.publisher}:\d+:{re.escape(ks.entry)}", next_message(pubsub))
    pubsub.close()


def test_a_write_through_removes_every_key_but_what_it_stores(tier: RedisTier, backend: Backend) -> None:
    """write_through deletes history, leases and the regeneration marker, and stores only the entry and txid."""
    ks = ks_of(tier)
    seed_all_keys(tier, ks)
    tier.write_through(ks, tier.lease_for_write(ks), row(2), "501")
    assert [backend.client.exists(k) for k in ks.all] == [1, 0, 0, 0, 1, 0]
    assert backend.client.get(ks.entry) == encode_entry(row(2))


def test_a_history_only_kill_spares_the_entry(tier: RedisTier, backend: Backend) -> None:
    """kill(history_only=True) (a placeholder came or went) deletes history, its lease and the regeneration marker,
    keeps entry, lease and txid."""
    ks = ks_of(tier)
    seed_all_keys(tier, ks)
    tier.kill([ks], history_only=True)
    assert [backend.client.exists(k) for k in ks.all] == [1, 0, 1, 0, 1, 0]


def test_a_relay_kill_with_the_writers_txid_spares_the_entry(tier: RedisTier, backend: Backend) -> None:
    """kill_or_raise with the txid that stored the entry answers 0, keeps it and publishes a key-less no-op."""
    ks = ks_of(tier)
    tier.write_through(ks, tier.lease_for_write(ks), row(1), "4242")
    pubsub = subscribe(backend, tier.keys.channel)
    assert tier.kill_or_raise([ks], txids=["4242"]) == [0]
    assert backend.client.get(ks.entry) == encode_entry(row(1))
    assert re.fullmatch(rf"{tier.publisher}:\d+:", next_message(pubsub))
    assert tier.kill_or_raise([ks], txids=["4243"]) == [1]
    assert backend.client.exists(*ks.all) == 0
    assert next_message(pubsub).endswith(":" + ks.entry)
    pubsub.close()


def test_flush_namespace_drops_only_this_namespace_and_announces(tier: RedisTier, backend: Backend) -> None:
    """flush_namespace UNLINKs every key under 'contract:' (SCAN MATCH), keeps other namespaces, publishes '*'."""
    for i in range(30):
        fill(tier, ks_of(tier, f"t{i}"), row(i))
    foreign = backend.make_tier("contract2")
    fill(foreign, foreign.keys.keyset(CT, SITE, "t0"), row(1))
    pubsub = subscribe(backend, tier.keys.channel)
    assert tier.flush_namespace() == 30
    assert list(backend.client.scan_iter(match="contract:*")) == []
    assert backend.client.exists(foreign.keys.entry(CT, SITE, "t0")) == 1
    assert next_message(pubsub).endswith(":*")
    pubsub.close()


# -- reads --------------------------------------------------------------------------------------


def test_get_raws_is_one_mget_with_misses_in_place(tier: RedisTier, backend: Backend) -> None:
    """get_raws answers each key's stored bytes or MISS, in order, and counts hits and misses."""
    a, b, c = (ks_of(tier, t) for t in "abc")
    fill(tier, a, row(1))
    fill(tier, c, None)
    assert tier.get_raws([a.entry, b.entry, c.entry]) == [encode_entry(row(1)), MISS, NEGATIVE]
    assert tier.get_raws([b.entry]) == [MISS]
    assert (tier.stats.hits, tier.stats.misses) == (2, 2)


def test_history_fill_sets_a_hash_field_and_pexpire(tier: RedisTier, backend: Backend) -> None:
    """fill_history HSETs the limit's field under the history lease and PEXPIREs the hash to history_ttl."""
    ks = ks_of(tier)
    two, five = encode([row(2), row(1)]), encode([row(2), row(1), row(0)])
    tier.fill_history(ks, tier.lease(ks.history_lease), 2, two)  # type: ignore[arg-type]
    tier.fill_history(ks, tier.lease(ks.history_lease), 5, five)  # type: ignore[arg-type]
    assert backend.client.hgetall(ks.history) == {b"2": two, b"5": five}
    assert_pttl_near(backend.client, ks.history, HISTORY_TTL)
    assert tier.get_history(ks, 2) == two and tier.get_history(ks, 3) is MISS
    stale = tier.lease(ks.history_lease)
    tier.kill([ks], history_only=True)
    tier.fill_history(ks, stale, 2, two)  # type: ignore[arg-type]
    assert backend.client.exists(ks.history) == 0 and tier.stats.fills_refused == 1


# -- through the facade -------------------------------------------------------------------------


def pg_expiry_ms(dsn: str, row_id: int) -> int:
    """expires_at of a row in Unix ms (floored), computed by PostgreSQL."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        got = conn.execute("SELECT floor(extract(epoch FROM expires_at) * 1000)::bigint FROM biz.ai_cache "
                           "WHERE id = %s", (row_id,)).fetchone()
    assert got is not None and got[0] is not None
    return int(got[0])


#: The facade tests build a sync TieredCache on the backend's client: the real and fake Redis only (the facade
#: suite drives AsyncTieredCache itself, through make_cache).
_SYNC_CLIENTS = pytest.mark.parametrize("backend", ["real", "fake"], indirect=True)


@pytest.fixture
def facade(store: PostgresStore, backend: Backend) -> Iterator[TieredCache]:
    """A TieredCache over the real store and the backend's client."""
    with TieredCache(store, backend.client, namespace="contract") as cache:
        yield cache


@_SYNC_CLIENTS
def test_facade_reads_through_writes_through_and_invalidates(facade: TieredCache, backend: Backend) -> None:
    """get_latest fills (PXAT = PostgreSQL's expiry) then hits; write_cache stores; invalidate caches 'no row'."""
    r = backend.client
    first = facade.store.write_cache(CT, SITE, "m", {"v": 1})
    ks = facade.keyset(CT, SITE, "m")
    assert facade.get_latest(CT, SITE, "m")["id"] == first  # type: ignore[index]
    assert_expires_at(r, ks.entry, pg_expiry_ms(facade.store.dsn, first))
    assert facade.get_latest(CT, SITE, "m")["id"] == first  # type: ignore[index]
    assert (facade.redis.stats.misses, facade.redis.stats.fills, facade.redis.stats.hits) == (1, 1, 1)
    second = facade.write_cache(CT, SITE, "m", {"v": 2})
    assert_expires_at(r, ks.entry, pg_expiry_ms(facade.store.dsn, second))
    assert r.get(ks.writer) is not None, "the write-through stores its transaction id beside the entry"
    assert facade.get_latest(CT, SITE, "m")["result_json"] == {"v": 2}  # type: ignore[index]
    assert facade.invalidate(CT, SITE, "m") == 2
    assert r.get(ks.entry) == NEGATIVE and facade.get_latest(CT, SITE, "m") is None


@_SYNC_CLIENTS
def test_facade_get_many_and_history_use_one_mget_and_the_history_hash(facade: TieredCache, backend: Backend) -> None:
    """get_many fills misses (negative for empty cells) and hits after; get_history is cached per limit."""
    a = facade.write_cache(CT, SITE, "a", {"v": "a"})
    got = facade.get_many(CT, SITE, ["a", "b"])
    assert got["a"]["id"] == a and got["b"] is None  # type: ignore[index]
    assert backend.client.get(facade.keyset(CT, SITE, "b").entry) == NEGATIVE
    hits = facade.redis.stats.hits
    assert facade.get_many(CT, SITE, ["a", "b"]) == got and facade.redis.stats.hits == hits + 2
    history = facade.get_history(CT, SITE, "a", limit=2)
    assert backend.client.hkeys(facade.keyset(CT, SITE, "a").history) == [b"2"]
    assert facade.get_history(CT, SITE, "a", limit=2) == history
    facade.set_generating(CT, SITE, "a")
    assert backend.client.exists(facade.keyset(CT, SITE, "a").history) == 0
    assert facade.get_latest(CT, SITE, "a")["id"] == a  # type: ignore[index]


@_SYNC_CLIENTS
def test_near_tiers_of_two_processes_stay_coherent(store: PostgresStore, backend: Backend,
                                                  request: pytest.FixtureRequest) -> None:
    """A write in one process evicts the other's near-tier copy through the change channel."""
    near = {"near_max_entries": 100, "near_max_age": 60.0}  # no entry ages out between two reads on a slow machine
    one = TieredCache(store, backend.new_client(), namespace="contract", **near)
    two = TieredCache(store, backend.new_client(), namespace="contract", **near)
    try:
        for cache in (one, two):
            listener = cache.listener
            assert listener is not None
            # Bounded: stop early once the listener has failed to subscribe three times in a row.
            wait_until(lambda: listener.subscribed.is_set() or listener.stats.reconnects >= 3, timeout=30,
                       what="the near tier's listener subscribes or fails")
            assert listener.subscribed.is_set(), f"listener failed {listener.stats.reconnects} times to subscribe"
        store.write_cache(CT, SITE, "n", {"v": 1})  # PostgreSQL only: no announcement can race the reads below
        assert two.get_latest(CT, SITE, "n")["result_json"] == {"v": 1}  # type: ignore[index]
        assert two.get_latest(CT, SITE, "n")["result_json"] == {"v": 1}  # type: ignore[index]
        assert two.near is not None and two.near.stats.hits == 1
        one.write_cache(CT, SITE, "n", {"v": 2})
        wait_until(lambda: two.get_latest(CT, SITE, "n")["result_json"] == {"v": 2}, timeout=30,  # type: ignore[index]
                   what="the other process sees the write")
    finally:
        one.close()
        two.close()
