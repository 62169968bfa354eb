"""The change outbox and its relay: writes made around TieredCache (raw SQL, ETL, psql) reach Redis.

Every write here goes through psycopg straight into biz.ai_cache, never through the cache, so only
the trigger -> biz.ai_cache_changes -> Relay path can remove what Redis holds. Tests that stop or
kill a server use their own servers (module fixture `own`), so the session servers stay healthy.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis
from psycopg.types.json import Jsonb

from faultproxy import FaultProxy
from tiered_cache import TieredCache, migrate
from tiered_cache.relay import Relay
from tiered_cache.testing import PostgresServer, RedisServer
from tiered_cache.verify import verify
from _util import pct, wait_until

CT = "app3_clue"
SITE = 7

INSERT = """
INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, status, expires_at)
VALUES (%s, %s, %s, %s, 'valid', now() + interval '7 days') RETURNING id
"""
LAST_SEQ_IN_TX = "SELECT max(seq) FROM biz.ai_cache_changes"


# --------------------------------------------------------------------------- helpers




def raw_insert(conn: psycopg.Connection[Any], target: str, payload: dict[str, Any]) -> int:
    return conn.execute(INSERT, (CT, SITE, target, Jsonb(payload))).fetchone()[0]  # type: ignore[index]


def outbox_count(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM biz.ai_cache_changes").fetchone()[0]  # type: ignore[index]


def relay_state(dsn: str, name: str = "default") -> tuple[int, int]:
    """(last_seq, applied) of a relay, (0, 0) before its first batch."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT last_seq, applied FROM biz.ai_cache_relay_state WHERE relay = %s", (name,)
        ).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def entry_exists(cache: TieredCache, target: str, client: redis.Redis | None = None) -> bool:
    return bool((client or cache.redis.client).exists(cache.keys.entry(CT, SITE, target)))


def warm(cache: TieredCache, dsn: str, targets: list[str]) -> None:
    """Let the relay apply the outbox (it also kills what the cache's own writes stored), then read each
    key so its entry is in Redis: the state every test starts its raw change from."""
    wait_until(lambda: outbox_count(dsn) == 0, 5, what="outbox drained")
    for t in targets:
        cache.get_latest(CT, SITE, t)
    assert all(entry_exists(cache, t) for t in targets)


def assert_verified(cache: TieredCache, figure: Callable[[str], None]) -> None:
    report = verify(cache)
    figure(f"  verify: {report.summary()}")
    assert not report.mismatches, report.mismatches


@pytest.fixture
def rcache(dsn: str, redis_url: str) -> Iterator[TieredCache]:
    """A TieredCache with its relay running, over the emptied session servers."""
    with TieredCache.connect(dsn, redis_url, relay=True) as c:
        yield c


@pytest.fixture
def raw(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit psycopg connection: writes that bypass the cache."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


# --------------------------------------------------------------------------- applying each kind of change


def test_raw_insert_update_delete_truncate_reach_redis(rcache: TieredCache, raw: psycopg.Connection[Any], dsn: str,
                                                       figure: Callable[[str], None]) -> None:
    """Each raw statement kills the cached entry through the relay; the next get_latest returns the new state."""
    c = rcache
    v1 = c.write_cache(CT, SITE, "a", {"v": 1})
    warm(c, dsn, ["a"])
    assert c.get_latest(CT, SITE, "a")["id"] == v1  # type: ignore[index]
    timings = {}

    v2 = raw_insert(raw, "a", {"v": 2})
    timings["insert"] = wait_until(lambda: not entry_exists(c, "a"), 5, what="entry killed after raw INSERT")
    row = c.get_latest(CT, SITE, "a")
    assert row is not None and row["id"] == v2 and row["result_json"] == {"v": 2}
    assert entry_exists(c, "a")  # filled again, with v2

    raw.execute("UPDATE biz.ai_cache SET result_json = %s WHERE id = %s", (Jsonb({"v": 3}), v2))
    timings["update"] = wait_until(lambda: not entry_exists(c, "a"), 5, what="entry killed after raw UPDATE")
    row = c.get_latest(CT, SITE, "a")
    assert row is not None and row["id"] == v2 and row["result_json"] == {"v": 3}

    raw.execute("DELETE FROM biz.ai_cache WHERE cache_type = %s AND site_id = %s AND target_id = 'a'", (CT, SITE))
    timings["delete"] = wait_until(lambda: not entry_exists(c, "a"), 5, what="entry killed after raw DELETE")
    assert c.get_latest(CT, SITE, "a") is None
    assert entry_exists(c, "a")  # the negative entry

    c.write_cache(CT, SITE, "a", {"v": 4})
    c.write_cache(CT, SITE, "b", {"v": 1})
    warm(c, dsn, ["a", "b"])
    assert c.get_latest(CT, SITE, "a")["result_json"] == {"v": 4}  # type: ignore[index]
    assert c.get_latest(CT, SITE, "b")["result_json"] == {"v": 1}  # type: ignore[index]
    flushes = c.relay.stats.flushes  # type: ignore[union-attr]
    raw.execute("TRUNCATE biz.ai_cache")
    timings["truncate"] = wait_until(lambda: not entry_exists(c, "a") and not entry_exists(c, "b"), 5,
                                     what="namespace flushed after TRUNCATE")
    # The relay counts its flush after both SCAN passes and the announcement: wait for it, do not assume it.
    wait_until(lambda: c.relay.stats.flushes == flushes + 1, 5, what="the relay to count its flush")  # type: ignore[union-attr]
    assert c.get_latest(CT, SITE, "a") is None and c.get_latest(CT, SITE, "b") is None
    figure("outbox: raw SQL -> entry gone: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items()))
    assert c.relay.stats.errors == 0  # type: ignore[union-attr]
    assert_verified(c, figure)


def test_rolled_back_write_records_no_change(dsn: str, redis_url: str, cache: TieredCache) -> None:
    """A rolled-back raw write leaves no outbox row (and so never wakes a kill); a committed one leaves one."""
    cache.write_cache(CT, SITE, "rb", {"v": 1})
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE biz.ai_cache_changes")  # the cache's own write recorded one; start from zero
    with psycopg.connect(dsn) as conn:
        raw_insert(conn, "rb", {"v": "never"})
        conn.execute("UPDATE biz.ai_cache SET score = 1 WHERE target_id = 'rb'")
        assert conn.execute("SELECT count(*) FROM biz.ai_cache_changes").fetchone()[0] == 2  # type: ignore[index]
        conn.rollback()
    assert outbox_count(dsn) == 0
    assert entry_exists(cache, "rb")  # nothing to kill
    with psycopg.connect(dsn, autocommit=True) as conn:
        raw_insert(conn, "rb", {"v": 2})
    assert outbox_count(dsn) == 1


def test_outbox_pruned_and_relay_state_advances(rcache: TieredCache, raw: psycopg.Connection[Any], dsn: str) -> None:
    """Applied rows leave the outbox; relay_state.last_seq reaches the newest seq written and counts them."""
    before_seq, before_applied = relay_state(dsn)
    seqs = []
    for i in range(20):
        with raw.transaction():
            raw_insert(raw, f"p{i}", {"i": i})
            seqs.append(raw.execute(LAST_SEQ_IN_TX).fetchone()[0])  # type: ignore[index]
    wait_until(lambda: outbox_count(dsn) == 0, 5, what="outbox pruned")
    wait_until(lambda: relay_state(dsn)[0] >= max(seqs), 5, what="relay_state.last_seq advanced")
    last_seq, applied = relay_state(dsn)
    assert last_seq > before_seq and last_seq >= max(seqs)
    assert applied - before_applied >= len(seqs)
    assert rcache.relay.stats.last_seq >= max(seqs)  # type: ignore[union-attr]
    assert rcache.relay.lag() == (0, 0.0)  # type: ignore[union-attr]


def test_two_relays_at_once_apply_every_change_without_errors(
    dsn: str, redis_url: str, figure: Callable[[str], None]
) -> None:
    """Two caches with relays on one database: SKIP LOCKED splits the outbox, every row is applied once-or-more, no errors."""
    keys = [f"two-{i}" for i in range(60)]
    with TieredCache.connect(dsn, redis_url, relay=True) as c1, TieredCache.connect(dsn, redis_url, relay=True) as c2:
        for k in keys:
            c1.write_cache(CT, SITE, k, {"v": 0})
        statements = len(keys)

        def writer(seed: int) -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for j in range(100):
                    k = keys[(seed * 7 + j * 13) % len(keys)]
                    conn.execute(
                        "UPDATE biz.ai_cache SET result_json = %s WHERE cache_type = %s AND site_id = %s AND target_id = %s",
                        (Jsonb({"v": seed * 1000 + j}), CT, SITE, k),
                    )

        # readers keep refilling entries while the relays kill them
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                c2.get_many(CT, SITE, keys[:30])
                c1.get_many(CT, SITE, keys[30:])

        threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)] + [threading.Thread(target=reader)]
        for t in threads:
            t.start()
        for t in threads[:3]:
            t.join()
        statements += 300
        wait_until(lambda: outbox_count(dsn) == 0, 10, what="outbox drained by two relays")
        stop.set()
        threads[3].join()
        r1, r2 = c1.relay.stats, c2.relay.stats  # type: ignore[union-attr]
        figure(f"two relays: relay1 applied {r1.changes} rows in {r1.batches} batches, relay2 {r2.changes} rows in "
               f"{r2.batches} batches (sum {r1.changes + r2.changes} of {statements}); errors {r1.errors}/{r2.errors}")
        assert r1.errors == 0 and r2.errors == 0
        assert r1.changes + r2.changes == statements  # each row claimed by exactly one relay, then deleted
        # every key now reads what PostgreSQL has
        for k in keys:
            assert c1.get_latest(CT, SITE, k) == c1.store.get_latest(CT, SITE, k)
            assert c2.get_latest(CT, SITE, k) == c2.store.get_latest(CT, SITE, k)
        assert_verified(c1, figure)


def test_lower_seq_committed_after_higher_is_still_applied(rcache: TieredCache, dsn: str, figure: Callable[[str], None]) -> None:
    """Tx A takes a seq, stays open; tx B takes a higher seq and commits and is applied; then A commits: A still reaches Redis."""
    c = rcache
    c.write_cache(CT, SITE, "A", {"v": 1})
    c.write_cache(CT, SITE, "B", {"v": 1})
    warm(c, dsn, ["A", "B"])
    with psycopg.connect(dsn) as conn_a, psycopg.connect(dsn, autocommit=True) as conn_b:
        id_a = raw_insert(conn_a, "A", {"v": 2})
        seq_a = conn_a.execute(LAST_SEQ_IN_TX).fetchone()[0]  # type: ignore[index]
        with conn_b.transaction():
            raw_insert(conn_b, "B", {"v": 2})
            seq_b = conn_b.execute(LAST_SEQ_IN_TX).fetchone()[0]  # type: ignore[index]
        assert seq_b > seq_a
        wait_until(lambda: not entry_exists(c, "B"), 5, what="B applied")
        wait_until(lambda: relay_state(dsn)[0] >= seq_b, 5, what="relay watermark past B")
        time.sleep(1.2)  # the relay loops a few more times past B's seq (poll 0.5 s)
        assert entry_exists(c, "A")  # A is not committed yet: nothing to apply
        assert c.get_latest(CT, SITE, "A")["result_json"] == {"v": 1}  # type: ignore[index]
        conn_a.commit()
        t0 = time.monotonic()
    took = wait_until(lambda: not entry_exists(c, "A"), 5, what="A applied after committing late")
    row = c.get_latest(CT, SITE, "A")
    assert row is not None and row["id"] == id_a and row["result_json"] == {"v": 2}
    figure(f"late commit: seq {seq_a} committed after seq {seq_b} was applied; its kill landed {took * 1000:.1f} ms "
           f"after its commit ({(time.monotonic() - t0) * 1000:.1f} ms incl. the read)")
    assert_verified(c, figure)


def test_relay_down_then_started_catches_up(dsn: str, cache: TieredCache, raw: psycopg.Connection[Any],
                                            figure: Callable[[str], None]) -> None:
    """No relay while raw changes happen: Redis stays stale; a relay started later applies the backlog."""
    keys = [f"down-{i}" for i in range(10)]
    for k in keys:
        cache.write_cache(CT, SITE, k, {"v": 1})
    for k in keys:
        raw.execute("UPDATE biz.ai_cache SET result_json = %s WHERE target_id = %s", (Jsonb({"v": 2}), k))
    time.sleep(0.3)
    assert all(entry_exists(cache, k) for k in keys)  # stale: nobody applies the outbox yet
    assert cache.get_latest(CT, SITE, keys[0])["result_json"] == {"v": 1}  # type: ignore[index]
    relay = Relay(dsn, cache.redis, name="late", poll_interval=0.5)
    n, age = relay.lag()
    assert n == 2 * len(keys) and age > 0  # the cache's own writes + the raw updates
    relay.start()
    try:
        took = wait_until(lambda: not any(entry_exists(cache, k) for k in keys), 5, what="backlog applied")
        # The kills land before the batch's rows are deleted (the next statement): wait for the outbox too.
        wait_until(lambda: relay.lag()[0] == 0, 5, interval=0.01, what="outbox emptied")
        for k in keys:
            assert cache.get_latest(CT, SITE, k)["result_json"] == {"v": 2}  # type: ignore[index]
        figure(f"relay started late: backlog of {n} rows (oldest {age:.2f} s) applied in {took * 1000:.1f} ms")
        assert relay.stats.errors == 0
    finally:
        relay.stop()
    assert_verified(cache, figure)


def test_redis_unreachable_relay_retries_and_catches_up(dsn: str, redis_url: str, raw: psycopg.Connection[Any],
                                                        figure: Callable[[str], None]) -> None:
    """Redis unreachable (proxy resets connections; the stale entries survive in Redis): the outbox keeps the
    rows, the relay retries, and after heal it kills exactly those stale entries."""
    direct = redis.Redis.from_url(redis_url)
    target_port = direct.connection_pool.connection_kwargs["port"]
    proxy = FaultProxy(target_port).start()
    try:
        with TieredCache.connect(dsn, f"redis://127.0.0.1:{proxy.port}/0", relay=True) as c:
            keys = [f"rd-{i}" for i in range(10)]
            for k in keys:
                c.write_cache(CT, SITE, k, {"v": 1})
            warm(c, dsn, keys)
            proxy.reset()
            for k in keys:
                raw.execute("UPDATE biz.ai_cache SET result_json = %s WHERE target_id = %s", (Jsonb({"v": 2}), k))
            time.sleep(1.5)
            n, age = c.relay.lag()  # type: ignore[union-attr]
            errors = c.relay.stats.errors  # type: ignore[union-attr]
            assert n == len(keys), "the outbox must keep every change while Redis is unreachable"
            assert errors >= 1
            assert all(direct.exists(c.keys.entry(CT, SITE, k)) for k in keys)  # stale, but out of reach
            proxy.heal()
            took = wait_until(lambda: not any(direct.exists(c.keys.entry(CT, SITE, k)) for k in keys), 5,
                              what="stale entries killed after heal")
            # The kills land before the batch's rows are deleted (the next statement): wait for the outbox too.
            wait_until(lambda: c.relay.lag()[0] == 0, 5, interval=0.01, what="outbox emptied")  # type: ignore[union-attr]
            for k in keys:
                assert c.get_latest(CT, SITE, k)["result_json"] == {"v": 2}  # type: ignore[index]
            # the relay's failures opened the cache's breaker too; once it closes, reads fill Redis again
            wait_until(lambda: c.get_latest(CT, SITE, keys[0]) is not None and entry_exists(c, keys[0], direct), 5,
                       interval=0.05, what="reads fill Redis again")
            for k in keys:
                assert c.get_latest(CT, SITE, k)["result_json"] == {"v": 2}  # type: ignore[index]
            figure(f"redis unreachable 1.5 s: relay failed {errors} times, kept {n} rows; applied "
                   f"{took * 1000:.0f} ms after heal")
            assert_verified(c, figure)
    finally:
        proxy.close()
        direct.close()


# --------------------------------------------------------------------------- own servers: kill / restart


@pytest.fixture(scope="module")
def own() -> Iterator[tuple[PostgresServer, str, RedisServer]]:
    """A PostgreSQL and a Redis of this module only: the tests below kill and restart them."""
    with PostgresServer() as pg, RedisServer() as rs:
        dsn = pg.create_database("tc_outbox")
        migrate(dsn)
        yield pg, dsn, rs


@pytest.fixture
def own_env(own: tuple[PostgresServer, str, RedisServer]) -> tuple[PostgresServer, str, RedisServer]:
    pg, dsn, rs = own
    if not pg.running:
        pg.start()
    if not rs.running:
        rs.start()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("TRUNCATE biz.ai_cache, biz.ai_cache_changes, biz.ai_cache_relay_state, "
                     "biz.ai_cache_retention_dirty RESTART IDENTITY")
    client = redis.Redis.from_url(rs.url)
    client.flushall()
    client.close()
    return own


@pytest.mark.fault
def test_redis_killed_relay_retries_and_catches_up(own_env: tuple[PostgresServer, str, RedisServer],
                                                   figure: Callable[[str], None]) -> None:
    """Redis SIGKILLed while raw changes happen: the relay fails, keeps the rows, and drains them after the restart."""
    pg, dsn, rs = own_env
    with TieredCache.connect(dsn, rs.url, relay=True) as c:
        keys = [f"rk-{i}" for i in range(10)]
        for k in keys:
            c.write_cache(CT, SITE, k, {"v": 1})
        wait_until(lambda: outbox_count(dsn) == 0, 5)
        rs.kill()
        with psycopg.connect(dsn, autocommit=True) as raw:
            for k in keys:
                raw.execute("UPDATE biz.ai_cache SET result_json = %s WHERE target_id = %s", (Jsonb({"v": 2}), k))
        time.sleep(1.0)
        n, _ = c.relay.lag()  # type: ignore[union-attr]
        errors = c.relay.stats.errors  # type: ignore[union-attr]
        assert n == len(keys) and errors >= 1
        t0 = time.monotonic()
        rs.start()
        restart = time.monotonic() - t0
        took = wait_until(lambda: outbox_count(dsn) == 0, 5, what="outbox drained after Redis restart")
        wait_until(lambda: c.get_latest(CT, SITE, keys[0]) is not None and entry_exists(c, keys[0]), 5,
                   interval=0.05, what="reads fill Redis again")
        for k in keys:
            assert c.get_latest(CT, SITE, k)["result_json"] == {"v": 2}  # type: ignore[index]
        figure(f"redis -9: relay failed {errors} times holding {n} rows; Redis restart {restart * 1000:.0f} ms; "
               f"outbox drained {took * 1000:.0f} ms after it answered")
        assert_verified(c, figure)


@pytest.mark.fault
def test_postgres_restart_relay_reconnects_and_catches_up(own_env: tuple[PostgresServer, str, RedisServer],
                                                          figure: Callable[[str], None]) -> None:
    """PostgreSQL restarted (fast stop, then SIGKILL crash): the relay reconnects and applies changes made right after."""
    pg, dsn, rs = own_env
    with TieredCache.connect(dsn, rs.url, relay=True) as c:
        for how in ("restart", "kill"):
            key = f"pg-{how}"
            c.write_cache(CT, SITE, key, {"v": 1})
            warm(c, dsn, [key])
            if how == "restart":
                pg.restart()
            else:
                pg.kill()
                pg.start()
            t0 = time.monotonic()
            with psycopg.connect(dsn, autocommit=True) as raw:
                raw.execute("UPDATE biz.ai_cache SET result_json = %s WHERE target_id = %s", (Jsonb({"v": 2}), key))
            took = wait_until(lambda: not entry_exists(c, key), 10, what=f"change applied after PostgreSQL {how}")
            row = c.get_latest(CT, SITE, key)
            assert row is not None and row["result_json"] == {"v": 2}
            figure(f"postgres {how}: change committed right after the server was back applied in "
                   f"{took * 1000:.0f} ms (relay errors so far {c.relay.stats.errors})")  # type: ignore[union-attr]
        assert_verified(c, figure)


# --------------------------------------------------------------------------- missed NOTIFY, latency


def test_missed_notify_is_applied_within_the_poll_interval(dsn: str, cache: TieredCache, raw: psycopg.Connection[Any],
                                                           figure: Callable[[str], None]) -> None:
    """A change row that arrives with no NOTIFY at all is still applied by the relay's poll."""
    poll = 0.3
    relay = Relay(dsn, cache.redis, name="poller", poll_interval=poll).start()
    listener = psycopg.connect(dsn, autocommit=True)
    listener.execute("LISTEN tiered_cache_changes")
    try:
        delays = []
        for i in range(5):
            key = f"mn-{i}"
            cache.write_cache(CT, SITE, key, {"v": 1})
            warm(cache, dsn, [key])
            time.sleep(0.05 + 0.05 * i)  # land at different points of the relay's wait
            list(listener.notifies(timeout=0.01))  # drain earlier notifications
            with raw.transaction():
                # replica role: the trigger (and its pg_notify) does not fire; the change row is written by hand
                raw.execute("SET LOCAL session_replication_role = replica")
                raw.execute("UPDATE biz.ai_cache SET result_json = %s WHERE target_id = %s", (Jsonb({"v": 2}), key))
                raw.execute("INSERT INTO biz.ai_cache_changes (cache_type, site_id, target_id) VALUES (%s, %s, %s)",
                            (CT, SITE, key))
            delays.append(wait_until(lambda: not entry_exists(cache, key), poll + 2, what="missed-NOTIFY change applied"))
            assert not list(listener.notifies(timeout=0.01)), "a NOTIFY was sent: the test did not simulate a miss"
            assert cache.get_latest(CT, SITE, key)["result_json"] == {"v": 2}  # type: ignore[index]
        figure(f"missed NOTIFY: applied by polling after {', '.join(f'{d * 1000:.0f}' for d in delays)} ms "
               f"(poll interval {poll * 1000:.0f} ms; max {max(delays) * 1000:.0f} ms)")
        assert max(delays) <= poll + 0.25
    finally:
        listener.close()
        relay.stop()


def test_commit_to_redis_latency_over_1000_raw_writes(rcache: TieredCache, dsn: str, redis_url: str,
                                                     figure: Callable[[str], None]) -> None:
    """Commit returned -> the relay's kill announced on the change channel, for 1,000 raw-SQL writes."""
    n = 1000
    c = rcache
    index = {c.keys.entry(CT, SITE, f"lat-{i}").encode(): i for i in range(n)}
    received: dict[int, float] = {}
    sub_client = redis.Redis.from_url(redis_url)
    pubsub = sub_client.pubsub()
    pubsub.subscribe(c.keys.channel)
    wait_until(lambda: (m := pubsub.get_message(timeout=0.1)) is not None and m["type"] == "subscribe", 5)
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            msg = pubsub.get_message(timeout=0.1)
            if msg and msg["type"] == "message":
                now = time.monotonic()
                key = msg["data"].split(b":", 2)[2]
                i = index.get(key)
                if i is not None and i not in received:
                    received[i] = now

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    commits = [0.0] * n
    with psycopg.connect(dsn, autocommit=True) as conn:
        start = time.monotonic()
        for i in range(n):
            raw_insert(conn, f"lat-{i}", {"i": i})
            commits[i] = time.monotonic()
        write_time = time.monotonic() - start
    try:
        wait_until(lambda: len(received) == n, 30, interval=0.01, what="every change announced")
    finally:
        stop.set()
        t.join()
        pubsub.close()
        sub_client.close()
    lat = [received[i] - commits[i] for i in range(n)]
    figure(f"commit -> Redis kill over {n} raw writes ({n / write_time:.0f} commits/s, one connection): "
           f"p50 {statistics.median(lat) * 1000:.2f} ms, p99 {pct(lat, 99) * 1000:.2f} ms, "
           f"max {max(lat) * 1000:.2f} ms, min {min(lat) * 1000:.2f} ms; relay batches {c.relay.stats.batches}")  # type: ignore[union-attr]
    assert pct(lat, 99) < 1.0
