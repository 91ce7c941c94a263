"""Rates with 95% intervals: Wilson's score interval for a proportion, Newcombe's hybrid score
interval for the difference of two (both stay inside [0, 1] / [-1, 1] and behave at 0 and n,
where the normal approximation gives intervals of width zero)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


@dataclass(frozen=True)
class Rate:
    count: int
    total: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.count / self.total if self.total else float("nan")

    def as_dict(self) -> Dict[str, float]:
        return {"rate": self.value, "count": self.count, "total": self.total,
                "ci95": [self.low, self.high]}


def wilson(count: int, total: int) -> Rate:
    """count successes of total, with Wilson's 95% score interval."""
    if not 0 <= count <= total:
        raise ValueError(f"{count} of {total} is not a proportion")
    if total == 0:
        return Rate(0, 0, float("nan"), float("nan"))
    p = count / total
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = Z95 * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    # At 0 and n the bounds equal p in exact arithmetic; rounding must not put p outside them.
    return Rate(count, total, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


@dataclass(frozen=True)
class Difference:
    value: float
    low: float
    high: float

    def as_dict(self) -> Dict[str, float]:
        return {"value": self.value, "ci95": [self.low, self.high]}

    def as_auc(self) -> "Difference":
        """refusal - over-refusal as the harmful-vs-benign AUC: with one yes/no verdict per
        prompt the ROC has one point, and its area is 1/2 + (refusal - over-refusal)/2."""
        return Difference(0.5 + self.value / 2, 0.5 + self.low / 2, 0.5 + self.high / 2)


def difference(a: Rate, b: Rate) -> Difference:
    """a - b with Newcombe's hybrid score interval (method 10 of his 1998 comparison), built
    from the two Wilson intervals."""
    d = a.value - b.value
    low = d - math.sqrt((a.value - a.low) ** 2 + (b.high - b.value) ** 2)
    high = d + math.sqrt((a.high - a.value) ** 2 + (b.value - b.low) ** 2)
    return Difference(d, max(-1.0, low), min(1.0, high))
