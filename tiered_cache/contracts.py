"""Contracts shared by every layer: the key type and the sentinels a tier answers with."""

from __future__ import annotations

from typing import Any, Final

#: (cache_type, site_id, target_id): what a cached result is looked up by.
Key = tuple[str, int, str]
#: A row as the old service returned it.
Row = dict[str, Any]


class _Sentinel:
    """A named singleton, so a cached None (a negative entry) and 'nothing cached' never mix."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __bool__(self) -> bool:
        return False


#: The tier holds nothing for this key; the caller may fill it.
MISS: Final = _Sentinel("MISS")
#: The tier failed or is switched off by its breaker; the caller must not fill it.
DOWN: Final = _Sentinel("DOWN")
