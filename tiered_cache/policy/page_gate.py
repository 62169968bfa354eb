"""Whether a get_many should try the near tier: only while whole pages are being answered from it.

A page costs one Redis round trip unless every key of it is near; a page with one near miss pays that
round trip anyway, plus a near lookup for each key and a put for each key Redis answered. When the near
tier is much smaller than the keys pages ask for (the full benchmark: a working set 14x the tier),
almost no page is whole, and trying made board pages slower than Redis alone. So get_many tracks the
share of tried pages the near tier answered whole (an exponentially weighted average) and tries it only
while that share is at least `threshold`; otherwise one page in `sample` still tries, so the gate opens
again when the hot set comes to fit. A tried page costs a lookup and a put per key (about 20 us a key in
the full benchmark: one sampled page in 32 cost board pages 7%), so while sampled pages find less than
half their keys near, the interval doubles, up to `max_sample`; a page that finds half or more resets it.
Skipping the near tier is always safe: Redis and PostgreSQL are
never older than it. Plain counters, no lock: a lost update under threads only shifts the average.
"""

from __future__ import annotations


class PageGate:
    """An open/closed decision per page, learnt from how often tried pages were answered whole."""

    __slots__ = ("threshold", "sample", "max_sample", "interval", "alpha", "share", "_skipped", "tried", "skipped")

    def __init__(self, *, threshold: float = 0.5, sample: int = 32, max_sample: int = 1024,
                 alpha: float = 1 / 32) -> None:
        self.threshold = threshold
        self.sample = sample
        self.max_sample = max_sample
        #: One closed page in `interval` still tries: `sample`, doubled while sampled pages find little near.
        self.interval = sample
        self.alpha = alpha
        #: The weighted share of tried pages answered whole by the near tier (starts hopeful).
        self.share = 1.0
        self._skipped = 0
        self.tried = 0
        self.skipped = 0

    def try_near(self) -> bool:
        """Whether this page should look in the near tier (and store what Redis answers there)."""
        if self.share >= self.threshold:
            return True
        self._skipped += 1
        if self._skipped >= self.interval:
            self._skipped = 0
            return True
        self.skipped += 1
        return False

    def tried_page(self, whole: bool, near_share: float = 0.0) -> None:
        """A tried page was answered whole by the near tier (True) or needed Redis (False), `near_share` of it near."""
        self.tried += 1
        closed = self.share < self.threshold
        self.share += self.alpha * ((1.0 if whole else 0.0) - self.share)
        if whole or near_share >= 0.5:
            self.interval = self.sample
        elif closed:
            self.interval = min(self.interval * 2, self.max_sample)
