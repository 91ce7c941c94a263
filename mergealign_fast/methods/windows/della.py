"""DELLA (mergekit's `della` and `della_linear`, arXiv 2406.11617) over a base and any number of
models, window by window in numpy on the CPU path.

For τ_m = model_m - base, per tensor:
  drop      each element of τ_m is kept with probability p = (d - ε) + r·2ε, d the model's
            density, ε its epsilon and r ∈ [0, 1] the element's rank by |τ_m| within its line,
            normalized (the smallest 0, the largest 1; ties in index order).  A line is what
            mergekit ranks along: a row of a 2-D tensor, the whole of a 1-D one, dimension 1 of
            a tensor of more dimensions.  d >= 1 keeps every element, d <= 0 none.
  rescale   with rescale l1 (the default), the kept elements of τ_m are scaled by
            Σ|τ_m| / Σ|kept τ_m| over the tensor (not when either is below 1e-7), as mergekit's
            rescaled_masked_tensor does;
  merge     the terms w_m·τ_m; della elects a sign per element (that of Σ_m terms, + when 0)
            and sums the terms of that sign, dividing (normalize, on by default) by the
            weights that agree; della_linear sums every term (normalize off by default:
            dividing by Σ w_m); then λ times the sum is added to the base.

The drop is DARE's counter-based draw, keyed by (seed, tensor, model) and the element's index,
against p in 24-bit steps: the same merge on any window size or thread count (mergekit draws
with torch.bernoulli, so its masks are other ones of the same distribution).  A pass over the
tensor sums Σ|τ_m| and Σ|kept τ_m| in float64 (in index order) for the rescale; the merge pass
computes each window in fp32, and the kernel rounds it to the output dtype once.
"""

from __future__ import annotations

from typing import Iterator, Sequence, TYPE_CHECKING, Tuple

import numpy as np

from ...kernels import cpu
from ..core.recipes import DRAW_RANGE, stream_key
from .per_vector import WINDOW_ELEMENTS, quiet, result_chunk, task_vectors, workspace
from .terms import combined, l1_rescales
from ...io.stream import Chunk

if TYPE_CHECKING:  # annotations only: the settings module reads the registry
    from ..core.settings import TensorSettings

# The most bytes of packed masks held between a tensor's rescale and merge passes (a bit an
# element a model: a 256 Mi-element tensor of eight models).
MASK_CACHE_BYTES = 256 << 20


def line_shape(shape: Sequence[int]) -> Tuple[int, int]:
    """(elements of one line, stride between a line's elements) in the flat tensor."""
    if len(shape) <= 1:
        return int(np.prod(shape, dtype=np.int64)), 1
    return int(shape[1]), int(np.prod(shape[2:], dtype=np.int64))


def window_elements(shape: Sequence[int]) -> int:
    """Whole blocks of lines (a block: one index of dimension 0), about WINDOW_ELEMENTS."""
    length, stride = line_shape(shape)
    block = max(1, length * stride)
    return max(1, WINDOW_ELEMENTS // block) * block


def by_rank(tau: np.ndarray, shape: Sequence[int], table: np.ndarray) -> np.ndarray:
    """table[r] for each element, r its rank by |τ| within its line (0: the smallest; ties in
    index order).  `tau` holds whole blocks of lines.  Sorted as 64-bit keys (|τ|'s bits, then
    the position in the line: all distinct, so any sort is stable), 6x faster than a stable
    argsort of the values here."""
    length, stride = line_shape(shape)
    lines = np.abs(tau).reshape(-1, length, stride).transpose(0, 2, 1)  # each line last
    keys = lines.view(np.uint32).astype(np.uint64) << np.uint64(32)
    keys |= np.arange(length, dtype=np.uint64)
    keys.sort(axis=-1)
    positions = (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    found = np.empty(keys.shape, dtype=table.dtype)
    np.put_along_axis(found, positions, np.broadcast_to(table, keys.shape), axis=-1)
    return found.transpose(0, 2, 1).reshape(-1)


def keep_below(density: float, epsilon: float, length: int) -> np.ndarray:
    """The draw below which an element of each rank is kept: p = (d - ε) + r/(n - 1)·2ε of
    the 24-bit range (a line of one element: d - ε)."""
    normalized = np.arange(length, dtype=np.float64) / max(1, length - 1)
    p = (density - epsilon) + normalized * (2.0 * epsilon)
    return np.rint(p * DRAW_RANGE).astype(np.uint32)


def kept(s: TensorSettings, tensor_name: str, shape: Sequence[int], m: int, start: int,
         tau: np.ndarray) -> np.ndarray:
    """Which elements of model m's τ (a window from element `start`) the drop keeps."""
    density, epsilon = s.densities[m], s.epsilons[m]
    if density >= 1.0:
        return np.ones(tau.shape, dtype=bool)
    if density <= 0.0:
        return np.zeros(tau.shape, dtype=bool)
    thresholds = by_rank(tau, shape, keep_below(density, epsilon, line_shape(shape)[0]))
    draws = workspace.get("draws", tau.size, np.uint32)
    cpu.native().random_draws24(*stream_key(s.seed, tensor_name, s.roles[m]), start,
                                draws.ctypes.data, tau.size)
    return draws < thresholds


class Masks:
    """Each window's keep masks: computed, and with `keep` on held packed (a bit an element)
    for the next pass over the same windows when the tensor's masks take at most
    MASK_CACHE_BYTES, which halves the ranking (most of DELLA's time)."""

    def __init__(self, s: TensorSettings, tensor):
        self.s, self.tensor = s, tensor
        models = len(tensor.sources) - 1
        self.held = {} if models * tensor.count // 8 <= MASK_CACHE_BYTES else None

    def __call__(self, m: int, start: int, tau: np.ndarray, keep: bool = False) -> np.ndarray:
        packed = self.held.pop((m, start), None) if self.held is not None else None
        if packed is not None:
            return np.unpackbits(packed, count=tau.size).view(bool)
        found = kept(self.s, self.tensor.name, self.tensor.shape, m, start, tau)
        if keep and self.held is not None:
            self.held[(m, start)] = np.packbits(found)
        return found


def rescale_factors(s: TensorSettings, tensor, windows, masks: Masks) -> np.ndarray:
    """Each model's l1 rescale Σ|τ| / Σ|kept τ| (1 where nothing is dropped or rescale is
    off, or either sum is below RESCALE_EPS)."""
    models = len(tensor.sources) - 1
    dropping = [m for m in range(models) if 0.0 < s.densities[m] < 1.0]
    factors = np.ones(models)
    if s.rescale != "l1" or not dropping:
        return factors
    return l1_rescales(windows, models, dropping,
                       lambda m, start, tau: masks(m, start, tau, keep=True))


def merged_chunk(s: TensorSettings, masks: Masks, factors: np.ndarray, chunk: Chunk) -> Chunk:
    """The chunk holding the merged window (per_vector.result_chunk)."""
    f32, count = np.float32, chunk.count
    base, taus = task_vectors(chunk)
    terms = [workspace.get(f"term{m}", count, f32) for m in range(len(taus))]
    with quiet():
        for m, (tau, term) in enumerate(zip(taus, terms)):
            keep = masks(m, chunk.start, tau)
            np.multiply(tau, f32(s.weights[m] * factors[m]), out=term)
            term *= keep
    total = combined(s, terms)
    with quiet():
        if s.lambda_ != 1.0:
            total *= f32(s.lambda_)
        total += base
    return result_chunk(chunk, total)


def merge_chunks(s: TensorSettings, tensor, windows) -> Iterator[Chunk]:
    """The merged windows of `tensor` (a PlannedTensor), after the rescale pass."""
    masks = Masks(s, tensor)
    factors = rescale_factors(s, tensor, windows, masks)
    for chunk in windows(placed=True):
        yield merged_chunk(s, masks, factors, chunk)
