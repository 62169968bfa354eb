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


def encode_entry(row: dict[str, Any] | None) -> bytes:
    """A get_latest answer as stored in Redis and in the near tier."""
    return NEGATIVE if row is None else encode(row)
