"""The Lua scripts of the Redis tier and how commands reach Redis: EVALSHA (loaded again on NOSCRIPT), pipelines."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from ..policy.failures import NOSCRIPT, classify

_NOW_MS = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"

# No shebang flags on any script: they need Redis 7, and the embedded fallback is 6.2. Without them a
# script runs when Redis is full (OOM) and Redis checks memory only before the script's first write;
# every script here writes a DEL first, so a kill, a write-through and a fill all run whole. A replica
# (READONLY), MISCONF or NOREPLICAS refuses that first DEL: the script stops there, having changed nothing.

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
class Script:
    """A Lua script and its SHA1, sent with EVALSHA and loaded again on NOSCRIPT."""

    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())


KILL_SCRIPT, WRITE_THROUGH_SCRIPT, FILL_SCRIPT, RELEASE_SCRIPT = (
    Script(s) for s in (KILL, WRITE_THROUGH, FILL, RELEASE)
)


Command = tuple["Script | str", tuple[Any, ...]]


def evalsha(client: redis.Redis, script: Script, keys: Iterable[str], args: Iterable[Any]) -> Any:
    """EVALSHA, loading the script once if Redis lost it (SCRIPT FLUSH, restart)."""
    keys = tuple(keys)
    try:
        return client.evalsha(script.sha, len(keys), *keys, *args)
    except redis.RedisError as exc:
        if classify(exc) is not NOSCRIPT:
            raise
        client.script_load(script.text)
        return client.evalsha(script.sha, len(keys), *keys, *args)


def run_pipeline(client: redis.Redis, commands: list[Command], *, strict: bool = False) -> list[Any]:
    """Run commands in one round trip; scripts Redis lost are loaded and their commands re-sent.

    An error answer about the whole of Redis (a refusal: READONLY, BUSY, ...) raises; strict: any error
    answer raises, so a kill is confirmed only by a real answer. Other errors stay in place.
    """
    results = send(client, commands)
    lost = [i for i, r in enumerate(results) if isinstance(r, Exception) and classify(r) is NOSCRIPT]
    if lost:
        for script in {commands[i][0] for i in lost if isinstance(commands[i][0], Script)}:
            client.script_load(script.text)  # type: ignore[union-attr]
        again = send(client, [commands[i] for i in lost])
        for i, r in zip(lost, again):
            results[i] = r
    for r in results:
        if isinstance(r, Exception) and (strict or classify(r).refusing):
            raise r
    return results


def send(client: redis.Redis, commands: list[Command]) -> list[Any]:
    """One pipeline, no MULTI (every command is atomic by itself), errors returned in place."""
    pipe = client.pipeline(transaction=False)
    for command, args in commands:
        if isinstance(command, Script):
            keys, argv = args
            pipe.evalsha(command.sha, len(keys), *keys, *argv)
        else:
            pipe.execute_command(command, *args)
    return pipe.execute(raise_on_error=False)
