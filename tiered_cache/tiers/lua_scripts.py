"""The Lua scripts of the Redis tier, as text and SHA1: shared by the sync and async tiers (pure, no I/O)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

_NOW_MS = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"

# No shebang flags on any script: they need Redis 7, and the embedded fallback is 6.2. Without them a
# script runs when Redis is full (OOM) and Redis checks memory only before the script's first write;
# every script here writes a DEL first, so a kill, a write-through and a fill all run whole. A replica
# (READONLY), MISCONF or NOREPLICAS refuses that first DEL: the script stops there, having changed nothing.

# KEYS: KeySet.all (entry, history, lease, history_lease, writer, regenerating). ARGV: channel ('' = silent),
# message, scope ('all'|'history'), txid, no-op message. With a txid (the relay), the kill is skipped when
# the entry was stored by that very transaction's write-through; the no-op keeps the sequence unbroken.
# 'all' deletes every key of the set; 'history' (a placeholder came or went) the history, its lease and
# the regeneration marker: a generation that began or ended makes the marker's claim untrue.
KILL = """
if ARGV[4] ~= '' and redis.call('GET', KEYS[5]) == ARGV[4] then
  if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], ARGV[5]) end
  return 0
end
if ARGV[3] == 'history' then
  redis.call('DEL', KEYS[2], KEYS[4], KEYS[6])
else
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
end
if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return 1
"""

# A writer's change: kill everything of the key, then store the new state (and the writer's
# transaction id beside it) only if the writer's pre-commit lease survived.
# KEYS: KeySet.all. ARGV: token, value, mode ('pxat'|'px'), ms, channel, message, txid.
WRITE_THROUGH = (
    """
local mine = redis.call('GET', KEYS[3]) == ARGV[1]
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
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

# A reader's fill (or get_or_generate's regeneration marker). KEYS: target, lease. ARGV: token, value, mode ('pxat'|'px'), ms, hash field ('' = string).
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

# On a Redis Cluster the channel given is the key's slot channel ('<channel>:{<tag>}', _feed.py): from
# Redis 7 the announcement stays in the key's shard (SPUBLISH); an older node announces on the classic
# channel, which every node relays. Each node decides for itself, so a mixed cluster is covered too.
_ANNOUNCE = """
local function announce(channel, message)
  if redis.REDIS_VERSION_NUM ~= nil and redis.REDIS_VERSION_NUM >= 0x070000 then
    redis.call('SPUBLISH', channel, message)
  else
    redis.call('PUBLISH', string.match(channel, '^(.*):{%d+}$') or channel, message)
  end
end
"""


def _sharded(text: str) -> Script:
    return Script(_ANNOUNCE + text.replace("redis.call('PUBLISH', ", "announce("))


CLUSTER_KILL_SCRIPT, CLUSTER_WRITE_THROUGH_SCRIPT = _sharded(KILL), _sharded(WRITE_THROUGH)


Command = tuple["Script | str", tuple[Any, ...]]
