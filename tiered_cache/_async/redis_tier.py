"""Redis front tier: plain GET/MGET on the hit path; leased fills and atomic kills keep it from going stale.

The lease rule (Facebook's memcache leases, extended to writers): a fill is accepted only while the
lease token taken *before* the filler's PostgreSQL snapshot is still in place, and every change
deletes the entry and every lease of its key *after* its commit. So a fill that read the database
before a change either lands before that change's kill (and is removed by it) or finds its lease
gone and is refused. A lost lease (eviction, FLUSHALL, restart) only ever refuses a fill.

When Redis fails, policy/failures.py says what the failure means, once, for every path here:
- No answer (refused, reset, timeout): an outage. The breaker counts it; the kill is owed at once (a
  write pays one redis_timeout at most) and this process reads Redis again only after it landed.
- An empty local pool: not an outage. A read goes to PostgreSQL, a kill waits up to `kill_wait`.
- OOM: only memory-growing commands are refused. The writer's lease is skipped; its kill (DEL) lands
  before the write returns.
- BUSY, LOADING (everything refused until it clears): the kill is retried every 5 ms for up to
  `kill_wait` (1 s), so it lands before the write returns if Redis clears by then; else it is owed and
  retried every 20 ms. A tier that saw the answer is held down as below.
- READONLY, MISCONF, NOREPLICAS: Redis serves reads but refuses every write, kills included. A writer
  whose kill is refused stops reading Redis at once. Every other tier learns it from its write probe
  (a DEL of `<namespace>:probe`: it needs no memory, so OOM never trips it), pipelined with a read at
  most every `probe_interval` (0.5 s). The bound: no tier serves an entry from a Redis that refuses
  writes for longer than probe_interval (plus one round trip) after the refusal began; measured in
  tests/test_error_replies.py. A refusing tier answers DOWN (the facade reads PostgreSQL), skips fills,
  announces one flush (near tiers drop what they hold) and reads Redis again only once its probes were
  accepted for `hold_down` (2 s): longer than the owed kills' 20 ms cadence and the relay's 1 s backoff,
  so the kills owed meanwhile land first.
Owed kills are bounded (`max_owed` keys); past that the whole namespace is dropped once Redis answers,
and this process reads Redis again only after the drop landed. A kill or write-through cancelled (or
interrupted) at any await owes its kill synchronously before the exception goes on: `owe()` does the same
for the facade, between its commit and its kill.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .. import _fork, observe
from .._lean import ALeanPool, Packer
from .._deployment import is_cluster, watch_of
from ..contracts import DOWN, MISS, Row
from ..errors import ConfigurationError
from ..policy.breaker import CLOSED, OPEN, CircuitBreaker
from ..policy.entries import expires_at_ms
from ..policy.failures import SATURATED, Failure, classify
from ..policy.keys import KeySet, KeySpace
from ..tiers._redis_shared import CONTENDED, NAMESPACE, RedisStats
from ..policy.slot_channels import slot_tags
from ..tiers.lua_scripts import (CLUSTER_KILL_SCRIPT, CLUSTER_WRITE_THROUGH_SCRIPT, FILL_SCRIPT, KILL_SCRIPT,
                                 WRITE_THROUGH_SCRIPT)
from .lua import evalsha, packed_read, run_pipeline, send
from .owed import AsyncOwedKills
from .probe import AsyncWriteProbe
from .redis_writes import AsyncRedisWrites
from .runwatch import AsyncRunWatch
from ..policy.failures import REDIS_FAILURES

__all__ = ["CONTENDED", "AsyncRedisTier", "AsyncRunWatch", "RedisStats"]

logger = logging.getLogger(__name__)

_monotonic = time.monotonic


class AsyncRedisTier(AsyncRedisWrites):
    """The Redis front tier. Every method swallows Redis failures: it answers DOWN, or queues the kill (changes: redis_writes.py)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: KeySpace,
        *,
        negative_ttl: float = 3600.0,
        no_expiry_ttl: float = 3600.0,
        history_ttl: float = 3600.0,
        lease_ttl: float = 5.0,
        breaker: CircuitBreaker | None = None,
        announce: bool = True,
        kill_wait: float = 1.0,
        probe_interval: float = 0.5,
        hold_down: float = 2.0,
        max_owed: int = 10_000,
    ) -> None:
        if isinstance(kill_wait, bool) or not isinstance(kill_wait, (int, float)) or not 0 <= kill_wait <= 60:
            raise ConfigurationError(f"kill_wait: expected seconds in [0, 60], got {kill_wait!r}")
        self._probe = AsyncWriteProbe(self, probe_interval, hold_down)
        self._refusal = self._probe.watch  # read on the hit path
        # Kills that could not reach Redis; applied before this process reads Redis again.
        self._owed = AsyncOwedKills(self, 1)
        self.max_owed = max_owed
        self._pending = self._owed.keys  # the same dict, read on the hit path
        self.client = client
        self.cluster = is_cluster(client)  # multi-key reads go out per slot, one pipeline per node
        # One server through our own pool: hit-path reads go out packed from remembered key bytes (_lean.py).
        self._pool = getattr(client, "connection_pool", None)
        self._packer = Packer() if isinstance(self._pool, ALeanPool) and not self.cluster else None
        # On a cluster a change is announced in its key's shard (lua_scripts.py, _feed.py).
        self._kill_script = CLUSTER_KILL_SCRIPT if self.cluster else KILL_SCRIPT
        self._write_through_script = CLUSTER_WRITE_THROUGH_SCRIPT if self.cluster else WRITE_THROUGH_SCRIPT
        self.keys = keys
        self.negative_ms = int(negative_ttl * 1000)
        self.no_expiry_ms = int(no_expiry_ttl * 1000)
        self.history_ms = int(history_ttl * 1000)
        self.lease_ms = int(lease_ttl * 1000)
        self.kill_wait = kill_wait
        self.breaker = breaker or CircuitBreaker()
        self.stats = RedisStats()
        # Logged once per outage and once per owed-kill episode, however many calls see them.
        self._breaker_open = observe.Episode()
        self._owing = observe.Episode()
        self.channel = keys.channel if announce else ""
        if self.cluster and self.channel:
            slot_tags()  # the slot channels' table (~70 ms, once per process) now, not in the first write
        watch = watch_of(client)
        if isinstance(watch, AsyncRunWatch):
            watch.watch(keys.namespace, self.channel)
        self._new_identity()
        _fork.register(self)

    def _new_identity(self) -> None:
        """Publisher id, announcement sequence and lease tokens: unique per process (a forked child takes new ones).

        Announcements carry (publisher, sequence) so listeners can see a lost message as a gap. No lock:
        threads may deliver out of order, and the listener waits a short grace before calling a hole a gap.
        """
        self.publisher = os.urandom(6).hex()
        self._seq = itertools.count(1)
        self._tokens = itertools.count(1)
        self._token_prefix = self.publisher + "."

    def _after_fork_in_child(self) -> None:
        """Locks another thread held at fork time would stay locked; the drainer thread is gone. Owed kills stay."""
        self._probe._after_fork_in_child()
        self.breaker._after_fork_in_child()
        self._owed._after_fork_in_child()
        self._new_identity()  # the parent goes on leasing and announcing under its own

    @property
    def max_owed(self) -> int:
        """How many owed kills are remembered key by key before one namespace drop is owed instead."""
        return self._owed.limit

    @max_owed.setter
    def max_owed(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"max_owed: expected an int >= 1, got {value!r}")
        self._owed.limit = value

    # -- plumbing -------------------------------------------------------------------------------

    def _token(self) -> str:
        """A lease token unique across processes."""
        return self._token_prefix + str(next(self._tokens))

    @property
    def refusing(self) -> bool:
        """Redis was found refusing writes (or everything) and has not yet accepted them for hold_down."""
        return self._refusal.refusing

    async def _usable(self) -> bool:
        """Redis is not held off as refusing, no earlier kill is still owed, and the breaker allows a call."""
        if self._refusal.refusing:
            if self._refusal.due(_monotonic()):
                await self.probe_writes()
            if self._refusal.refusing:
                self.stats.skipped += 1
                return False
        if self._pending:
            if NAMESPACE in self._pending:  # a namespace drop is the drainer's work, not a reader's
                self._owed.start()
                return False
            if not await self._owed.drain(max_chunks=1):
                self._owed.start()  # takes the rest (started again on demand after a fork)
                return False
        if self.breaker.allow():
            return True
        self.stats.skipped += 1
        return False

    def _ok(self) -> None:
        """A call worked: close the breaker (whichever call was the half-open probe)."""
        if self.breaker.failures or self.breaker.state is not CLOSED:
            self.breaker.success()
            seconds = self._breaker_open.end()
            if seconds is not None:
                observe.breaker_closed(self.keys.namespace, seconds)

    async def _failed(self, exc: BaseException) -> Failure:
        """Record a failure by what it means: only outages count toward the breaker; refusals hold Redis off."""
        kind = classify(exc)
        self.stats.errors += 1
        if kind.outage:
            if self.cluster and hasattr(self.client, "_initialize"):
                self.client._initialize = True  # redis.asyncio re-reads the slot map on the next call (pipelines never do)
            self.breaker.failure()
            if self.breaker.state == OPEN and self._breaker_open.begin():
                observe.breaker_opened(self.keys.namespace, self.breaker.failures)
        elif kind is SATURATED:
            self.stats.saturated += 1
        if kind.refusing:
            await self._probe.refused(kind, exc)
        logger.debug("redis tier: %s (%s): %s", type(exc).__name__, kind, exc)
        return kind

    async def probe_writes(self) -> bool:
        """DEL the namespace's probe key now: True if Redis accepted the write."""
        return await self._probe.send()

    def _message(self, entry_key: str) -> str:
        """An announcement: publisher, its sequence number, and the entry key that changed ('' for none)."""
        return f"{self.publisher}:{next(self._seq)}:{entry_key}"

    # -- reads ----------------------------------------------------------------------------------

    async def get_raw(self, key: str) -> Any:
        """The encoded entry (a row, or NEGATIVE for a cached 'no row'), MISS, or DOWN."""
        return await self._get("GET", key)

    async def get_history(self, ks: KeySet, limit: int) -> Any:
        """Cached history rows for this limit, encoded; MISS, or DOWN."""
        return await self._get("HGET", ks.history, str(limit))

    async def _probed(self, command: str, args: tuple[Any, ...]) -> Any:
        """The read with the write probe in the same round trip (at most every probe_interval).

        Raises the read's error, or the probe's if Redis refused it: then this read must not be trusted either.
        """
        if not self._refusal.due(_monotonic()):  # another thread just claimed the probe
            return await self.client.execute_command(command, *args)
        raw, probe = await send(self.client, [(command, args), ("DEL", (self.keys.probe,))])
        if isinstance(probe, Exception) and classify(probe).refusing:
            raise probe
        if isinstance(raw, Exception):
            raise raw
        return raw

    async def _get(self, command: str, *args: str) -> Any:
        """One read on the hit path: skipped while the breaker is open, kills are owed or Redis refuses writes."""
        watch = self._refusal
        if (self._pending or watch.refusing or self.breaker.state is not CLOSED) and not await self._usable():
            return DOWN
        try:
            if _monotonic() >= watch.probe_due:
                raw = await self._probed(command, args)
            elif self._packer is not None:
                packed = self._packer.get(args[0]) if command == "GET" else self._packer.hget(*args)
                raw = await packed_read(self._pool, packed)
            else:
                raw = await self.client.execute_command(command, *args)
        except REDIS_FAILURES as exc:
            await self._failed(exc)
            return DOWN
        self._ok()
        if raw is None:
            self.stats.misses += 1
            return MISS
        self.stats.hits += 1
        return raw

    async def _mget_slots(self, keys: list[str], probe: bool) -> list[Any]:
        """MGET on a cluster: redis-py's per-slot MGETs, one pipeline per node (one round trip each, in parallel);
        the write probe, when due, first (a refusal raises before the read is trusted)."""
        if probe and self._refusal.due(_monotonic()):
            await self.client.execute_command("DEL", self.keys.probe)
        return await self.client.mget_nonatomic(keys)  # type: ignore[no-any-return]

    async def get_raws(self, keys: list[str]) -> Any:
        """MGET of many entries: a list of encoded entry or MISS per key, or DOWN."""
        watch = self._refusal
        if (self._pending or watch.refusing or self.breaker.state is not CLOSED) and not await self._usable():
            return DOWN
        try:
            if self.cluster:
                raws = await self._mget_slots(keys, _monotonic() >= watch.probe_due)
            elif _monotonic() < watch.probe_due:
                if self._packer is not None:
                    raws = await packed_read(self._pool, self._packer.mget(keys))
                else:
                    raws = await self.client.execute_command("MGET", *keys)
            else:
                raws = await self._probed("MGET", tuple(keys))
        except REDIS_FAILURES as exc:
            await self._failed(exc)
            return DOWN
        self._ok()
        misses = raws.count(None)
        self.stats.misses += misses
        self.stats.hits += len(raws) - misses
        return [MISS if raw is None else raw for raw in raws] if misses else raws

    # -- leases and fills -----------------------------------------------------------------------

    async def lease(self, lease_key: str) -> str | None:
        """Take the fill lease of a missed key before reading PostgreSQL; None if someone holds it or Redis failed."""
        if self._refusal.refusing:
            return None
        token = self._token()
        try:
            taken = await self.client.set(lease_key, token, nx=True, px=self.lease_ms)
        except REDIS_FAILURES as exc:
            await self._failed(exc)
            return None
        self._ok()
        return token if taken else None

    async def leases(self, lease_keys: list[str]) -> list[str | None]:
        """lease() for many keys in one round trip."""
        if self._refusal.refusing:
            return [None] * len(lease_keys)
        tokens = [self._token() for _ in lease_keys]
        commands = [("SET", (k, t, "NX", "PX", self.lease_ms)) for k, t in zip(lease_keys, tokens)]
        try:
            results = await run_pipeline(self.client, commands)  # type: ignore[arg-type]
        except REDIS_FAILURES as exc:
            await self._failed(exc)
            return [None] * len(lease_keys)
        self._ok()
        return [t if r is True or r == b"OK" else None for t, r in zip(tokens, results)]

    def _ttl_args(self, row: Row | None) -> tuple[str, int]:
        """(mode, ms): absolute PXAT at the row's expiry, else a relative cap."""
        if row is None:
            return "px", self.negative_ms
        at = expires_at_ms(row)
        return ("pxat", at) if at is not None else ("px", self.no_expiry_ms)

    async def fill_entry(self, ks: KeySet, token: str, value: bytes, row: Row | None) -> None:
        """Store what PostgreSQL returned (`value` is `row` encoded), if the lease taken before reading it still stands."""
        mode, ms = self._ttl_args(row)
        await self._fill(ks.entry, ks.lease, (token, value, mode, ms, ""))

    async def fill_entries(self, items: list[tuple[KeySet, str, bytes, Row | None]]) -> None:
        """fill_entry for many keys in one round trip."""
        if self._refusal.refusing:
            return
        commands = []
        for ks, token, value, row in items:
            mode, ms = self._ttl_args(row)
            commands.append((FILL_SCRIPT, ((ks.entry, ks.lease), (token, value, mode, ms, ""))))
        try:
            results = await run_pipeline(self.client, commands)  # type: ignore[arg-type]
        except REDIS_FAILURES as exc:
            await self._failed(exc)
            return
        self._ok()
        for done in results:
            if isinstance(done, RedisError):
                await self._failed(done)
            else:
                self._count_fill(done)

    async def fill_history(self, ks: KeySet, token: str, limit: int, value: bytes) -> None:
        """Store a history answer (`value`, encoded) under its limit, if the history lease still stands."""
        await self._fill(ks.history, ks.history_lease, (token, value, "px", self.history_ms, str(limit)))

    async def _fill(self, target: str, lease_key: str, args: tuple[Any, ...]) -> None:
        """One FILL script; skipped while Redis refuses writes (it would be refused too)."""
        if self._refusal.refusing:
            return
        try:
            done = await evalsha(self.client, FILL_SCRIPT, (target, lease_key), args)
        except REDIS_FAILURES as exc:
            await self._failed(exc)
            return
        self._ok()
        self._count_fill(done)

    def _count_fill(self, done: Any) -> None:
        if done == 1:
            self.stats.fills += 1
        else:
            self.stats.fills_refused += 1

    async def close(self) -> None:
        """Stop the background drainer (owed kills are tried once more first)."""
        await self._owed.close()
