"""Whether a get_many should try the near tier: only while whole pages are being answered from it.

A page costs one Redis round trip unless every key of it is near; a page with one near miss pays that
round trip anyway, plus a near lookup for each key and a put for each key Redis answered. When the near
tier is much smaller than the keys pages ask for (the full benchmark: a working set 14x the tier),
almost no page is whole, and trying made board pages slower than Redis alone. So get_many tracks the
share of tried pages the near tier answered whole (an exponentially weighted average) and tries it only
while that share is at least `threshold`.

A closed gate still tries pages, in bursts of at least `burst` pages in a row once every `interval`
pages. A burst, not single pages, because near entries live at most near_max_age (2 s): only pages tried
close together fill the tier with a hot set and then find it whole. A burst goes on while its pages find
half their keys near or more (the tier is filling with a set that repeats), up to `max_burst` pages, so a
hot set that fits gets to whole pages and reopens the gate. A tried page of 35 keys, a quarter of them
near, costs about 0.35 ms more than a plain Redis page in the full benchmark (a lookup, an admission
test and often a put per key), so a burst whose pages did not find half their keys
near on average doubles the interval, up to `max_interval` (a burst then every 30 s or so); one that did
resets it.
Skipping the near tier is always safe: Redis and PostgreSQL are never older than it. Plain counters, no
lock: a lost update under threads only shifts the average.
"""

from __future__ import annotations


class PageGate:
    """An open/closed decision per page, learnt from how often tried pages were answered whole."""

    __slots__ = ("threshold", "burst", "max_burst", "base_interval", "max_interval", "interval", "alpha", "share",
                 "_skipped", "_burst_pages", "_burst_found", "tried", "skipped")

    def __init__(self, *, threshold: float = 0.5, burst: int = 32, max_burst: int = 512, interval: int = 2048,
                 max_interval: int = 65536, alpha: float = 1 / 32) -> None:
        self.threshold = threshold
        self.burst = burst
        self.max_burst = max_burst
        self.base_interval = interval
        self.max_interval = max_interval
        #: Pages from one burst's start to the next one's while closed: `interval`, doubled after each burst
        #: that found little near.
        self.interval = interval
        self.alpha = alpha
        #: The weighted share of tried pages answered whole by the near tier (starts hopeful).
        self.share = 1.0
        self._skipped = 0
        self._burst_pages = -1  # pages tried in the current burst; -1: no burst under way
        self._burst_found = 0.0  # the shares of its pages found near, summed, in the current burst
        self.tried = 0
        self.skipped = 0

    def try_near(self) -> bool:
        """Whether this page should look in the near tier (and store what Redis answers there)."""
        if self.share >= self.threshold or self._burst_pages >= 0:
            return True
        if self._skipped >= self.interval - self.burst:
            self._skipped = 0
            self._burst_pages, self._burst_found = 0, 0.0
            return True
        self._skipped += 1
        self.skipped += 1
        return False

    def tried_page(self, whole: bool, near_share: float = 0.0) -> None:
        """A tried page was answered whole by the near tier (True) or needed Redis (False), `near_share` of it near."""
        self.tried += 1
        self.share += self.alpha * ((1.0 if whole else 0.0) - self.share)
        if self._burst_pages < 0:
            return
        found = 1.0 if whole else near_share
        self._burst_pages += 1
        self._burst_found += found
        if self.share >= self.threshold:
            self._burst_pages, self.interval = -1, self.base_interval  # reopened
        elif (self._burst_pages >= self.burst and found < 0.5) or self._burst_pages >= self.max_burst:
            good = self._burst_found >= 0.5 * self._burst_pages  # its pages found half their keys near, on average
            self._burst_pages = -1
            self.interval = self.base_interval if good else min(self.interval * 2, self.max_interval)


class KeyGate:
    """The same decision for single-key reads (get_latest, get_history): use the near tier only while it hits.

    A near miss costs a lookup and a put, and buys nothing when a key is rarely read twice by this process
    within near_max_age: the HTTP bench's chat turns hit the near tier 5% of the time (140,000 keys, 2 s
    entries, half the traffic per worker). In the full bench's mixed profile, tried reads hit 20-25%: a hit
    saved ~130 us, but each miss cost ~45 us and each put ~25 us more than Redis alone (a cold lookup and
    put, and buffers kept out of the allocator's warm reuse), so near + Redis ran 1-5% slower than Redis.
    So a read tries the near tier only while `threshold` of tried reads hit (0.3: above that break-even);
    a closed gate skips the lookup and the put. Before each burst of `burst` tried reads (once every
    `interval` reads, 2 x warm) come `warm` reads that put without looking, so the burst meets a tier filled
    as an open one would be: `warm` is the tier's max_entries, the most an open tier holds (512 warm reads
    left Zipf chat turns, 90% near hits when open, under the threshold: the gate never reopened). A burst
    that hit less than `threshold` doubles the interval, up to `max_interval` (32 x warm: puts in 1 read of
    32). Skipping the near tier is always safe. Plain counters, no lock, as PageGate.
    """

    __slots__ = ("threshold", "burst", "warm", "base_interval", "max_interval", "interval", "alpha", "share",
                 "_skipped", "_burst_left", "_burst_hits", "tried", "skipped")

    def __init__(self, *, threshold: float = 0.3, burst: int = 256, warm: int = 10_000, interval: int | None = None,
                 max_interval: int | None = None, alpha: float = 1 / 64) -> None:
        self.threshold = threshold
        self.burst = burst
        self.warm = warm
        interval = 2 * warm if interval is None else interval
        self.base_interval = interval
        self.max_interval = 32 * warm if max_interval is None else max_interval
        #: Reads from one burst's end to the next one's start while closed (the last `warm` of them put).
        self.interval = interval
        self.alpha = alpha
        #: The weighted share of tried reads the near tier answered (starts hopeful).
        self.share = 1.0
        self._skipped = 0
        self._burst_left = 0
        self._burst_hits = 0
        self.tried = 0
        self.skipped = 0

    def try_near(self) -> bool:
        """Whether this read should look in the near tier first (if not, ask `filling` about the put)."""
        if self.share >= self.threshold or self._burst_left > 0:
            return True
        self._skipped += 1
        if self._skipped >= self.interval:
            self._skipped, self._burst_left, self._burst_hits = 0, self.burst, 0
            return True
        self.skipped += 1
        return False

    @property
    def filling(self) -> bool:
        """Whether a read that did not look should still store what Redis answers: only just before a burst."""
        return self._skipped >= self.interval - self.warm or self.share >= self.threshold or self._burst_left > 0

    def tried_read(self, hit: bool) -> None:
        """A tried read was answered by the near tier (True) or went on to Redis (False)."""
        self.tried += 1
        self.share += self.alpha * ((1.0 if hit else 0.0) - self.share)
        if self._burst_left <= 0:
            return
        self._burst_left -= 1
        self._burst_hits += hit
        if self.share >= self.threshold:
            self._burst_left, self.interval = 0, self.base_interval  # reopened
        elif self._burst_left == 0:
            good = self._burst_hits >= self.threshold * self.burst
            self.interval = self.base_interval if good else min(self.interval * 2, self.max_interval)
