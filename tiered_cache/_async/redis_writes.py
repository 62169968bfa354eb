"""The Redis tier's changes: writer leases, write-throughs and kills after a commit, and the kills owed when Redis misses them.

A part of AsyncRedisTier (its base class), kept apart so each module stays one concern: the failure rules it
follows are told in redis_tier.py. A kill or write-through cancelled (or interrupted) at any await owes its
kill synchronously, with no I/O, before the exception goes on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from redis.exceptions import RedisError

from .._acompat import asleep
from ..contracts import DOWN, Row
from ..policy.entries import encode_entry
from ..policy.failures import BUSY, OUTAGE, WRITES_REFUSED, classify
from ..policy.keys import KeySet
from ..tiers._redis_shared import CONTENDED, RETRY_EVERY
from ..policy.slot_channels import key_channel
from ..tiers.lua_scripts import RELEASE_SCRIPT
from .lua import evalsha, run_pipeline
from .runwatch import drop_everywhere
from ..policy.failures import REDIS_FAILURES

_monotonic = time.monotonic


class AsyncRedisWrites:
    """Every change path of the tier; the attributes it uses (client, keys, stats, _owed, ...) are the tier's."""

    # -- changes --------------------------------------------------------------------------------

    async def lease_for_write(self, ks: KeySet) -> Any:
        """A writer's lease, taken before its commit (overwriting readers').

        None if Redis was skipped or answered an error (the kill is still tried after the commit), DOWN if
        it did not answer (the kill is owed at once), CONTENDED if it displaced another writer's lease: two
        writers in flight on one key cannot know which commits last, so neither stores.
        """
        if not await self._usable():
            return None
        token = "w" + self._token()
        try:
            displaced = await self.client.set(ks.lease, token, px=self.lease_ms, get=True)
        except REDIS_FAILURES as exc:
            return DOWN if await self._failed(exc) is OUTAGE else None
        self._ok()
        return CONTENDED if displaced is not None and displaced[:1] == b"w" else token

    async def leases_for_write(self, keysets: list[KeySet]) -> None:
        """Writer leases on many keys in one round trip (invalidate_site): in-flight write-throughs are refused."""
        if not keysets or not await self._usable():
            return
        try:
            commands = [("SET", (ks.lease, "w" + self._token(), "PX", self.lease_ms)) for ks in keysets]
            await run_pipeline(self.client, commands)  # type: ignore[arg-type]
        except REDIS_FAILURES as exc:
            await self._failed(exc)
            return
        self._ok()

    def _channel_of(self, ks: KeySet) -> str:
        """Where a script announces a change of ks: the change channel, or on a cluster its slot's channel."""
        if self.cluster and self.channel:
            return key_channel(self.channel, ks.entry)
        return self.channel

    async def write_through(self, ks: KeySet, token: Any, latest: Row | None, txid: str | None = None) -> None:
        """After a commit: drop every entry and lease of the key and store `latest` if our lease stood.

        If the lease was skipped or answered an error (None) or another writer holds the key (CONTENDED),
        the kill is still tried: Redis may answer now, and another process may hold a lease taken before
        our commit that only our kill can refuse. If Redis did not answer (DOWN), the kill is owed at once
        (the drainer retries within milliseconds) so a write pays at most one redis_timeout.
        """
        if token is DOWN:
            return self._owe_kill(ks)
        try:
            if token is None or token is CONTENDED:
                return await self.kill([ks])
            mode, ms = self._ttl_args(latest)
            value = encode_entry(latest)
            try:
                await evalsha(
                    self.client, self._write_through_script, ks.all,
                    (token, value, mode, ms, self._channel_of(ks), self._message(ks.entry), txid or ""))
            except REDIS_FAILURES as exc:
                kind = await self._failed(exc)
                if kind is OUTAGE or kind is WRITES_REFUSED:  # a kill now would fail the same way
                    return self._owe_kill(ks)
                return await self.kill([ks])  # OOM, BUSY, a full pool, another answer: a plain kill, retried if it can land
        except BaseException:
            self._owe_kill(ks)  # cancelled or interrupted mid-call: it may not have landed; owed with no I/O
            raise
        self._ok()
        self.stats.writes_through += 1

    async def kill(self, keysets: Iterable[KeySet], *, history_only: bool = False) -> None:
        """After a commit: drop every entry (or only the history) and lease of these keys; owed if Redis fails.

        Tried even while the breaker is open (one redis_timeout at most): a kill skipped here could let
        another process fill the old state under a lease taken before the commit. While Redis answers BUSY
        or LOADING, or the local pool is empty, it is tried again every 5 ms for up to kill_wait.
        """
        keysets = list(keysets)
        if not keysets:
            return
        deadline = None
        try:
            while True:
                try:
                    await self.kill_or_raise(keysets, history_only=history_only)
                    return
                except REDIS_FAILURES as exc:
                    kind = classify(exc)
                if not kind.retry_kill:
                    break
                now = _monotonic()
                deadline = now + self.kill_wait if deadline is None else deadline
                if now >= deadline:
                    break
                await asleep(RETRY_EVERY if kind is BUSY else RETRY_EVERY / 5)  # a full pool already waited its timeout
        except BaseException:
            self.owe(keysets)  # cancelled or interrupted mid-call: it may not have landed; owed with no I/O
            raise
        self.owe(keysets)

    async def kill_or_raise(
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
            commands.append((self._kill_script,
                             (ks.all, (self._channel_of(ks), message, scope, txids[i] if txids else "", noop))))
        try:
            results = await run_pipeline(self.client, commands, strict=True)  # type: ignore[arg-type]
            if any(r not in (0, 1) for r in results):
                raise RedisError(f"unexpected answer to a kill: {results!r}")
        except REDIS_FAILURES as exc:
            await self._failed(exc)
            raise
        self._ok()
        self.stats.kills += sum(1 for r in results if r == 1)
        return results

    async def flush_namespace(self) -> int:
        """Drop every key of this namespace (the table was truncated) and announce a flush; raises on failure."""
        try:
            deleted = await drop_everywhere(self.client, self.keys.namespace)
            if self.channel:
                await self.client.publish(self.channel, self._message("*"))
        except REDIS_FAILURES as exc:
            await self._failed(exc)
            raise
        self._ok()
        return deleted

    async def release(self, ks: KeySet, token: Any) -> None:
        """Give back an unused writer lease so readers may fill again at once."""
        if token is None or token is DOWN or token is CONTENDED:
            return
        try:
            await evalsha(self.client, RELEASE_SCRIPT, (ks.lease,), (token,))
        except REDIS_FAILURES as exc:
            await self._failed(exc)
            return
        self._ok()

    # -- kills owed to Redis --------------------------------------------------------------------

    def _owe_kill(self, ks: KeySet) -> None:
        """Remember a kill Redis did not get; this process reads Redis again only after it lands."""
        self._owed.owe(ks)

    def owe(self, keysets: Iterable[KeySet]) -> None:
        """Owe these kills now, with no I/O: for a write cancelled or interrupted between its commit and its kill."""
        for ks in keysets:
            self._owed.owe(ks)

    async def drain_pending(self, max_chunks: int | None = None) -> bool:
        """Apply owed kills (or the namespace drop owed past max_owed); True when none is left."""
        return await self._owed.drain(max_chunks)

    @property
    def pending(self) -> int:
        """How many kills are owed to Redis."""
        return len(self._owed)
