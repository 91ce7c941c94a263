"""λ sweeps in one pass: the paper's central experiment, w_d = λ and w_a = 1 - λ for several λ.

One pass over the inputs writes one model per λ: each chunk of the three inputs is read once and
merged K times, (3 + K) N bytes moved instead of 4 K N for K separate merges.  Every output is
bit-for-bit the single merge with the same weights, and keeps every guarantee of one (checks
first, its own partial folder, journal, manifest, atomic rename).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import List, Sequence

from ..errors import PlanError
from ..units import PathLike
from . import MergeOptions, MergePlan, plan_merge
from ..sources import pending_download_bytes
from .output import disk_problems, output_files, output_needs


def lambda_label(lam: float) -> str:
    """The shortest text that reads back as exactly λ ('0.5', '1', '0.1234561'): two different
    λ never share a folder."""
    short = f"{lam:g}"
    return short if float(short) == lam else repr(float(lam))


def lambda_folder(out_root: Path, lam: float) -> Path:
    return out_root / f"lambda-{lambda_label(lam)}"


def parse_lambdas(text: str) -> List[float]:
    """'0,0.25,0.5' -> [0.0, 0.25, 0.5]; ValueError naming the bad item."""
    values = []
    for item in text.split(","):
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"--lambdas: {item.strip()!r} is not a number") from None
    if len(set(values)) != len(values):
        raise ValueError("--lambdas: a value appears twice")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"--lambdas: {bad[0]} is not a finite number")
    return values


def plan_sweep(base: PathLike, domain: PathLike, aligned: PathLike, out_root: PathLike,
               lambdas: Sequence[float], options: MergeOptions) -> List[MergePlan]:
    """One checked plan per λ (w_d = λ, w_a = 1 - λ, and t = λ for the SLERP family: every
    method's "how far toward the domain expert"), the disk checked for all of them."""
    out_root = Path(out_root)
    if not lambdas:
        raise PlanError(["give at least one λ"])
    labels = [lambda_label(lam) for lam in lambdas]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise PlanError([f"λ {', '.join(twice)} appears twice: each λ is merged once"])
    plans = []
    for lam in lambdas:
        # 1 - λ rounded to 12 digits: 1 - 0.7 must be the 0.3 a user would type for one merge.
        method = options.method
        if "t" in method.spec.parameters:  # the SLERP family: t is how far toward the domain
            method = replace(method, t=lam)
        one = replace(options, domain_weight=lam, align_weight=round(1.0 - lam, 12),
                      method=method)
        plans.append(plan_merge(base, domain, aligned, lambda_folder(out_root, lam), one))
    needed = sum(output_needs(p) for p in plans)  # (a finished λ needs nothing more)
    problems = disk_problems(lambda_folder(out_root, lambdas[0]), needed,
                             pending_download_bytes(plans[0].files_read()),
                             sum(output_files(p) for p in plans if not p.complete))
    if problems:
        raise PlanError(problems)
    return plans
