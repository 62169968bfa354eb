# Generated from tiered_cache/_async/lua.py by tools/async_to_sync.py: do not edit; edit the source and run it again.
"""How commands reach Redis: EVALSHA (loaded again on NOSCRIPT) and pipelines; the scripts are tiers/lua_scripts.py."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis

from ..policy.failures import NOSCRIPT, classify
from ..tiers.lua_scripts import Command, Script
from ..policy.failures import REDIS_FAILURES


def evalsha(client: redis.Redis, script: Script, keys: Iterable[str], args: Iterable[Any]) -> Any:
    """EVALSHA, loading the script once if Redis lost it (SCRIPT FLUSH, restart)."""
    keys = tuple(keys)
    try:
        return client.evalsha(script.sha, len(keys), *keys, *args)
    except REDIS_FAILURES as exc:
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
            pipe.execute_command("EVALSHA", command.sha, len(keys), *keys, *argv)  # a cluster pipeline blocks evalsha()
        else:
            pipe.execute_command(command, *args)
    return pipe.execute(raise_on_error=False)


def packed_read(pool: Any, packed: bytes) -> Any:
    """One read, packed by _lean.Packer, on a pooled connection: redis-py's connection and error rules, not its per-call bookkeeping.

    send_packed_command and read_response disconnect on any failure and raise redis-py's exceptions (an error
    reply raises ResponseError), so failures classify exactly as execute_command's do.
    """
    connection = pool.get_connection()
    try:
        connection.send_packed_command([packed], False)
        return connection.read_response()
    finally:
        pool.release(connection)
