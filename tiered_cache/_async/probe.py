"""The write probe: whether Redis still takes our kills, so a tier never serves entries it could not remove."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING


from ..policy.failures import WRITES_REFUSED, Failure, RefusalWatch
from ..policy.failures import REDIS_FAILURES

if TYPE_CHECKING:
    from .redis_tier import AsyncRedisTier

logger = logging.getLogger(__name__)


class AsyncWriteProbe:
    """A DEL of `<namespace>:probe` (a write that needs no memory: OOM never trips it) and the refusal it reveals.

    The tier sends it with a read at most every probe_interval, and before every drain while refusing.
    `watch` is read on the tier's hit path; its transitions happen here, under one lock (never held across an await).
    """

    def __init__(self, tier: AsyncRedisTier, probe_interval: float, hold_down: float) -> None:
        self.tier = tier
        self.watch = RefusalWatch(probe_interval, hold_down)
        self.lock = threading.Lock()

    def _after_fork_in_child(self) -> None:
        """Another thread may have held the lock at fork time: take a new one."""
        self.lock = threading.Lock()

    async def refused(self, kind: Failure, exc: BaseException) -> None:
        """Redis refuses writes (or everything): the tier stops serving its entries; near tiers drop theirs."""
        with self.lock:
            started = self.watch.refused()
        if not started:
            return
        tier = self.tier
        tier.stats.refusals += 1
        logger.warning("redis tier: Redis refuses writes (%s: %s); reading PostgreSQL until it accepts them for "
                       "%.1f s", kind, exc, self.watch.hold_down)
        if tier.channel and kind is WRITES_REFUSED:  # PUBLISH is no write: a replica or MISCONF still takes it
            try:
                await tier.client.publish(tier.channel, tier._message("*"))
            except REDIS_FAILURES:
                pass  # best effort: every listener's own tier probes too

    async def send(self) -> bool:
        """Send the probe now: True if Redis accepted it (accepted for hold_down, a refusal ends)."""
        tier = self.tier
        try:
            await tier.client.execute_command("DEL", tier.keys.probe)
        except REDIS_FAILURES as exc:
            if not (await tier._failed(exc)).refusing:  # no answer, or an unrelated one, proves nothing
                with self.lock:
                    self.watch.unanswered()
            return False
        tier._ok()
        with self.lock:
            if self.watch.accepted():
                logger.warning("redis tier: Redis accepts writes again; reading it again")
        return True
