"""How a cached value is encoded and when it must vanish; pure, shared by every tier and by async."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)

#: orjson: strict JSON (no pickle, nothing executable), and the fastest codec we measured (bench/codecs.py).
encode = orjson.dumps
decode = orjson.loads

#: A cached "no row" (negative entry) is the JSON null; a row is a JSON object, so the two never clash.
NEGATIVE = b"null"


def expires_at_ms(row: dict[str, Any] | None) -> int | None:
    """The row's expires_at as Unix milliseconds, floored so an entry never outlives its row."""
    if row is None or row["expires_at"] is None:
        return None
    return (datetime.fromisoformat(row["expires_at"]) - _EPOCH) // _MS


#: How an encoded row names its expiry. A JSON string escapes every '"', so `,"` is never inside one; and
#: expires_at comes after result_json (only status, a short string, follows it: tiers/_sql.LATEST_COLUMNS),
#: so the last occurrence in an entry is the row's own key, never one nested in result_json.
_EXPIRES_KEY = b',"expires_at":'


def entry_expires_at_ms(raw: bytes) -> int | None:
    """expires_at_ms of an encoded entry, read from its tail, so a JSON read can cache it near without decoding it."""
    at = raw.rfind(_EXPIRES_KEY)
    if at < 0:
        return None if raw == NEGATIVE else expires_at_ms(decode(raw))
    start = at + len(_EXPIRES_KEY)
    if raw[start] != 0x22:  # not a string: null
        return None
    text = raw[start + 1:raw.index(b'"', start + 1)].decode()
    return (datetime.fromisoformat(text) - _EPOCH) // _MS


def encode_entry(row: dict[str, Any] | None) -> bytes:
    """A get_latest answer as stored in Redis and in the near tier."""
    return NEGATIVE if row is None else encode(row)
