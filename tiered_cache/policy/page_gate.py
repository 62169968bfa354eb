"""Whether a get_many should try the near tier: only while whole pages are being answered from it.

A page costs one Redis round trip unless every key of it is near; a page with one near miss pays that
round trip anyway, plus a near lookup for each key and a put for each key Redis answered. When the near
tier is much smaller than the keys pages ask for (the full benchmark: a working set 14x the tier),
almost no page is whole, and trying made board pages slower than Redis alone. So get_many tracks the
share of tried pages the near tier answered whole (an exponentially weighted average) and tries it only
while that share is at least `threshold`.

A closed gate still tries pages, in bursts: `burst` pages in a row once every `interval` pages. A burst,
not single pages, because near entries live at most near_max_age (2 s): only pages tried close together
fill the tier with a hot set and then find it whole, so a burst answers "would pages be whole if the gate
were open?" and reopens it when a hot set comes to fit. Tried pages cost about 1 ms each in the full
benchmark (one page in 32 tried made board pages 7% slower), so a burst that finds less than half of
every page near doubles the interval, up to `max_interval`; one that does better resets it.
Skipping the near tier is always safe: Redis and PostgreSQL are never older than it. Plain counters, no
lock: a lost update under threads only shifts the average.
"""

from __future__ import annotations


class PageGate:
    """An open/closed decision per page, learnt from how often tried pages were answered whole."""

    __slots__ = ("threshold", "burst", "base_interval", "max_interval", "interval", "alpha", "share",
                 "_skipped", "_burst_left", "_burst_best", "tried", "skipped")

    def __init__(self, *, threshold: float = 0.5, burst: int = 32, interval: int = 1024,
                 max_interval: int = 32768, alpha: float = 1 / 32) -> None:
        self.threshold = threshold
        self.burst = burst
        self.base_interval = interval
        self.max_interval = max_interval
        #: Pages between the starts of two bursts while closed: `interval`, doubled after each burst that found little.
        self.interval = interval
        self.alpha = alpha
        #: The weighted share of tried pages answered whole by the near tier (starts hopeful).
        self.share = 1.0
        self._skipped = 0
        self._burst_left = 0  # pages of the current burst still to try
        self._burst_best = 0.0  # the largest share of a page found near in the current burst
        self.tried = 0
        self.skipped = 0

    def try_near(self) -> bool:
        """Whether this page should look in the near tier (and store what Redis answers there)."""
        if self.share >= self.threshold or self._burst_left > 0:
            return True
        if self._skipped >= self.interval - self.burst:
            self._skipped = 0
            self._burst_left, self._burst_best = self.burst, 0.0
            return True
        self._skipped += 1
        self.skipped += 1
        return False

    def tried_page(self, whole: bool, near_share: float = 0.0) -> None:
        """A tried page was answered whole by the near tier (True) or needed Redis (False), `near_share` of it near."""
        self.tried += 1
        self.share += self.alpha * ((1.0 if whole else 0.0) - self.share)
        if self._burst_left <= 0:
            return
        self._burst_left -= 1
        self._burst_best = max(self._burst_best, 1.0 if whole else near_share)
        if self.share >= self.threshold:
            self._burst_left, self.interval = 0, self.base_interval  # reopened
        elif self._burst_left == 0:
            good = self._burst_best >= 0.5
            self.interval = self.base_interval if good else min(self.interval * 2, self.max_interval)
