"""Exact order statistics of a tensor-sized stream of uint32 keys in bounded memory: the value
of given ranks, found by two 16-bit histogram passes instead of a sort (SCE's top-k threshold,
Arcee Fusion's quartiles).

Keys are compared as unsigned integers; `sortable_bits` maps fp32 values to keys in the order
of the values (negative ones included; a NaN sorts above +inf, or below -inf with its sign
bit set).  The first pass histograms each key's top 16 bits, which names the bin holding each
wanted rank; the second histograms the low 16 bits of the keys in those bins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Sequence

import numpy as np

HIGH, LOW = 16, 16
_BINS = 1 << 16


@dataclass(frozen=True)
class Ranked:
    """The key at a rank (0-based, ascending), how many keys are below it and how many equal."""

    key: int
    below: int
    equal: int


def sortable_bits(x: np.ndarray) -> np.ndarray:
    """fp32 values as uint32 keys in the values' order (-0 just below +0)."""
    bits = x.view(np.uint32)
    negative = (bits >> np.uint32(31)).astype(bool)
    return np.where(negative, ~bits, bits | np.uint32(0x80000000))


def value_of(key: int) -> np.float32:
    """The fp32 value of a sortable_bits key."""
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


class OrderStatistics:
    """The keys of a stream `keys()` (a fresh iterator each call, the same keys in the same
    order): the first pass (here) counts them by their top 16 bits; `at` finds ranks."""

    def __init__(self, keys: Callable[[], Iterator[np.ndarray]]):
        self.keys = keys
        self.high = np.zeros(_BINS, dtype=np.int64)
        self.zeros = 0  # keys equal to 0
        for k in keys():
            self.high += np.bincount(k >> np.uint32(LOW), minlength=_BINS)
            self.zeros += int(k.size - np.count_nonzero(k))
        self.total = int(self.high.sum())

    def at(self, ranks: Sequence[int]) -> List[Ranked]:
        """The keys at `ranks` (each 0 <= rank < total): one more pass."""
        below_bin = np.concatenate(([0], np.cumsum(self.high)))  # keys before each bin
        bins = [int(np.searchsorted(below_bin, r, side="right")) - 1 for r in ranks]
        low = {b: np.zeros(_BINS, dtype=np.int64) for b in sorted(set(bins))}
        for k in self.keys():
            top = k >> np.uint32(LOW)
            for b, histogram in low.items():
                histogram += np.bincount(k[top == b] & np.uint32(_BINS - 1), minlength=_BINS)
        found = []
        for r, b in zip(ranks, bins):
            below_low = np.concatenate(([0], np.cumsum(low[b])))
            value = int(np.searchsorted(below_low, r - int(below_bin[b]), side="right")) - 1
            found.append(Ranked(key=(b << LOW) | value,
                                below=int(below_bin[b] + below_low[value]),
                                equal=int(low[b][value])))
        return found
