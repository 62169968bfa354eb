"""Keeps every process's near tier coherent: evict on each announced change, flush on any doubt."""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from . import observe
from ._feed import ChangeFeed
from .tiers.near import NearTier
from .policy.failures import REDIS_FAILURES

logger = logging.getLogger(__name__)


@dataclass
class ListenerStats:
    """What the listener saw."""

    messages: int = 0
    gaps: int = 0
    reconnects: int = 0
    restarts_seen: int = 0


class _Sequence:
    """One publisher's announcements: the next number expected, numbers seen ahead of a hole, when last heard."""

    __slots__ = ("expected", "ahead", "hole_since", "heard")

    def __init__(self, expected: int, now: float) -> None:
        self.expected = expected
        self.ahead: set[int] = set()
        self.hole_since: float | None = None
        self.heard = now

    def receive(self, seq: int, now: float) -> None:
        """Advance past seq and whatever it completes; a number ahead of the expected one opens a hole."""
        self.heard = now
        if seq == self.expected:
            self.expected += 1
            while self.expected in self.ahead:
                self.ahead.remove(self.expected)
                self.expected += 1
            if not self.ahead:
                self.hole_since = None
        elif seq > self.expected:
            self.ahead.add(seq)
            if self.hole_since is None:
                self.hole_since = now
        # seq < expected: a late message for a hole already given up (and flushed for)

    def skip_hole(self) -> None:
        """Give up on the missing numbers and continue after the highest seen."""
        self.expected = max(self.ahead) + 1
        self.ahead.clear()
        self.hole_since = None


class CoherenceListener:
    """Subscribes to the change feed; a gap in a publisher's sequence, a lost link or a new Redis run id flushes."""

    def __init__(self, client: redis.Redis, channel: str, near: NearTier, *, poll: float = 0.2, health: float = 1.0,
                 gap_grace: float = 0.25, publisher_ttl: float = 60.0, gather: float = 0.02) -> None:
        # A thread of its own on sync connections, whichever API the caches use (see _sync_client).
        # A pub/sub read waits for messages, not for an answer.
        self._source, self._read_timeout = client, max(1.0, poll * 5)
        self.channel = channel
        self.feed = ChangeFeed(client, channel, timeout=self._read_timeout)
        self.near = near
        self.poll = poll
        #: Seconds to wait after a wake-up before draining: announcements arriving meanwhile share one drain.
        #: Staleness does not depend on it: a near hit applies what is on the socket first (poll_now).
        self.gather = gather
        # A silently dead link (no RST) delivers nothing: a PING unanswered for 3 intervals counts as lost.
        self.health = health
        self._last_ping = 0.0
        self.stats = ListenerStats()
        # Least recently heard first, so forgetting silent publishers looks only at the front; and apart,
        # the few with a hole open, so a message never walks every publisher ever heard.
        self._publishers: OrderedDict[str, _Sequence] = OrderedDict()
        self._holes: dict[str, _Sequence] = {}
        self.gap_grace = gap_grace
        #: A publisher silent this long (short-lived peer processes) is forgotten; its next message is a new
        #: baseline, as after our own subscription, so a loss right then is bounded by near_max_age alone.
        self.publisher_ttl = publisher_ttl
        self._run_ids: tuple[str, ...] | None = None
        self._stop = threading.Event()
        self._open = False
        # Held while anything reads or writes the subscriptions (this thread's drain, a reader's poll_now):
        # never while waiting, so a reader that finds it held knows announcements are being applied now.
        self._lock = threading.Lock()
        self._fds: tuple[int, ...] = ()  # the feed's sockets, for readers to check (empty while not subscribed)
        near.poll_announcements = self.poll_now
        self._thread = threading.Thread(target=self._run, name="tiered_cache-coherence", daemon=True)
        self.subscribed = threading.Event()
        self.namespace = channel.rsplit(":", 1)[0]  # for log records
        self._lost_since = observe.Episode()

    def start(self) -> CoherenceListener:
        self._thread.start()
        return self

    def _after_fork_in_child(self) -> None:
        """In a forked child: the thread is gone and the sockets are the parent's; start over on new ones.

        The parent's subscription is dropped, never closed or read (that would take the parent's messages),
        and the near tier (reset first by its owner) turns on again only once this child is subscribed.
        """
        running = self._thread.ident is not None and not self._stop.is_set()
        self._lock = threading.Lock()  # the parent's thread may have held it at fork time
        self._fds = ()  # the parent's sockets: a reader must never poll or read them here
        self._open = False
        self.feed.forget()
        self.feed = ChangeFeed(self._source, self.channel, timeout=self._read_timeout)
        self._publishers.clear()
        self._holes.clear()
        self._stop = threading.Event()
        self.subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tiered_cache-coherence", daemon=True)
        if running:
            self._thread.start()

    def _subscribe(self) -> None:
        """Subscribe everywhere, note the servers' run ids; the near tier turns on only after every confirmation."""
        self.feed.open(self._stop, 3 * self.health + self.poll)
        self._open = True
        if self._run_ids is not None and self.feed.servers != self._run_ids:
            self.stats.restarts_seen += 1
            observe.near_flushed(self.namespace, "restart")
        self._run_ids = self.feed.servers
        self._last_ping = time.monotonic()
        # Anything announced before this point may have been missed: start from empty.
        self._publishers.clear()
        self._holes.clear()
        self.near.flush()
        self._fds = self.feed.fds
        self.near.active = True
        self.subscribed.set()
        seconds = self._lost_since.end()
        if seconds is not None:
            observe.listener_resubscribed(self.namespace, seconds)

    def _lost(self) -> None:
        """The listener cannot vouch for the near tier any more: switch it off and empty it."""
        self.near.active = False
        self._fds = ()
        self.subscribed.clear()
        self.near.flush()
        self.feed.close()
        self._open = False

    def handle(self, data: bytes | str, now: float | None = None) -> None:
        """Apply one announcement 'publisher:seq:entry_key' ('*' as the key flushes everything)."""
        text = data.decode() if isinstance(data, bytes) else data
        publisher, seq_text, key = text.split(":", 2)
        seq = int(seq_text)
        self.stats.messages += 1
        if key == "*":
            self.near.flush()
            observe.near_flushed(self.namespace, "announced")
        elif key:  # an empty key only carries the sequence number (a kill the relay could skip)
            self.near.evict(key)
        now = time.monotonic() if now is None else now
        publishers = self._publishers
        state = publishers.get(publisher)
        if state is None:  # first word from this publisher since we subscribed (or since forgotten): its baseline
            publishers[publisher] = _Sequence(seq + 1, now)
            return
        publishers.move_to_end(publisher)
        state.receive(seq, now)
        if state.hole_since is not None:
            self._holes[publisher] = state
        elif publisher in self._holes:
            del self._holes[publisher]

    def check_gaps(self, now: float | None = None) -> None:
        """A sequence number missing for longer than the grace was lost, not late: flush. Then forget the silent."""
        now = time.monotonic() if now is None else now
        if self._holes:
            for publisher, state in list(self._holes.items()):
                if state.hole_since is not None and now - state.hole_since > self.gap_grace:
                    state.skip_hole()
                    del self._holes[publisher]
                    self.stats.gaps += 1
                    self.near.flush()
                    observe.near_flushed(self.namespace, "gap")
        publishers = self._publishers
        while publishers:
            publisher, state = next(iter(publishers.items()))
            if now - state.heard <= self.publisher_ttl or state.hole_since is not None:
                break
            del publishers[publisher]

    def poll_now(self) -> None:
        """Apply announcements already waiting on the socket, from the reading thread itself.

        A near hit calls this (at most once a millisecond) before answering, so a CPU-busy process serves
        no entry whose eviction has already arrived: the listener thread alone would first have to win the
        GIL from the busy thread, once per blocking call (about 5 ms each at the default switch interval).
        """
        if not self._fds:
            return
        # Under the lock (uncontended but for a drain under way, which we must wait for anyway): the sockets are
        # closed only under it, so the descriptors checked are the feed's, never closed or reused ones.
        with self._lock:
            fds = self._fds
            if fds:
                try:
                    if select.select(fds, (), (), 0)[0]:
                        self._drain(time.monotonic())
                except (*REDIS_FAILURES, OSError, ValueError) as exc:
                    # The listener thread finds the same fault on its next read and reconnects; until then
                    # the near tier cannot vouch for anything.
                    logger.info("coherence listener: %s while polling: %s; near tier off", type(exc).__name__, exc)
                    self.near.active = False
                    self.near.flush()

    def _drain(self, now: float) -> None:
        """Apply every message already received (under the lock); returns when none is waiting."""
        for data in self.feed.drain(now):
            self.handle(data, now)

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                if not self._open:
                    self._subscribe()
                    backoff = 0.05
                if not self.near.active:  # a poll_now found the link broken
                    raise RedisConnectionError("the change channel failed while a reader polled it")
                with self._lock:
                    now = time.monotonic()
                    self._drain(now)  # first: the subscribe confirmation may have come with messages behind it
                    self.check_gaps(now)
                    if now - self._last_ping >= self.health:
                        self._last_ping = now
                        self.feed.ping()
                silent = self.feed.unheard(now, 3 * self.health + self.poll)
                if silent is not None:
                    raise RedisConnectionError(f"change feed: {silent}")
                if self.feed.fds and self.near.polled_within(self.poll):
                    # Readers are draining the socket themselves before each hit: waking on every announcement
                    # would only cost them a thread switch and the GIL. Look again in `poll` seconds.
                    self._stop.wait(self.poll)
                elif self.feed.fds:
                    self.feed.wait(self.poll)  # without the lock (and without the GIL)
                    # Then let what follows gather, so one drain (one round for the GIL) applies it all.
                    self._stop.wait(self.gather)
                else:  # no OS socket to wait on (fakeredis): the client waits, and readers do not poll
                    with self._lock:
                        for data in self.feed.read_waiting(self.poll):
                            self.handle(data, time.monotonic())
            except (*REDIS_FAILURES, OSError, ValueError) as exc:
                self.stats.reconnects += 1
                if self._lost_since.begin():
                    observe.listener_lost(self.namespace, type(exc).__name__)
                logger.debug("coherence listener: %s: %s; near tier flushed and off until resubscribed", type(exc).__name__, exc)
                with self._lock:
                    self._lost()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
        with self._lock:
            self._lost()

    def stop(self) -> None:
        """Stop listening; the near tier is switched off."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.poll * 5 + 1)
        self.feed.shutdown()

