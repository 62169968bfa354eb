"""TinyLFU admission for the near tier: a new key displaces the LRU victim only if it is asked for more often.

A near tier smaller than the working set (Zipf traffic over many keys) otherwise pays a put and an
eviction on every miss, and evicts hot keys for keys never read again. Frequencies are estimated by a
count-min sketch of 4-bit counters behind a doorkeeper (a key's first sighting only marks it there), and
halved every `sample` recorded accesses so the estimate follows what is popular now (Einziger, Friedman
and Manes, "TinyLFU", 2017; the policy Caffeine uses). All state is a few bytearrays: about 4 bytes per
entry of the tier. Not thread-safe on its own: the near tier calls it under its lock, or accepts the
approximate counts of unlocked increments on its read path.
"""

from __future__ import annotations

from collections.abc import Iterable

_MAX = 15  # 4-bit counters, kept one per byte so halving is one bytes.translate
_HALVE = bytes(i >> 1 for i in range(256))
_ROWS = 4


class TinyLFU:
    """Frequency estimates of recently asked keys, and the admission decision built on them."""

    __slots__ = ("_mask", "_rows", "_door", "_door_bits", "_sample", "_recorded", "resets")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        width = 1 << max(4, (capacity - 1).bit_length())  # a power of two >= capacity
        self._mask = width - 1
        self._rows = [bytearray(width) for _ in range(_ROWS)]
        self._door_bits = width * 4 - 1  # the doorkeeper: one bit-array slot per hash, 4x the width
        self._door = bytearray((width * 4) // 8 + 1)
        self._sample = 10 * capacity
        self._recorded = 0
        #: How many times the counts were halved (for tests and stats).
        self.resets = 0

    @staticmethod
    def _spread(h: int) -> int:
        """A 64-bit mix of Python's (cached) str hash, so the four row indexes are independent enough."""
        h = (h * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        return h ^ (h >> 29)

    def record(self, key: str) -> None:
        """Note one access of key (a get, hit or miss)."""
        self.record_many((key,))

    def record_many(self, keys: Iterable[str]) -> None:
        """Note one access of each key (a page's lookups: one call, the state held in locals)."""
        door, bits, mask = self._door, self._door_bits, self._mask
        r0, r1, r2, r3 = self._rows  # halving rewrites them in place: these stay the rows
        for key in keys:
            h = (hash(key) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF  # as _spread
            h ^= h >> 29
            bit = (h >> 11) & bits
            if not door[bit >> 3] & (1 << (bit & 7)):
                door[bit >> 3] |= 1 << (bit & 7)  # first sighting since the last reset: the doorkeeper only
            else:
                step = (h >> 32) | 1  # double hashing: four indexes of any width from one 64-bit hash
                i0, i1, i2, i3 = h & mask, (h + step) & mask, (h + 2 * step) & mask, (h + 3 * step) & mask
                # Conservative update: raise only the counters at the current minimum.
                low = min(r0[i0], r1[i1], r2[i2], r3[i3])
                if low < _MAX:
                    if r0[i0] == low:
                        r0[i0] = low + 1
                    if r1[i1] == low:
                        r1[i1] = low + 1
                    if r2[i2] == low:
                        r2[i2] = low + 1
                    if r3[i3] == low:
                        r3[i3] = low + 1
            self._recorded += 1
            if self._recorded >= self._sample:
                self._reset()

    def frequency(self, key: str) -> int:
        """Estimated accesses of key since about the last reset (never an underestimate but for halving)."""
        h = self._spread(hash(key))
        bit = (h >> 11) & self._door_bits
        if not self._door[bit >> 3] & (1 << (bit & 7)):
            return 0
        mask = self._mask
        r0, r1, r2, r3 = self._rows
        step = (h >> 32) | 1
        return 1 + min(r0[h & mask], r1[(h + step) & mask], r2[(h + 2 * step) & mask], r3[(h + 3 * step) & mask])

    def admit(self, candidate: str, victim: str) -> bool:
        """Whether candidate should take victim's place: only if it is asked for more often."""
        return self.frequency(candidate) > self.frequency(victim)

    def _reset(self) -> None:
        """Halve every count and forget the doorkeeper: old popularity fades."""
        for row in self._rows:
            row[:] = row.translate(_HALVE)
        self._door[:] = bytes(len(self._door))
        self._recorded //= 2
        self.resets += 1
