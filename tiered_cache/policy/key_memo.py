"""Validated keys and their Redis entry keys, remembered: a hot read costs dict lookups, not validation and formatting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..contracts import Key
from . import validation as check
from .validation import Limits

MEMO_SIZE = 1 << 16  # keys remembered (~300 B each); cleared whole when full (cheaper than LRU bookkeeping)


class KeyMemo:
    """(cache_type, site_id, target_id) -> entry key, for exact str/int/str arguments that passed validation once."""

    def __init__(self, validate_key: Callable[[object, object, object], Key],
                 validate_many: Callable[[object, object, object], tuple[str, int, list[str]]],
                 entry_key: Callable[[str, int, str], str], limits: Limits, size: int = MEMO_SIZE) -> None:
        self._validate_key, self._validate_many, self._entry_key = validate_key, validate_many, entry_key
        self._limits, self._size = limits, size
        self._memo: dict[Key, str] = {}

    def _remember(self, key: Key) -> str:
        entry = self._entry_key(*key)
        if len(self._memo) >= self._size:
            self._memo.clear()
        self._memo[key] = entry
        return entry

    def entry(self, cache_type: object, site_id: object, target_id: object) -> tuple[Key, str]:
        """The validated key and its entry key (InvalidInput names the field, before any I/O)."""
        if type(site_id) is int and type(cache_type) is str and type(target_id) is str:
            key = (cache_type, site_id, target_id)
            entry = self._memo.get(key)
            if entry is not None:
                return key, entry
        key = self._validate_key(cache_type, site_id, target_id)
        return key, self._remember(key)

    def entries(self, cache_type: object, site_id: object,
                target_ids: object) -> tuple[str, int, list[str], list[str]]:
        """get_many's validated arguments (targets deduplicated in order) and their entry keys.

        A page whose keys are all remembered costs one lookup per key; one with a few new keys validates only those
        (a remembered key proves its cache_type and site_id valid), so a memo cleared when full is refilled cheaply.
        """
        memo = self._memo
        if type(site_id) is int and type(cache_type) is str and type(target_ids) in (list, tuple):
            ids: Any = target_ids
            entries = [memo.get((cache_type, site_id, t)) if type(t) is str else None for t in ids]
            if len(entries) <= self._limits.max_many and entries.count(None) < len(entries):
                if None in entries:
                    longest = self._limits.max_target_id_length
                    for i, found in enumerate(entries):
                        if found is None:  # the same check, field name and order as validate_many's
                            target = check.name("target_ids[]", ids[i], longest)
                            entries[i] = self._remember((cache_type, site_id, target))
                if len(set(entries)) == len(entries):
                    return cache_type, site_id, list(ids), entries  # type: ignore[return-value]
                unique = dict.fromkeys(zip(ids, entries))
                return cache_type, site_id, [t for t, _ in unique], [e for _, e in unique]  # type: ignore[misc]
        ct, site, valid = self._validate_many(cache_type, site_id, target_ids)
        return ct, site, valid, [self.entry(ct, site, t)[1] for t in valid]
