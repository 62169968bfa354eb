"""Input validation: every argument is checked here, before any I/O, and errors name the field."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

import orjson

from ..errors import ConfigurationError, InvalidInput

BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class Limits:
    """Bounds on what a caller may store; defaults fit the product's AI results."""

    max_name_length: int = 128
    max_target_id_length: int = 512
    max_payload_bytes: int = 1 << 20
    max_history: int = 100
    max_many: int = 1000


DEFAULT_LIMITS = Limits()


def name(field: str, value: object, max_length: int) -> str:
    """A non-empty str without NUL (PostgreSQL text cannot hold NUL) and within max_length."""
    if not isinstance(value, str):
        raise InvalidInput(field, f"expected str, got {type(value).__name__}")
    if not value:
        raise InvalidInput(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidInput(field, f"longer than {max_length} characters ({len(value)})")
    if "\x00" in value:
        raise InvalidInput(field, "contains a NUL character")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: neither Redis nor PostgreSQL can take it
            raise InvalidInput(field, f"is not valid Unicode text ({exc.reason} at {exc.start})") from None
    return value


def optional_name(field: str, value: object, max_length: int) -> str | None:
    """None or a valid name."""
    return None if value is None else name(field, value, max_length)


def bigint(field: str, value: object) -> int:
    """An int (bool is not an int here) that fits PostgreSQL bigint."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(field, f"expected int, got {type(value).__name__}")
        value = int(value)
    if not BIGINT_MIN <= value <= BIGINT_MAX:
        raise InvalidInput(field, f"{value} does not fit a 64-bit integer")
    return value


def optional_score(value: object) -> int | None:
    """None or an int that fits PostgreSQL integer."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput("score", f"expected int or None, got {type(value).__name__}")
    if not INT_MIN <= value <= INT_MAX:
        raise InvalidInput("score", f"{value} does not fit a 32-bit integer")
    return int(value)


def positive_int(field: str, value: object, maximum: int) -> int:
    """An int in 1..maximum (limits, ids)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, f"expected int, got {type(value).__name__}")
    if not 1 <= value <= maximum:
        raise InvalidInput(field, f"must be between 1 and {maximum}, got {value}")
    return int(value)


def optional_aware_datetime(field: str, value: object, zone: tzinfo | None = None) -> datetime | None:
    """None or a timezone-aware datetime (a naive one is ambiguous across venues) that `zone` can render.

    Rows are rendered in the store's zone: 9999-12-31 20:00 UTC would be year 10000 in +08:00, which
    PostgreSQL stores but no datetime can hold, so every later read of the row would fail.
    """
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidInput(field, f"expected datetime or None, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(field, "must be timezone-aware")
    if zone is not None:
        try:
            value.astimezone(zone)
        except OverflowError:
            raise InvalidInput(field, f"{value.isoformat()} falls outside years 1-9999 in {zone}, "
                                      "the zone rows are rendered in") from None
    return value


_MAX_DEPTH = 200  # orjson's own limit is 254; fail with our message first


def _json_problem(value: Any, depth: int = 0) -> str | None:
    """What makes value unfit for jsonb, or None: one pass, exact JSON types only, so what is read back is what was written."""
    if value is None or value is True or value is False or isinstance(value, int):
        return None
    if isinstance(value, str):
        return "contains a NUL character, which PostgreSQL jsonb rejects" if "\x00" in value else None
    if isinstance(value, float):
        return None if math.isfinite(value) else "contains NaN or infinity, which JSON cannot represent"
    if depth >= _MAX_DEPTH:
        return f"nested deeper than {_MAX_DEPTH} levels"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"has a non-string object key {key!r}"
            if "\x00" in key:
                return "contains a NUL character, which PostgreSQL jsonb rejects"
            problem = _json_problem(item, depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, (list, tuple)):
        for item in value:
            problem = _json_problem(item, depth + 1)
            if problem:
                return problem
        return None
    return f"not JSON: a {type(value).__name__} value"


def result_json(value: object, max_bytes: int) -> str:
    """A JSON object that PostgreSQL jsonb can hold exactly; returns its text for the INSERT."""
    if not isinstance(value, dict):
        raise InvalidInput("result_json", f"expected a dict (a JSON object), got {type(value).__name__}")
    problem = _json_problem(value)
    if problem:
        raise InvalidInput("result_json", problem)
    try:
        encoded = orjson.dumps(value)
    except TypeError as exc:  # ints over 64 bits
        raise InvalidInput("result_json", f"not JSON: {exc}") from exc
    if len(encoded) > max_bytes:
        raise InvalidInput("result_json", f"{len(encoded)} bytes encoded, over the limit of {max_bytes}")
    return encoded.decode()


def target_ids(value: object, limits: Limits) -> list[str]:
    """A list/tuple of target ids, deduplicated in order (a str is not a list of ids)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidInput("target_ids", f"expected a list of str, got {type(value).__name__}")
    out: dict[str, None] = {}
    for item in value:
        out[name("target_ids[]", item, limits.max_target_id_length)] = None
        if len(out) > limits.max_many:
            raise InvalidInput("target_ids", f"more than {limits.max_many} ids")
    return list(out)


def cache_options(windows: dict[str, Any], given: Iterable[str], known: Iterable[str]) -> None:
    """Refuse a cache's non-positive time windows and unknown options at construction (ConfigurationError)."""
    for option, value in windows.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0.001:
            raise ConfigurationError(f"{option}: expected seconds > 0.001, got {value!r}")
    unknown = set(given) - set(known)
    if unknown:
        raise ConfigurationError(f"unknown option(s): {', '.join(sorted(unknown))}")
