"""SCE (select, calculate, erase; mergekit's `sce`, arXiv 2408.07990) over a base and any number
of models, window by window in numpy on the CPU path.

For τ_m = model_m - base, per tensor:
  select    with select_topk < 1, keep the k = int(nonzero · select_topk) elements whose
            variance across the τ_m (population variance) is largest, zero the rest in every
            τ_m (mergekit's top-k; ties at the threshold are kept in index order here);
  calculate each model's weight w_m = mean(τ_m²) / Σ_m mean(τ_m²) (1/n when that sum is
            below 1e-6);
  erase     per element, the sign of Σ_m τ_m elects; a τ_m counts where its sign is that sign
            (a zero never counts);
  merged    base + Σ_m w_m·e_m·τ_m / max(Σ_m w_m·e_m, 1e-6).

The threshold of the selection is found exactly with bounded memory by two histogram passes
over each element's variance (order_stats.py; fp32 bits order non-negative floats).  A third
sums Σ τ_m² of the kept elements.
The merge pass computes each window in fp32 (τ, the erase, the weighted sum, the division) and
hands the result to the kernel as the one non-zero input of a linear merge, which rounds it to
the output dtype once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Sequence, TYPE_CHECKING

import numpy as np

from .order_stats import OrderStatistics
from .per_vector import quiet, result_chunk, task_vectors, workspace
from ...io.stream import Chunk

if TYPE_CHECKING:  # annotations only: the settings module reads the registry
    from ..core.settings import TensorSettings

SCE_WEIGHT_EPS = 1e-6  # mergekit's: weights summing below it are uniform
SCE_DIVISOR_EPS = 1e-6  # mergekit's clamp of the erased weights' sum

WINDOW_ELEMENTS = 1 << 20  # n + 4 fp32 arrays and a few more of this size at once


@dataclass
class Selection:
    """Which elements the select step keeps: variance bits above `bits`, and of those equal
    to it the first `ties` in index order (keep_all: select_topk >= 1)."""

    keep_all: bool
    bits: int = 0
    ties: int = 0


def _task_vectors(chunk: Chunk) -> List[np.ndarray]:
    return task_vectors(chunk)[1]


def _variance_bits(taus: List[np.ndarray]) -> np.ndarray:
    """Population variance across the models per element, as fp32 bits: the mean, then the
    mean of squared deviations, each summed in model order in fp32 (as torch.var of fp32
    values; mergekit's selection compares these).  Squares are never negative, so the bits
    order the values; a NaN sorts above every number, as in torch.topk.  In the workspace:
    valid until the next call."""
    count = taus[0].size
    mean, var, deviation = (workspace.get(name, count, np.float32)
                            for name in ("mean", "var", "deviation"))
    with quiet():
        np.copyto(mean, taus[0])
        for tau in taus[1:]:
            mean += tau
        mean /= np.float32(len(taus))
        var[:] = 0.0
        for tau in taus:
            np.subtract(tau, mean, out=deviation)
            np.multiply(deviation, deviation, out=deviation)
            var += deviation
        var /= np.float32(len(taus))
    return var.view(np.uint32)


def select(s: TensorSettings, windows) -> Selection:
    """The selection's threshold: the k-th largest variance, by two histogram passes over the
    windows (a callable giving a fresh window stream each time)."""
    if s.select_topk >= 1.0:
        return Selection(keep_all=True)

    def keys():
        for chunk in windows():
            yield _variance_bits(_task_vectors(chunk))
            chunk.release_inputs()

    variances = OrderStatistics(keys)
    k = int((variances.total - variances.zeros) * s.select_topk) if s.select_topk > 0 else 0
    if k == 0:
        return Selection(keep_all=False, bits=0xFFFFFFFF, ties=0)  # nothing kept
    kth = variances.at([variances.total - k])[0]
    greater = variances.total - kth.below - kth.equal
    return Selection(keep_all=False, bits=kth.key, ties=k - greater)


class Mask:
    """The select step's keep mask window by window; ties at the threshold counted in index
    order across the windows (windows come in order)."""

    def __init__(self, selection: Selection):
        self.selection = selection
        self.ties_left = selection.ties

    def __call__(self, taus: List[np.ndarray]) -> np.ndarray:
        if self.selection.keep_all:
            return np.ones(taus[0].shape, dtype=bool)
        bits = _variance_bits(taus)
        keep = bits > self.selection.bits
        tie = np.flatnonzero(bits == self.selection.bits)
        kept_ties = tie[:max(0, self.ties_left)]
        keep[kept_ties] = True
        self.ties_left -= len(kept_ties)
        return keep


def weights(selection: Selection, windows, model_count: int, count: int) -> np.ndarray:
    """w_m = mean(τ_m²) over the kept elements (the others are zero), normalized."""
    squares = np.zeros(model_count)
    mask = Mask(selection)
    for chunk in windows():
        taus = _task_vectors(chunk)
        keep = mask(taus)
        for m, tau in enumerate(taus):  # float64 squares (exact), summed where kept
            squares[m] += float(np.add.reduce(np.square(tau, dtype=np.float64), where=keep))
        chunk.release_inputs()
    means = squares / max(count, 1)
    total = float(means.sum())
    if abs(total) < SCE_WEIGHT_EPS:
        return np.full(model_count, 1.0 / model_count)
    return means / total


def merged_chunk(mask: Mask, w: np.ndarray, chunk: Chunk) -> Chunk:
    """The chunk holding the merged window (per_vector.result_chunk)."""
    f32, count = np.float32, chunk.count
    base, taus = task_vectors(chunk)
    merged = workspace.get("merged", count, f32)
    np.copyto(merged, base)
    keep = mask(taus)
    numerator, divisor, term = (workspace.get(name, count, f32)
                                for name in ("numerator", "divisor", "term"))
    with quiet():
        for tau in taus:
            tau *= keep  # the unselected elements: zero in every τ
        total = np.add.reduce(taus, dtype=f32) if len(taus) > 1 else taus[0]
        negative = total < 0  # the elected sign: + unless the sum is negative
        numerator[:] = 0.0
        divisor[:] = 0.0
        for tau, weight in zip(taus, w.astype(f32)):
            counts = (tau < 0) == negative  # its sign is the elected one: a zero has none
            counts &= tau != 0
            np.multiply(tau, weight, out=term)
            term *= counts
            numerator += term
            divisor += counts * weight
        np.maximum(divisor, f32(SCE_DIVISOR_EPS), out=divisor)
        numerator /= divisor
        merged += numerator
    return result_chunk(chunk, merged)


def window_elements(shape: Sequence[int]) -> int:
    return WINDOW_ELEMENTS


def merge_chunks(s: TensorSettings, tensor, windows) -> Iterator[Chunk]:
    """The merged windows of `tensor` (a PlannedTensor), after the select and calculate
    passes."""
    selection = select(s, windows)
    w = weights(selection, windows, len(tensor.sources) - 1, tensor.count)
    mask = Mask(selection)
    for chunk in windows(placed=True):
        yield merged_chunk(mask, w, chunk)


def reference(select_topk: float, base: np.ndarray, models: Sequence[np.ndarray]) -> np.ndarray:
    """SCE in float64 on whole flat arrays, written from the method's statement (for tests):
    a stable sort picks the top-k variances, ties in index order."""
    taus = np.stack([np.asarray(m, np.float64) - base for m in models])
    if select_topk < 1:
        f32 = taus.astype(np.float32)  # the τ are fp32 values; their variance as merged:
        mean = f32.sum(axis=0, dtype=np.float32) / np.float32(len(f32))  # fp32, in order
        var = (((f32 - mean) ** 2).sum(axis=0, dtype=np.float32)
               / np.float32(len(f32))).astype(np.float64)
        k = int(np.count_nonzero(var) * select_topk) if select_topk > 0 else 0
        keep = np.zeros(var.shape, dtype=bool)
        keep[np.argsort(-var, kind="stable")[:k]] = True
        taus = taus * keep
    means = (taus ** 2).sum(axis=1) / max(taus.shape[1], 1)
    w = means / means.sum() if abs(means.sum()) >= SCE_WEIGHT_EPS else \
        np.full(len(taus), 1.0 / len(taus))
    elected = np.where(taus.sum(axis=0) >= 0, 1.0, -1.0)
    counts = np.sign(taus) == elected
    numerator = (taus * w[:, None] * counts).sum(axis=0)
    divisor = np.maximum((w[:, None] * counts).sum(axis=0), SCE_DIVISOR_EPS)
    return base + numerator / divisor
