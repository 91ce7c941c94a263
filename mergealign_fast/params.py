"""Merge parameters shared by the tensor API and the checkpoint engine."""

from __future__ import annotations

import math
import os


def default_threads() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def check_weights(w_domain: float, w_align: float) -> None:
    for label, value in (("domain weight", w_domain), ("align weight", w_align)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise ValueError(f"{label} must be a finite real number (got {value!r})")
