"""Generalized task arithmetic's last step in numpy, for the methods merged in windows (DELLA,
consensus): the weighted terms summed — with TIES' sign election, the terms of the elected sign
only — and, with normalize, divided by the weights that took part."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, TYPE_CHECKING

import numpy as np

from ..core.recipes import DIVISOR_EPS, RESCALE_EPS
from .per_vector import quiet, task_vectors, workspace

if TYPE_CHECKING:  # annotations only: the settings module reads the registry
    from ..core.settings import TensorSettings


def combined(s: TensorSettings, terms: List[np.ndarray]) -> np.ndarray:
    """Σ terms (fp32, in model order), or with s.sign_election the sum of the terms whose sign
    is that of Σ terms (+ when 0; a zero has no sign), ÷ their weights (0: 1) when normalized;
    without election ÷ Σ w (unless |Σ w| < DIVISOR_EPS).  In the workspace: valid until the
    next call."""
    f32, count = np.float32, terms[0].size
    total, divisor = (workspace.get(name, count, f32) for name in ("total", "divisor"))
    with quiet():
        total[:] = 0.0
        for term in terms:
            total += term
        if s.sign_election:
            negative = total < 0  # the elected sign: + unless the sum is negative
            total[:] = 0.0
            divisor[:] = 0.0
            for term, weight in zip(terms, s.weights):
                agrees = ((term < 0) == negative) & (term != 0)
                total += term * agrees
                divisor += agrees * f32(weight)
            divisor[divisor == 0] = 1.0
        else:
            summed = sum(s.weights)
            divisor[:] = summed if abs(summed) >= DIVISOR_EPS else 1.0
        if s.normalize:
            total /= divisor
    return total


def l1_rescales(windows, models: int, rescaled: Sequence[int],
                kept: Callable[[int, int, np.ndarray], Optional[np.ndarray]]) -> np.ndarray:
    """Each model's l1 rescale Σ|τ| / Σ|kept τ| over the tensor, in float64 in index order, for
    the models in `rescaled` (1 for the others, or where either sum is below RESCALE_EPS);
    kept(m, start, τ) is model m's keep mask of a window (None: all kept)."""
    factors = np.ones(models)
    before, after = np.zeros(models), np.zeros(models)
    for chunk in windows() if rescaled else ():
        _, taus = task_vectors(chunk)
        for m in rescaled:
            magnitude = np.abs(taus[m], dtype=np.float64)
            keep = kept(m, chunk.start, taus[m])
            before[m] += float(magnitude.sum())
            after[m] += float(magnitude.sum() if keep is None
                              else np.add.reduce(magnitude, where=keep))
        chunk.release_inputs()
    for m in rescaled:
        if before[m] >= RESCALE_EPS and after[m] >= RESCALE_EPS:
            factors[m] = before[m] / after[m]
    return factors
