"""The change channel of each Redis Cluster slot: a name that hashes to that slot (pure, no I/O).

A script may publish only within its keys' slot (SPUBLISH), and a subscriber must subscribe to a channel
on the node serving its slot; so each slot gets one channel, '<channel>:{<tag>}', the tag hashing to it.
"""

from __future__ import annotations

import functools
from binascii import crc_hqx

from redis.crc import key_slot

SLOTS = 16384


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """For each of the 16384 slots, the shortest decimal number that hashes to it (found once, in ~70 ms)."""
    tags: list[str | None] = [None] * SLOTS
    left, i = SLOTS, 0
    while left:
        text = str(i)
        slot = crc_hqx(text.encode(), 0) % SLOTS  # a key's slot is CRC16 of its hash tag
        if tags[slot] is None:
            tags[slot] = text
            left -= 1
        i += 1
    return tuple(t for t in tags if t is not None)


def slot_channel(channel: str, slot: int) -> str:
    """The change channel of one slot: it hashes to that slot, so a script there may publish on it."""
    return f"{channel}:{{{slot_tags()[slot]}}}"


def key_channel(channel: str, key: str) -> str:
    """The change channel of the slot a key lives in."""
    return slot_channel(channel, key_slot(key.encode()))
