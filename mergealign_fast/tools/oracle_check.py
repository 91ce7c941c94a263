"""Check a merged model folder against the float64 oracle on sampled elements."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..dtypes import DType
from ..methods.core.oracle import decode_to_f64
from ..io.checkpoint import open_checkpoint, read_elements
from ..methods.core.oracle import merge_error_bound, merge_ref


@dataclass(frozen=True)
class OracleReport:
    tensors_checked: int
    elements_checked: int
    worst_error_ratio: float  # max |out - oracle| / allowed bound; <= 1 passes
    worst_tensor: Optional[str]

    @property
    def passed(self) -> bool:
        return self.worst_error_ratio <= 1.0


def _sample(loc, start: int, count: int) -> np.ndarray:
    return decode_to_f64(read_elements(loc, start, count), DType[loc.entry.dtype])


def check_against_oracle(base: os.PathLike, domain: os.PathLike, aligned: os.PathLike,
                         out: os.PathLike, domain_weight: float, align_weight: float, *,
                         max_tensors: int = 16, elements_per_tensor: int = 65536,
                         seed: int = 0) -> OracleReport:
    """Compare up to `max_tensors` tensors (spread over the model), each on a random contiguous
    run of `elements_per_tensor` elements, with the bound from reference.merge_error_bound."""
    models = [open_checkpoint(p) for p in (base, domain, aligned)]
    merged = open_checkpoint(out)
    names = list(merged.tensors)
    picked = names[:: max(1, len(names) // max_tensors)][:max_tensors]
    rng = np.random.default_rng(seed)
    worst, worst_name, elements = 0.0, None, 0
    for name in picked:
        out_loc = merged.tensors[name]
        count = min(elements_per_tensor, out_loc.entry.count)
        start = int(rng.integers(0, out_loc.entry.count - count + 1))
        b, d, a = (_sample(m.tensors[name], start, count) for m in models)
        got = _sample(out_loc, start, count)
        bound = merge_error_bound(b, d, a, domain_weight, align_weight, DType[out_loc.entry.dtype])
        err = np.abs(got - merge_ref(b, d, a, domain_weight, align_weight))
        ratio = float(np.max(err / bound)) if count else 0.0
        if ratio > worst or worst_name is None:
            worst, worst_name = ratio, name
        elements += count
    return OracleReport(len(picked), elements, worst, worst_name)
