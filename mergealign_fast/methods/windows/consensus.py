"""Consensus merging (methods/consensus.py; TALL masks, arXiv 2405.07813) over a base and any
number of models, window by window in numpy on the CPU path.

For τ_m = model_m - base, per tensor:
  trim      consensus_ties: each τ_m keeps its k_m = max(1, int(d_m·n)) largest |τ_m| (ties at
            the threshold in index order; d >= 1 keeps all, d <= 0 none, as TIES does), then
            with rescale l1 is scaled by Σ|τ_m| / Σ|kept τ_m| (not when either is below 1e-7)
            or with inverse_density by 1/d_m;
  merge     the terms w_m·τ̃_m make τ_MTL as generalized task arithmetic does (terms.py):
            consensus_ties elects signs and averages the agreeing terms; consensus_ta sums them;
  consensus model m's TALL mask holds an element where |τ_m| > λ·|τ_MTL − τ_m| (τ_m untrimmed
            and unweighted; strictly greater, as mergekitty compares: the paper writes >=);
            τ_MTL is kept where at least k masks hold the element;
  merged    base + τ_MTL·kept.

A trim's threshold is the exact k-th largest |τ_m|, found by two histogram passes over the fp32
bits of |τ_m| (order_stats.py: bits of non-negative floats order as the values; a NaN sorts
above every number, as in the native trim); an l1 rescale adds a pass summing Σ|τ_m| and
Σ|kept τ_m| in float64.  The merge pass computes each window in fp32 and the kernel rounds it
to the output dtype once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, TYPE_CHECKING

import numpy as np

from ..core.recipes import keep_count
from ..core.spec import KEEP_LARGEST
from .order_stats import OrderStatistics
from .per_vector import WINDOW_ELEMENTS, quiet, result_chunk, task_vectors, workspace
from .terms import combined, l1_rescales
from ...io.stream import Chunk

if TYPE_CHECKING:  # annotations only: the settings module reads the registry
    from ..core.settings import TensorSettings

# Bits no |τ| exceeds (|τ|'s are at most 0x7fffffff, a NaN): with no ties kept, none is kept.
KEEP_NONE_BITS = 0xFFFFFFFF


@dataclass(frozen=True)
class Trim:
    """Which elements of one τ the trim keeps: |τ| bits above `bits` and, of those equal to it,
    the first `ties` in index order (keep_all: untrimmed)."""

    keep_all: bool
    bits: int = 0
    ties: int = 0


def _magnitude_bits(tau: np.ndarray) -> np.ndarray:
    return np.abs(tau).view(np.uint32)


def trimming(s: TensorSettings, m: int) -> bool:
    """Whether model m is trimmed (and so rescaled, when a rescale is asked for)."""
    return s.sparsify == KEEP_LARGEST and s.densities[m] < 1.0


def trims(s: TensorSettings, windows, count: int, models: int) -> List[Trim]:
    """Each model's trim, by two histogram passes over its |τ| per trimmed model."""
    found = []
    for m in range(models):
        if not trimming(s, m):
            found.append(Trim(keep_all=True))
            continue
        if s.densities[m] <= 0.0:
            found.append(Trim(keep_all=False, bits=KEEP_NONE_BITS))
            continue

        def keys(m=m) -> Iterator[np.ndarray]:
            for chunk in windows():
                yield _magnitude_bits(task_vectors(chunk)[1][m])
                chunk.release_inputs()

        k = keep_count(s.densities[m], count)
        magnitudes = OrderStatistics(keys)
        kth = magnitudes.at([magnitudes.total - k])[0]
        greater = magnitudes.total - kth.below - kth.equal
        found.append(Trim(keep_all=False, bits=kth.key, ties=k - greater))
    return found


class Kept:
    """The trims' keep masks window by window (windows in order: the ties are counted in index
    order across them); None where a model keeps every element."""

    def __init__(self, found: Sequence[Trim]):
        self.trims = list(found)
        self.ties_left = [t.ties for t in found]

    def __call__(self, m: int, tau: np.ndarray) -> Optional[np.ndarray]:
        trim = self.trims[m]
        if trim.keep_all:
            return None
        bits = _magnitude_bits(tau)
        keep = bits > trim.bits
        tie = np.flatnonzero(bits == trim.bits)[:max(0, self.ties_left[m])]
        keep[tie] = True
        self.ties_left[m] -= len(tie)
        return keep


def rescale_factors(s: TensorSettings, found: Sequence[Trim], windows) -> np.ndarray:
    """Each model's rescale (1 where untrimmed, rescale none, or a sum below RESCALE_EPS)."""
    models = len(found)
    factors = np.ones(models)
    rescaled = [m for m in range(models) if trimming(s, m)]
    if s.rescale == "none" or not rescaled:
        return factors
    if s.rescale == "inverse_density":
        for m in rescaled:
            if s.densities[m] > 0.0:
                factors[m] = 1.0 / s.densities[m]
        return factors
    kept = Kept(found)
    return l1_rescales(windows, models, rescaled, lambda m, start, tau: kept(m, tau))


def merged_chunk(s: TensorSettings, kept: Kept, factors: np.ndarray, chunk: Chunk) -> Chunk:
    """The chunk holding the merged window (per_vector.result_chunk)."""
    f32, count = np.float32, chunk.count
    base, taus = task_vectors(chunk)
    terms = [workspace.get(f"term{m}", count, f32) for m in range(len(taus))]
    with quiet():
        for m, (tau, term) in enumerate(zip(taus, terms)):
            np.multiply(tau, f32(factors[m]), out=term)  # the rounding order of TIES' terms
            term *= f32(s.weights[m])
            keep = kept(m, tau)
            if keep is not None:
                term *= keep
    mixed = combined(s, terms)
    votes, gap = workspace.get("votes", count, np.int32), workspace.get("gap", count, f32)
    votes[:] = 0
    with quiet():
        for tau in taus:
            np.subtract(mixed, tau, out=gap)
            np.abs(gap, out=gap)
            gap *= f32(s.lambda_)
            votes += np.abs(tau) > gap
        mixed *= votes >= s.own_value("k")
        mixed += base
    return result_chunk(chunk, mixed)


def window_elements(shape: Sequence[int]) -> int:
    return WINDOW_ELEMENTS


def merge_chunks(s: TensorSettings, tensor, windows) -> Iterator[Chunk]:
    """The merged windows of `tensor` (a PlannedTensor), after the trim and rescale passes."""
    found = trims(s, windows, tensor.count, len(tensor.sources) - 1)
    factors = rescale_factors(s, found, windows)
    kept = Kept(found)
    for chunk in windows(placed=True):
        yield merged_chunk(s, kept, factors, chunk)
