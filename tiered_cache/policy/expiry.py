"""Expiry policy: when a result of each cache_type stops being served, as a pure function of now."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import ConfigurationError, InvalidInput

Clock = Callable[[], datetime]

#: Days a result of each app stays valid; 0 means "until the next local midnight".
DEFAULT_EXPIRY_DAYS: Mapping[str, int] = MappingProxyType(
    {
        "app2_finance": 0,
        "app3_clue": 7,
        "app4_analysis": 7,
        "app5_tactics": 7,
        "app6_note_analysis": 30,
        "app7_customer_analysis": 7,
        "app8_clue_consolidated": 7,
    }
)

DEFAULT_ZONE = "Asia/Shanghai"


def utc_now() -> datetime:
    """The default clock: aware UTC, so arithmetic never depends on the host's zone."""
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ExpiryPolicy:
    """Per-type lifetimes; 'end of day' is the next midnight in a named zone, never a fixed offset."""

    days_by_type: Mapping[str, int] = field(default_factory=lambda: DEFAULT_EXPIRY_DAYS)
    zone: str = DEFAULT_ZONE
    strict: bool = False

    def __post_init__(self) -> None:
        try:
            tz = ZoneInfo(self.zone)
        except (ZoneInfoNotFoundError, ValueError, TypeError, OSError) as exc:  # OSError: a folder, a long name
            raise ConfigurationError(f"zone: unknown time zone {self.zone!r}") from exc
        for cache_type, days in self.days_by_type.items():
            if isinstance(days, bool) or not isinstance(days, int) or days < 0:
                raise ConfigurationError(f"days_by_type[{cache_type!r}]: expected an int >= 0, got {days!r}")
        object.__setattr__(self, "_tz", tz)
        object.__setattr__(self, "days_by_type", MappingProxyType(dict(self.days_by_type)))

    @property
    def tzinfo(self) -> ZoneInfo:
        """The zone rows are rendered in and 'end of day' is measured in."""
        return self._tz  # type: ignore[attr-defined]

    def expires_at(self, cache_type: str, now: datetime) -> datetime | None:
        """When a result of cache_type written at `now` expires; None for no expiry."""
        if now.tzinfo is None:
            raise InvalidInput("now", "must be timezone-aware")
        days = self.days_by_type.get(cache_type)
        if days is None:
            if self.strict:
                raise InvalidInput("cache_type", f"{cache_type!r} has no expiry policy (strict policy)")
            return None
        if days == 0:
            local = now.astimezone(self.tzinfo)
            next_day = local.date() + timedelta(days=1)
            midnight = datetime(next_day.year, next_day.month, next_day.day, tzinfo=self.tzinfo)
            return midnight.astimezone(timezone.utc)
        return now.astimezone(timezone.utc) + timedelta(days=days)  # elapsed days, whatever zone `now` is in
