"""Consistency check: what Redis would serve against what PostgreSQL says, over a sample of cached keys."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from .contracts import DOWN, MISS
from .facade import TieredCache
from .policy.entries import decode


@dataclass
class VerifyReport:
    """How many sampled entries agreed with PostgreSQL, and which did not."""

    sampled: int = 0
    consistent: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def share(self) -> float:
        """Consistent share of the sample (1.0 for an empty sample)."""
        return 1.0 if self.sampled == 0 else self.consistent / self.sampled

    @property
    def nines(self) -> float:
        """The share as a count of nines (inf when every entry agreed)."""
        return math.inf if self.share >= 1.0 else -math.log10(1.0 - self.share)

    def summary(self) -> str:
        nines = "all" if math.isinf(self.nines) else f"{self.nines:.2f} nines"
        return f"{self.consistent}/{self.sampled} consistent ({self.share:.6f}, {nines}); {len(self.mismatches)} mismatches"


def verify(cache: TieredCache, *, sample: int = 1000, seed: int | None = None) -> VerifyReport:
    """Compare sampled Redis entries with PostgreSQL; a mismatch is re-read once, since a write may race the check."""
    client = cache.redis.client
    entries: list[str] = []
    for key in client.scan_iter(match=cache.keys.namespace + ":e:*", count=1000):
        entries.append(key.decode() if isinstance(key, bytes) else key)
    random.Random(seed).shuffle(entries)
    report = VerifyReport()
    for entry in entries[:sample]:
        key = cache.keys.parse_entry(entry)
        first = _compare(cache, entry, key)
        if first is None:
            continue
        report.sampled += 1
        if first == ():
            report.consistent += 1
            continue
        again = _compare(cache, entry, key)
        if again is None or again == ():
            report.consistent += 1
        else:
            report.mismatches.append({"key": list(key), "redis": again[0], "postgres": again[1]})
    return report


def _compare(cache: TieredCache, entry: str, key: tuple[str, int, str]) -> Any:
    """None if the entry is gone; () if Redis and PostgreSQL agree; else (redis_row, postgres_row)."""
    raw = cache.redis.get_raw(entry)
    if raw is MISS or raw is DOWN:
        return None
    cached = decode(raw)
    truth = cache.store.get_latest(*key)
    return () if cached == truth else (cached, truth)
