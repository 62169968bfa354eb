"""What a Redis failure means, decided once: no answer is an outage; an error answer says what still works.

Pure: no I/O, the clock is injected. RedisTier applies the same rule on every path (reads, leases, fills,
writer leases, write-throughs, kills, releases, drains, flushes):

    kind            raised for                                    breaker  post-commit kill   serve Redis
    OUTAGE          refused, reset, timed out, garbled            counts   owed at once       no (breaker)
    SATURATED       local pool empty: 'No connection available.'  -        waits <= kill_wait yes
    BUSY            BUSY (a script), LOADING, MASTERDOWN          -        tried <= kill_wait no, held down
    OOM             OOM: memory-growing commands refused          -        lands (DEL works)  yes
    NOSCRIPT        the script cache was emptied                  -        reloaded, resent   yes
    WRITES_REFUSED  READONLY, MISCONF, NOREPLICAS, NOPERM         -        owed               no, held down
    RESHARDING      TRYAGAIN: a slot is half moved (a cluster)    -        tried <= kill_wait yes
    OTHER           any other error answer                        -        owed               yes

On a cluster, CLUSTERDOWN and a slot no node serves (a failover under way) are outages:
that shard does not answer. redis-py raises the last as RedisClusterException, which is no RedisError:
every path catches REDIS_FAILURES.

'Held down': the tier reads PostgreSQL until its write probe was accepted for hold_down (RefusalWatch).
Inside a Lua script Redis 7 keeps the error code ('READONLY ... script: ...'); Redis 6.2 wraps it
('ERR Error running script (...): @user_script:1: -READONLY ...'): both are read here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.exceptions
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    RedisClusterException,
    TryAgainError,
    InvalidResponse,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import ConfigurationError


@dataclass(frozen=True)
class Failure:
    """One kind of failure and what the tier does about it."""

    name: str
    outage: bool = False  # counts toward the circuit breaker
    retry_kill: bool = False  # a post-commit kill is retried for up to kill_wait before it is owed
    refusing: bool = False  # entries may no longer be killed: stop serving them until writes are held clear

    def __repr__(self) -> str:
        return self.name


OUTAGE = Failure("outage", outage=True)
SATURATED = Failure("saturated", retry_kill=True)
BUSY = Failure("busy", retry_kill=True, refusing=True)
OOM = Failure("oom")
NOSCRIPT = Failure("noscript")
WRITES_REFUSED = Failure("writes-refused", refusing=True)
RESHARDING = Failure("resharding", retry_kill=True)
OTHER = Failure("other")

#: What a Redis call may raise: redis-py's errors, and its cluster client's own (not RedisError subclasses).
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, RedisClusterException)

_CODES = {
    "OOM": OOM,
    "BUSY": BUSY,
    "LOADING": BUSY,
    "MASTERDOWN": BUSY,
    "NOSCRIPT": NOSCRIPT,
    "READONLY": WRITES_REFUSED,
    "MISCONF": WRITES_REFUSED,
    "NOREPLICAS": WRITES_REFUSED,
    "NOPERM": WRITES_REFUSED,  # an ACL that forbids our DEL: kills cannot land, as on a replica
}
# The code opens the answer, or (Redis 6.2, from inside a script) follows ': -'.
_CODE = re.compile(r"(?:^|: -)([A-Z]{2,})\b")
# BlockingConnectionPool and ConnectionPool, when every local connection is in use.
_POOL_EMPTY = ("No connection available.", "Too many connections")
_MAX_CONNECTIONS = getattr(redis.exceptions, "MaxConnectionsError", ())  # redis-py 6+: ConnectionPool's own class


def classify(exc: BaseException) -> Failure:
    """The kind of a failure raised by (or returned in place from) redis-py."""
    if isinstance(exc, OutOfMemoryError):
        return OOM
    if isinstance(exc, NoScriptError):
        return NOSCRIPT
    if isinstance(exc, (ReadOnlyError, NoPermissionError)):
        return WRITES_REFUSED
    if isinstance(exc, RedisClusterException) or (isinstance(exc, ClusterDownError) and not isinstance(exc, MasterDownError)):
        return OUTAGE
    if isinstance(exc, (TryAgainError, AskError)):  # a slot on the move: retried, as a redirect needs
        return RESHARDING
    if isinstance(exc, BusyLoadingError):  # a ConnectionError subclass, but an answer: Redis is loading
        return BUSY
    if isinstance(exc, RedisConnectionError):
        return SATURATED if isinstance(exc, _MAX_CONNECTIONS) or str(exc) in _POOL_EMPTY else OUTAGE
    if isinstance(exc, (RedisTimeoutError, InvalidResponse, OSError)):
        return OUTAGE
    if not isinstance(exc, RedisError):
        return OTHER
    code = getattr(exc, "status_code", None)
    if code in _CODES:
        return _CODES[code]
    for found in _CODE.finditer(str(exc)):
        kind = _CODES.get(found.group(1))
        if kind is not None:
            return kind
    return OTHER


class RefusalWatch:
    """Whether Redis is refusing writes (or everything), and when it has accepted them long enough to be trusted.

    `refused()` on any refusing answer; `accepted()` on a write (the probe, a kill) that worked. The watch
    clears only after writes were accepted for `hold_down` seconds with no refusal in between, so kills
    owed meanwhile (drained on a short cadence, the relay's within its 1 s backoff) land first.
    """

    __slots__ = ("probe_interval", "hold_down", "clock", "refusing", "since", "clear_since", "probe_due", "episodes")

    def __init__(self, probe_interval: float = 0.5, hold_down: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (probe_interval, hold_down))
        if not numbers or not probe_interval > 0 or not hold_down >= 0:
            raise ConfigurationError(
                f"refusal watch: probe_interval must be > 0 and hold_down >= 0, got {probe_interval}, {hold_down}")
        self.probe_interval = probe_interval
        self.hold_down = hold_down
        self.clock = clock
        self.refusing = False
        self.since = 0.0  # when the current refusal was first seen
        self.clear_since: float | None = None  # first accepted write after the last refusal
        self.probe_due = 0.0  # the first read probes at once
        self.episodes = 0

    def due(self, now: float) -> bool:
        """Is a probe due? Claims it (the next one is due probe_interval later), so one caller sends it."""
        if now < self.probe_due:
            return False
        self.probe_due = now + self.probe_interval
        return True

    def refused(self) -> bool:
        """A refusing answer; True if it starts a refusal (not already refusing)."""
        self.clear_since = None
        if self.refusing:
            return False
        self.refusing = True
        self.since = self.clock()
        self.episodes += 1
        return True

    def accepted(self) -> bool:
        """A write was accepted; True if that ends the refusal (held clear for hold_down)."""
        if not self.refusing:
            return False
        now = self.clock()
        if self.clear_since is None:
            self.clear_since = now
        if now - self.clear_since < self.hold_down:
            return False
        self.refusing = False
        self.clear_since = None
        return True

    def unanswered(self) -> None:
        """A probe got no answer (outage) or an unrelated error: it proves nothing, the hold-down starts again."""
        if self.refusing:
            self.clear_since = None
