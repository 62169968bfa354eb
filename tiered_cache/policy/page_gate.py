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


class _Gate:
    """What both gates learn: the weighted share of tried reads the near tier answered, and the burst schedule."""

    __slots__ = ("threshold", "burst", "base_interval", "max_interval", "interval", "alpha", "share", "_skipped",
                 "tried", "skipped")

    def __init__(self, threshold: float, burst: int, interval: int, max_interval: int, alpha: float) -> None:
        self.threshold = threshold
        self.burst = burst
        self.base_interval = interval
        self.max_interval = max_interval
        #: Reads from one burst's start to the next one's while closed: `interval`, doubled after each burst
        #: that found little near.
        self.interval = interval
        self.alpha = alpha
        #: The weighted share of tried reads (pages, for PageGate: whole ones) the near tier answered (starts hopeful).
        self.share = 1.0
        self._skipped = 0
        self.tried = 0
        self.skipped = 0


class PageGate(_Gate):
    """An open/closed decision per page, learnt from how often tried pages were answered whole."""

    __slots__ = ("max_burst", "_burst_pages", "_burst_found")

    def __init__(self, *, threshold: float = 0.5, burst: int = 32, max_burst: int = 512, interval: int = 2048,
                 max_interval: int = 65536, alpha: float = 1 / 32) -> None:
        super().__init__(threshold, burst, interval, max_interval, alpha)
        self.max_burst = max_burst
        self._burst_pages = -1  # pages tried in the current burst; -1: no burst under way
        self._burst_found = 0.0  # the shares of its pages found near, summed, in the current burst

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


class KeyGate(_Gate):
    """The same decision for single-key reads (get_latest, get_history): try the near tier only while it hits.

    A near miss costs a lookup and a put, and buys nothing when a key is rarely read twice by this process
    within near_max_age: the HTTP bench's chat turns hit the near tier 5% of the time (140,000 keys, 2 s
    entries, half the traffic per worker), so every chat turn paid for a tier that almost never answered.
    A closed gate skips the lookup (with its announcement poll), and the put of all but one read in
    `put_every` (`warm` says which): a key read that often within near_max_age is near when a burst comes, so
    the burst still measures what an open gate would see. (Skipping every put left the micro bench's chat
    turns, 80% near hits when open, shut out: each burst began on an emptied tier and missed. Keeping every
    put cost each skipped read of the full bench's mixed profile ~20 us, a put on a cold CPU cache.)
    A read hitting `threshold` of the time saves a Redis round trip often enough to pay for its misses. While
    closed, `burst` reads in a row try it once every `interval` reads (long enough, at a worker's pace, for the
    tier to fill with what repeats); a burst that hit less than half `threshold` doubles the interval, up to
    `max_interval`; one that hit more goes straight on into another (the tier warms during a burst, as
    every tried read stores, so its share climbs to what an open gate would see). `max_interval` is 8,192: a
    burst of 256 misses costs ~1% of the reads between two bursts, and a hot set that arrives after many
    one-off reads (the bench's chat turns after its prewarm) is found within seconds. Skipping the near tier
    is always safe. Plain counters, no lock, as PageGate.
    """

    __slots__ = ("put_every", "warm", "_burst_left", "_burst_hits")

    def __init__(self, *, threshold: float = 0.2, burst: int = 256, interval: int = 512,
                 max_interval: int = 8192, alpha: float = 1 / 64, put_every: int = 4) -> None:
        super().__init__(threshold, burst, interval, max_interval, alpha)
        self.put_every = put_every
        #: After a try_near() that said no: whether this read should still store what it finds (keeps the tier warm).
        self.warm = False
        self._burst_left = 0
        self._burst_hits = 0

    def try_near(self) -> bool:
        """Whether this read should look in the near tier first."""
        if self.share >= self.threshold or self._burst_left > 0:
            return True
        self._skipped += 1
        if self._skipped >= self.interval:
            self._skipped, self._burst_left, self._burst_hits = 0, self.burst, 0
            return True
        self.skipped += 1
        self.warm = self.skipped % self.put_every == 0
        return False

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
            # Half the threshold: a closed tier holds only the sampled puts, so a burst finds less than an
            # open gate would (the bench's chat turns: 20% in a burst, 60% once open; its mixed profile: 6%).
            if self._burst_hits >= self.threshold * self.burst / 2:
                self._burst_left, self._burst_hits = self.burst, 0  # go on, warming it (the share will tell)
                self.interval = self.base_interval
            else:
                self.interval = min(self.interval * 2, self.max_interval)
