"""Redis front tier: plain GET/MGET on the hit path; leased fills and atomic kills keep it from going stale.

The lease rule (Facebook's memcache leases, extended to writers): a fill is accepted only while the
lease token taken *before* the filler's PostgreSQL snapshot is still in place, and every change
deletes the entry and every lease of its key *after* its commit. So a fill that read the database
before a change either lands before that change's kill (and is removed by it) or finds its lease
gone and is refused. A lost lease (eviction, FLUSHALL, restart) only ever refuses a fill.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..contracts import DOWN, MISS, Row, _Sentinel
from ..policy.breaker import CLOSED, CircuitBreaker
from ..policy.entries import encode_entry, expires_at_ms
from ..policy.keys import KeySet, KeySpace

logger = logging.getLogger(__name__)

_OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError)

_DRAIN_CHUNK = 500  # owed kills per pipeline, so one drain never holds a connection for long

#: lease_for_write displaced another writer's lease: kill after the commit, store nothing.
CONTENDED = _Sentinel("CONTENDED")

_NOW_MS = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"

# No shebang flags on any script: they need Redis 7, and the embedded fallback is 6.2. Without them a
# script runs when Redis is full and only a memory-growing command inside it (SET) is refused, so a
# kill (DEL, PUBLISH) always works.

# KEYS: entry, history, lease, history_lease, writer. ARGV: channel ('' = silent), message,
# scope ('all'|'history'), txid, no-op message. With a txid (the relay), the kill is skipped when the
# entry was stored by that very transaction's write-through; the no-op keeps the sequence unbroken.
KILL = """
if ARGV[4] ~= '' and redis.call('GET', KEYS[5]) == ARGV[4] then
  if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], ARGV[5]) end
  return 0
end
if ARGV[3] == 'history' then
  redis.call('DEL', KEYS[2], KEYS[4])
else
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
end
if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return 1
"""

# A writer's change: kill everything of the key, then store the new state (and the writer's
# transaction id beside it) only if the writer's pre-commit lease survived.
# ARGV: token, value, mode ('pxat'|'px'), ms, channel, message, txid.
WRITE_THROUGH = (
    """
local mine = redis.call('GET', KEYS[3]) == ARGV[1]
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local stored = 0
if mine then
  local mode = 'PX'
  if ARGV[3] == 'pxat' then
    mode = 'PXAT'
    """
    + _NOW_MS
    + """
    if tonumber(ARGV[4]) <= now then mine = false end
  end
  if mine then
    redis.call('SET', KEYS[1], ARGV[2], mode, ARGV[4])
    if ARGV[7] ~= '' then redis.call('SET', KEYS[5], ARGV[7], mode, ARGV[4]) end
    stored = 1
  end
end
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return stored
"""
)

# A reader's fill. KEYS: target, lease. ARGV: token, value, mode ('pxat'|'px'), ms, hash field ('' = string).
FILL = (
    """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
if ARGV[3] == 'pxat' then
  """
    + _NOW_MS
    + """
  if tonumber(ARGV[4]) <= now then return -1 end
end
if ARGV[5] == '' then
  redis.call('SET', KEYS[1], ARGV[2], string.upper(ARGV[3]), ARGV[4])
else
  redis.call('HSET', KEYS[1], ARGV[5], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
"""
)

# Give back a lease that was not used (a finalize that changed nothing).
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class _Script:
    """A Lua script and its SHA1, sent with EVALSHA and loaded again on NOSCRIPT."""

    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        import hashlib

        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())


_KILL, _WRITE_THROUGH, _FILL, _RELEASE = (_Script(s) for s in (KILL, WRITE_THROUGH, FILL, RELEASE))


class RunWatch:
    """Checks Redis's run id on every new connection, before it serves a command (redis-py's redis_connect_func).

    A new run id means Redis restarted or failed over, perhaps from a snapshot holding entries and leases
    that kills had removed since: the namespaces of every tier on this client are dropped first, and a
    flush announced, so nothing from the old run is served. A failed flush fails the connection; the next
    one tries again. Other new connections wait for it (one lock), old ones died with the old run.
    """

    _RUN_ID = re.compile(rb"run_id:([0-9a-fA-F]+)")

    def __init__(self) -> None:
        self.run_id: bytes | None = None
        self.namespaces: set[str] = set()
        self.channels: set[str] = set()
        self.restarts = 0
        self._lock = threading.Lock()

    def watch(self, namespace: str, channel: str) -> None:
        """A tier on this client: its keys are dropped, and its listeners told, after a restart."""
        self.namespaces.add(namespace)
        if channel:
            self.channels.add(channel)

    def __call__(self, conn: Any) -> None:
        conn.on_connect()
        conn.send_command("INFO", "server")
        info = conn.read_response()
        found = self._RUN_ID.search(info.encode() if isinstance(info, str) else info)
        if found is None:  # INFO renamed away or without a run id: a restart cannot be told apart
            return
        run_id = found.group(1)
        with self._lock:
            if self.run_id is None or self.run_id == run_id:
                self.run_id = run_id
                return
            self._flush(conn)
            self.run_id = run_id
            self.restarts += 1
        logger.warning("redis tier: Redis restarted or failed over (new run id); namespaces %s dropped",
                       sorted(self.namespaces))

    def _flush(self, conn: Any) -> None:
        """Two SCAN passes per namespace on this very connection (see flush_namespace), then announce."""
        for namespace in self.namespaces:
            for _ in range(2):
                cursor: Any = b"0"
                while True:
                    conn.send_command("SCAN", cursor, "MATCH", namespace + ":*", "COUNT", 1000)
                    cursor, keys = conn.read_response()
                    if keys:
                        conn.send_command("UNLINK", *keys)
                        conn.read_response()
                    if cursor in (b"0", "0", 0):
                        break
        for channel in self.channels:
            conn.send_command("PUBLISH", channel, f"restart-{os.urandom(4).hex()}:1:*")
            conn.read_response()


@dataclass
class RedisStats:
    """Counters of the front tier (approximate under threads: plain increments)."""

    hits: int = 0
    misses: int = 0
    fills: int = 0
    fills_refused: int = 0
    writes_through: int = 0
    kills: int = 0
    errors: int = 0
    skipped: int = 0
    pending_kills: int = 0


class RedisTier:
    """The Redis front tier. Every method swallows Redis failures: it answers DOWN, or queues the kill."""

    def __init__(
        self,
        client: redis.Redis,
        keys: KeySpace,
        *,
        negative_ttl: float = 10.0,
        no_expiry_ttl: float = 3600.0,
        history_ttl: float = 3600.0,
        lease_ttl: float = 5.0,
        breaker: CircuitBreaker | None = None,
        announce: bool = True,
    ) -> None:
        self.client = client
        self.keys = keys
        self.negative_ms = int(negative_ttl * 1000)
        self.no_expiry_ms = int(no_expiry_ttl * 1000)
        self.history_ms = int(history_ttl * 1000)
        self.lease_ms = int(lease_ttl * 1000)
        self.breaker = breaker or CircuitBreaker()
        self.stats = RedisStats()
        self.channel = keys.channel if announce else ""
        watch = client.connection_pool.connection_kwargs.get("redis_connect_func")
        if isinstance(watch, RunWatch):
            watch.watch(keys.namespace, self.channel)
        # Announcements carry (publisher, sequence) so listeners can see a lost message as a gap. No lock:
        # threads may deliver out of order, and the listener waits a short grace before calling a hole a gap.
        self.publisher = os.urandom(6).hex()
        self._seq = itertools.count(1)
        self._tokens = itertools.count(1)
        self._token_prefix = self.publisher + "."
        # Kills that could not reach Redis; applied before this process reads Redis again.
        self._pending: dict[str, KeySet] = {}
        self._pending_lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._drainer: threading.Thread | None = None
        self._closed = threading.Event()

    # -- plumbing -------------------------------------------------------------------------------

    def _token(self) -> str:
        """A lease token unique across processes."""
        return self._token_prefix + str(next(self._tokens))

    def _usable(self) -> bool:
        """Breaker allows a call and no earlier kill is still owed to Redis."""
        if self._pending and not self.drain_pending(max_chunks=1):  # the drainer thread takes the rest
            return False
        if self.breaker.allow():
            return True
        self.stats.skipped += 1
        return False

    def _ok(self) -> None:
        """A call worked: close the breaker (whichever call was the half-open probe)."""
        if self.breaker.failures or self.breaker.state is not CLOSED:
            self.breaker.success()

    def _failed(self, exc: BaseException) -> None:
        """Record a failure; only outages (not e.g. OOM answers) count toward the breaker."""
        self.stats.errors += 1
        if isinstance(exc, _OUTAGE):
            self.breaker.failure()
        logger.debug("redis tier: %s: %s", type(exc).__name__, exc)

    def _evalsha(self, client: Any, script: _Script, keys: Iterable[str], args: Iterable[Any]) -> Any:
        """EVALSHA, loading the script once if Redis lost it (SCRIPT FLUSH, restart)."""
        keys = tuple(keys)
        try:
            return client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(script.text)
            return client.evalsha(script.sha, len(keys), *keys, *args)

    def _run_pipeline(self, commands: list[tuple[_Script | str, tuple[Any, ...]]], *, strict: bool = False) -> list[Any]:
        """Run commands in one round trip; scripts Redis lost are loaded and their commands re-sent.

        strict: any error answer (READONLY, MISCONF, ...) raises, so a kill is confirmed only by a real answer.
        """
        results = self._send(commands)
        lost = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if lost:
            for script in {commands[i][0] for i in lost if isinstance(commands[i][0], _Script)}:
                self.client.script_load(script.text)  # type: ignore[union-attr]
            again = self._send([commands[i] for i in lost])
            for i, r in zip(lost, again):
                results[i] = r
        for r in results:
            if isinstance(r, _OUTAGE) or (strict and isinstance(r, Exception)):
                raise r
        return results

    def _send(self, commands: list[tuple[_Script | str, tuple[Any, ...]]]) -> list[Any]:
        """One pipeline, no MULTI (every command is atomic by itself), errors returned in place."""
        pipe = self.client.pipeline(transaction=False)
        for command, args in commands:
            if isinstance(command, _Script):
                keys, argv = args
                pipe.evalsha(command.sha, len(keys), *keys, *argv)
            else:
                pipe.execute_command(command, *args)
        return pipe.execute(raise_on_error=False)

    def _message(self, entry_key: str) -> str:
        """An announcement: publisher, its sequence number, and the entry key that changed ('' for none)."""
        return f"{self.publisher}:{next(self._seq)}:{entry_key}"

    # -- reads ----------------------------------------------------------------------------------

    def get_raw(self, key: str) -> Any:
        """The encoded entry (a row, or NEGATIVE for a cached 'no row'), MISS, or DOWN."""
        return self._get(self.client.get, key)

    def get_history(self, ks: KeySet, limit: int) -> Any:
        """Cached history rows for this limit, encoded; MISS, or DOWN."""
        return self._get(self.client.hget, ks.history, str(limit))

    def _get(self, command: Any, *args: str) -> Any:
        """One read command on the hit path: skipped while the breaker is open or kills are owed."""
        if (self._pending or self.breaker.state is not CLOSED) and not self._usable():
            return DOWN
        try:
            raw = command(*args)
        except RedisError as exc:
            self._failed(exc)
            return DOWN
        self._ok()
        if raw is None:
            self.stats.misses += 1
            return MISS
        self.stats.hits += 1
        return raw

    def get_raws(self, keys: list[str]) -> Any:
        """MGET of many entries: a list of encoded entry or MISS per key, or DOWN."""
        if (self._pending or self.breaker.state is not CLOSED) and not self._usable():
            return DOWN
        try:
            raws = self.client.mget(keys)
        except RedisError as exc:
            self._failed(exc)
            return DOWN
        self._ok()
        misses = raws.count(None)
        self.stats.misses += misses
        self.stats.hits += len(raws) - misses
        return [MISS if raw is None else raw for raw in raws] if misses else raws

    # -- leases and fills -----------------------------------------------------------------------

    def lease(self, lease_key: str) -> str | None:
        """Take the fill lease of a missed key before reading PostgreSQL; None if someone holds it or Redis failed."""
        token = self._token()
        try:
            taken = self.client.set(lease_key, token, nx=True, px=self.lease_ms)
        except RedisError as exc:
            self._failed(exc)
            return None
        self._ok()
        return token if taken else None

    def leases(self, lease_keys: list[str]) -> list[str | None]:
        """lease() for many keys in one round trip."""
        tokens = [self._token() for _ in lease_keys]
        commands = [("SET", (k, t, "NX", "PX", self.lease_ms)) for k, t in zip(lease_keys, tokens)]
        try:
            results = self._run_pipeline(commands)  # type: ignore[arg-type]
        except RedisError as exc:
            self._failed(exc)
            return [None] * len(lease_keys)
        self._ok()
        return [t if r is True or r == b"OK" else None for t, r in zip(tokens, results)]

    def _ttl_args(self, row: Row | None) -> tuple[str, int]:
        """(mode, ms): absolute PXAT at the row's expiry, else a relative cap."""
        if row is None:
            return "px", self.negative_ms
        at = expires_at_ms(row)
        return ("pxat", at) if at is not None else ("px", self.no_expiry_ms)

    def fill_entry(self, ks: KeySet, token: str, value: bytes, row: Row | None) -> None:
        """Store what PostgreSQL returned (`value` is `row` encoded), if the lease taken before reading it still stands."""
        mode, ms = self._ttl_args(row)
        try:
            done = self._evalsha(self.client, _FILL, (ks.entry, ks.lease), (token, value, mode, ms, ""))
        except RedisError as exc:
            self._failed(exc)
            return
        self._ok()
        self._count_fill(done)

    def fill_entries(self, items: list[tuple[KeySet, str, bytes, Row | None]]) -> None:
        """fill_entry for many keys in one round trip."""
        commands = []
        for ks, token, value, row in items:
            mode, ms = self._ttl_args(row)
            commands.append((_FILL, ((ks.entry, ks.lease), (token, value, mode, ms, ""))))
        try:
            results = self._run_pipeline(commands)  # type: ignore[arg-type]
        except RedisError as exc:
            self._failed(exc)
            return
        self._ok()
        for done in results:
            if isinstance(done, RedisError):
                self.stats.errors += 1
            else:
                self._count_fill(done)

    def fill_history(self, ks: KeySet, token: str, limit: int, value: bytes) -> None:
        """Store a history answer (`value`, encoded) under its limit, if the history lease still stands."""
        try:
            done = self._evalsha(
                self.client, _FILL, (ks.history, ks.history_lease), (token, value, "px", self.history_ms, str(limit))
            )
        except RedisError as exc:
            self._failed(exc)
            return
        self._ok()
        self._count_fill(done)

    def _count_fill(self, done: Any) -> None:
        if done == 1:
            self.stats.fills += 1
        else:
            self.stats.fills_refused += 1

    # -- changes --------------------------------------------------------------------------------

    def lease_for_write(self, ks: KeySet) -> Any:
        """A writer's lease, taken before its commit (overwriting readers').

        None if the breaker skipped Redis, DOWN if the call just failed, CONTENDED if it displaced another
        writer's lease: two writers in flight on one key cannot know which commits last, so neither stores.
        """
        if not self._usable():
            return None
        token = "w" + self._token()
        try:
            displaced = self.client.set(ks.lease, token, px=self.lease_ms, get=True)
        except RedisError as exc:
            self._failed(exc)
            return DOWN
        self._ok()
        return CONTENDED if displaced is not None and displaced[:1] == b"w" else token

    def leases_for_write(self, keysets: list[KeySet]) -> None:
        """Writer leases on many keys in one round trip (invalidate_site): in-flight write-throughs are refused."""
        if not keysets or not self._usable():
            return
        try:
            self._run_pipeline([("SET", (ks.lease, "w" + self._token(), "PX", self.lease_ms)) for ks in keysets])
        except RedisError as exc:
            self._failed(exc)
            return
        self._ok()

    def write_through(self, ks: KeySet, token: Any, latest: Row | None, txid: str | None = None) -> None:
        """After a commit: drop every entry and lease of the key and store `latest` if our lease stood.

        If the breaker skipped the lease (None) or another writer holds the key (CONTENDED), the kill is
        still tried once: Redis may answer now, and another process may hold a lease taken before our
        commit that only our kill can refuse. If the lease call itself just failed (DOWN), the kill is
        owed at once (the drainer retries within milliseconds) so a write pays at most one redis_timeout.
        """
        if token is DOWN:
            return self._owe_kill(ks)
        if token is None or token is CONTENDED:
            return self.kill([ks])
        mode, ms = self._ttl_args(latest)
        value = encode_entry(latest)
        try:
            self._evalsha(
                self.client, _WRITE_THROUGH, ks.all,
                (token, value, mode, ms, self.channel, self._message(ks.entry), txid or ""),
            )
        except RedisError as exc:
            if not isinstance(exc, _OUTAGE):  # e.g. OOM refused the SET: a plain kill still works
                return self.kill([ks])
            self._failed(exc)
            return self._owe_kill(ks)
        self._ok()
        self.stats.writes_through += 1

    def kill(self, keysets: Iterable[KeySet], *, history_only: bool = False) -> None:
        """After a commit: drop every entry (or only the history) and lease of these keys; owed if Redis fails.

        Tried once even while the breaker is open (one redis_timeout at most): a kill skipped here
        could let another process fill the old state under a lease taken before the commit.
        """
        keysets = list(keysets)
        if not keysets:
            return
        try:
            self.kill_or_raise(keysets, history_only=history_only)
        except RedisError:
            for ks in keysets:
                self._owe_kill(ks)

    def kill_or_raise(
        self, keysets: list[KeySet], *, history_only: bool = False, txids: list[str] | None = None
    ) -> list[Any]:
        """kill() in one round trip that raises on failure, for callers that keep the work (the relay).

        With txids (one per keyset, '' for none), a key whose entry that transaction stored itself is spared.
        """
        scope = "history" if history_only else "all"
        commands = []
        for i, ks in enumerate(keysets):
            message = self._message(ks.entry)
            noop = message[: len(message) - len(ks.entry)]
            commands.append((_KILL, (ks.all, (self.channel, message, scope, txids[i] if txids else "", noop))))
        try:
            results = self._run_pipeline(commands, strict=True)  # type: ignore[arg-type]
            if any(r not in (0, 1) for r in results):
                raise RedisError(f"unexpected answer to a kill: {results!r}")
        except RedisError as exc:
            self._failed(exc)
            raise
        self._ok()
        self.stats.kills += sum(1 for r in results if r == 1)
        return results

    def flush_namespace(self) -> int:
        """Drop every key of this namespace (the table was truncated) and announce a flush; raises on failure.

        Two passes: a lease the first pass missed was consumed during it, so its entry exists for the second.
        """
        deleted = 0
        try:
            for _ in range(2):
                batch: list[bytes] = []
                for key in self.client.scan_iter(match=self.keys.namespace + ":*", count=1000):
                    batch.append(key)
                    if len(batch) >= 1000:
                        deleted += self.client.unlink(*batch)
                        batch.clear()
                if batch:
                    deleted += self.client.unlink(*batch)
            if self.channel:
                self.client.publish(self.channel, self._message("*"))
        except RedisError as exc:
            self._failed(exc)
            raise
        return deleted

    def release(self, ks: KeySet, token: Any) -> None:
        """Give back an unused writer lease so readers may fill again at once."""
        if token is None or token is DOWN or token is CONTENDED:
            return
        try:
            self._evalsha(self.client, _RELEASE, (ks.lease,), (token,))
        except RedisError as exc:
            self._failed(exc)
            return
        self._ok()

    # -- kills owed to Redis --------------------------------------------------------------------

    def _owe_kill(self, ks: KeySet) -> None:
        """Remember a kill Redis did not get; this process reads Redis again only after it lands."""
        with self._pending_lock:
            self._pending[ks.entry] = ks
            self.stats.pending_kills = len(self._pending)
        self._start_drainer()

    def drain_pending(self, max_chunks: int | None = None) -> bool:
        """Apply owed kills, one drainer at a time, in chunks; True when none is left.

        A kill leaves the owed set only after Redis confirmed it. A caller that finds another drain
        under way does not wait for it: it answers False (this process keeps off Redis meanwhile).
        """
        if not self._drain_lock.acquire(blocking=False):
            return not self._pending
        try:
            chunks = 0
            while max_chunks is None or chunks < max_chunks:
                chunks += 1
                with self._pending_lock:
                    owed = list(self._pending.values())[:_DRAIN_CHUNK]
                if not owed:
                    return True
                if not self.breaker.allow():
                    return False
                try:
                    self.kill_or_raise(owed)
                except RedisError:
                    return False
                with self._pending_lock:
                    for ks in owed:
                        if self._pending.get(ks.entry) is ks:
                            del self._pending[ks.entry]
                    self.stats.pending_kills = len(self._pending)
            return not self._pending
        finally:
            self._drain_lock.release()

    def _start_drainer(self) -> None:
        """One background thread retries owed kills, so other processes stop seeing them soon too."""
        with self._pending_lock:
            if self._drainer is not None and self._drainer.is_alive():
                return
            self._drainer = threading.Thread(target=self._drain_loop, name="tiered_cache-kills", daemon=True)
            self._drainer.start()

    def _drain_loop(self) -> None:
        delay = 0.02
        while not self._closed.is_set():
            if self.drain_pending():
                return
            self._closed.wait(delay)
            delay = min(delay * 2, 1.0)

    @property
    def pending(self) -> int:
        """How many kills are owed to Redis."""
        return len(self._pending)

    def close(self) -> None:
        """Stop the background drainer (owed kills are tried once more first)."""
        self.drain_pending()
        self._closed.set()
