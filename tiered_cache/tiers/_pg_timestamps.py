"""timestamptz values Python's datetime cannot hold, loaded instead of failing the whole result.

PostgreSQL holds 'infinity', '-infinity' and years 4713 BC to 294276 AD; datetime holds years 1 to 9999,
and the server renders text in the session's zone, so 9999-12-31 20:00 UTC arrives as year 10000 in
+08:00. psycopg's loader raises DataError on all of these, failing every row of the statement.

What the safe loader returns (documented in the README's configuration notes):
- a value Python can hold in UTC: that instant, in UTC (not the session zone, which cannot hold it);
- 'infinity' or later than datetime can hold: INFINITY (datetime.max in UTC); an expires_at of
  INFINITY is served as None, no expiry;
- '-infinity' or earlier: NEG_INFINITY (datetime.min in UTC), already expired.
Clamping keeps SQL's order, so the row Python picks as newest is the one ORDER BY picked.

psycopg's C loaders are final classes whose C entry point the row loop calls directly, so a subclass
cannot put a fallback in front of them; this loader wraps one and costs about 165 ns more per value.
The read path therefore keeps psycopg's loader and fetches a result again with this one only when the
first fetch raised (see _async/pg_pool.py); writes, whose statements cannot run twice, always use it.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg.adapt import Buffer, Loader
from psycopg.pq import Format

INFINITY = datetime.max.replace(tzinfo=timezone.utc)
NEG_INFINITY = datetime.min.replace(tzinfo=timezone.utc)

#: The built-in type's oid (psycopg.postgres.types["timestamptz"]); fixed by PostgreSQL.
TIMESTAMPTZ_OID = 1184

_Fast = psycopg.adapters.get_loader(TIMESTAMPTZ_OID, Format.TEXT)  # psycopg's C loader when it is installed

# DateStyle ISO (the store's sessions set it): 10000-01-01 04:00:00.5+08:05:43, or ... BC
_ISO = re.compile(
    rb"^(\d+)-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?([-+])(\d\d)(?::(\d\d))?(?::(\d\d))?( BC)?$"
)
_CYCLE_YEARS, _CYCLE_DAYS = 400, 146097  # the Gregorian calendar repeats exactly every 400 years


class SafeTimestamptzLoader(Loader):
    """psycopg's text timestamptz loader, with beyond_datetime() where it raises DataError."""

    format = Format.TEXT

    def __init__(self, oid: int, context: Any = None) -> None:
        super().__init__(oid, context)
        self._fast = _Fast(oid, context).load

    def load(self, data: Buffer) -> datetime:
        try:
            return self._fast(data)
        except psycopg.DataError:
            return beyond_datetime(bytes(data))


def safe_cursor(conn: psycopg.Connection[Any]) -> psycopg.Cursor[Any]:
    """A cursor of conn whose timestamptz results load with SafeTimestamptzLoader."""
    cur = conn.cursor()
    cur.adapters.register_loader(TIMESTAMPTZ_OID, SafeTimestamptzLoader)
    return cur


def beyond_datetime(text: bytes) -> datetime:
    """A timestamptz psycopg could not load, as the module docstring says; DataError if it is not one."""
    if text == b"infinity":
        return INFINITY
    if text == b"-infinity":
        return NEG_INFINITY
    m = _ISO.match(text)
    if not m:
        raise psycopg.DataError(f"can't parse timestamptz {text.decode('utf-8', 'replace')!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micros = int((m[7] or b"0").ljust(6, b"0"))
    offset = timedelta(hours=int(m[9]), minutes=int(m[10] or 0), seconds=int(m[11] or 0))
    if m[8] == b"-":
        offset = -offset
    if m[12]:
        year = 1 - year  # 1 BC is year 0
    # Move the year into datetime's range by whole 400-year cycles, then move the instant back.
    cycles = 0
    if year > 9999:
        cycles = -(-(year - 9999) // _CYCLE_YEARS)
    elif year < 1:
        cycles = (year - 1) // _CYCLE_YEARS
    local = datetime(year - cycles * _CYCLE_YEARS, month, day, hour, minute, second, micros, tzinfo=timezone.utc)
    shift = timedelta(days=cycles * _CYCLE_DAYS) - offset
    try:
        instant = local + shift
    except OverflowError:
        return INFINITY if shift > timedelta(0) else NEG_INFINITY
    if instant == INFINITY:
        return INFINITY  # the same object, so row shaping can tell "no expiry" by identity
    return instant
