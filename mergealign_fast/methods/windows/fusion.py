"""Arcee Fusion (mergekit's `arcee_fusion`) of a base and one model, window by window in numpy on
the CPU path.

For τ = model - base, each element's importance is |τ| · KL(P ‖ Q) of its row, P and Q the
softmax of the model's and the base's row (the last dimension; a 1-D tensor is one row), each
plus 1e-8, KL = Σ P·log(P / Q).  The tensor keeps the model's change where the importance
reaches median + 1.5·(q3 - q1) of the importances over the tensor (an outlier fence), and the
base elsewhere: base + τ·[importance >= fence].

The quartiles are the sorted importances at index floor(q·(n - 1)), as mergekit indexes them,
but exact: mergekit sorts a random sample of a million elements (with replacement) of a larger
tensor, so on those its fence and the elements at it are an estimate.  Three passes: the
rows' KL (float64, kept per row in fp32 as the importance is taken in fp32) with the first of
two histogram passes for the three quartiles (order_stats.py), the second, then the merge,
rounded by the kernel to the output dtype once.
"""

from __future__ import annotations

from typing import Iterator, Sequence, TYPE_CHECKING, Tuple

import numpy as np

from .order_stats import OrderStatistics, sortable_bits, value_of
from .per_vector import WINDOW_ELEMENTS, decoded, quiet, result_chunk, workspace
from ...io.stream import Chunk

if TYPE_CHECKING:  # annotations only: the settings module reads the registry
    from ..core.settings import TensorSettings

SOFTMAX_EPS = 1e-8  # mergekit's: added to both softmaxes before the KL divergence
QUARTERS = (1, 2, 3)  # q1, the median, q3: at index floor(q·(n - 1)) for q = k/4
FENCE_IQR = 1.5  # Tukey's fence: the median plus 1.5 interquartile ranges


def row_width(shape: Sequence[int]) -> int:
    return int(shape[-1]) if len(shape) else 1


def window_elements(shape: Sequence[int]) -> int:
    """Whole rows, about WINDOW_ELEMENTS of them."""
    width = max(1, row_width(shape))
    return max(1, WINDOW_ELEMENTS // width) * width


def _softmax64(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def row_divergences(x: np.ndarray, b: np.ndarray, width: int) -> np.ndarray:
    """KL(softmax(x) + eps ‖ softmax(b) + eps) of each row, float64, rounded to fp32."""
    with quiet():
        p = _softmax64(x.reshape(-1, width).astype(np.float64)) + SOFTMAX_EPS
        q = _softmax64(b.reshape(-1, width).astype(np.float64)) + SOFTMAX_EPS
        return np.sum(p * np.log(p / q), axis=1).astype(np.float32)


class Divergences:
    """Each row's KL divergence (fp32), taken by the first pass over the windows (from its
    two softmaxes) and read by the later ones."""

    def __init__(self, tensor):
        self.width = max(1, row_width(tensor.shape))
        self.rows = np.empty(max(1, tensor.count // self.width), dtype=np.float32)
        self.known = False

    def importance(self, chunk: Chunk) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window's base, τ (fp32) and each element's importance (fp32), in the
        workspace."""
        base, model = decoded(chunk, first=2)  # the trio's aligned role is not used
        width, first = self.width, chunk.start // self.width
        rows = self.rows[first:first + chunk.count // width]
        if not self.known:
            rows[:] = row_divergences(model, base, width)
        tau = workspace.get("tau", chunk.count, np.float32)
        importance = workspace.get("importance", chunk.count, np.float32)
        with quiet():
            np.subtract(model, base, out=tau)
            np.abs(tau, out=importance)
            importance.reshape(-1, width)[:] *= rows[:, None]
        return base, tau, importance


def fence(divergences: Divergences, windows) -> np.float32:
    """median + 1.5·IQR of the importances, from their exact quartiles (the first of the
    passes takes the rows' divergences)."""

    def keys():
        for chunk in windows():
            yield sortable_bits(divergences.importance(chunk)[2])
            chunk.release_inputs()
        divergences.known = True

    importances = OrderStatistics(keys)
    if importances.total == 0:
        return np.float32(np.inf)  # no elements: nothing to keep
    last = importances.total - 1
    q1, median, q3 = (value_of(r.key) for r in importances.at([k * last // 4
                                                               for k in QUARTERS]))
    with quiet():
        return np.float32(median + np.float32(np.float32(FENCE_IQR) * np.float32(q3 - q1)))


def merged_chunk(threshold: np.float32, divergences: Divergences, chunk: Chunk) -> Chunk:
    """The chunk holding the merged window (per_vector.result_chunk)."""
    base, tau, importance = divergences.importance(chunk)
    merged = workspace.get("merged", chunk.count, np.float32)
    with quiet():
        np.multiply(tau, importance >= threshold, out=merged)
        merged += base
    return result_chunk(chunk, merged)


def merge_chunks(s: TensorSettings, tensor, windows) -> Iterator[Chunk]:
    """The merged windows of `tensor` (a PlannedTensor), after the fence's passes."""
    divergences = Divergences(tensor)
    threshold = fence(divergences, windows)
    for chunk in windows(placed=True):
        yield merged_chunk(threshold, divergences, chunk)


def reference(shape: Sequence[int], base: np.ndarray, model: np.ndarray) -> np.ndarray:
    """Arcee Fusion in float64 on whole flat arrays, from the method's statement (for tests):
    the importances as merged (fp32), their quartiles by a full sort."""
    width = max(1, row_width(shape))
    b, x = np.asarray(base, np.float32), np.asarray(model, np.float32)
    tau = x - b
    importance = np.abs(tau) * np.repeat(row_divergences(x, b, width), width)
    ordered = np.sort(importance)
    if not ordered.size:
        return b.astype(np.float64)
    last = ordered.size - 1
    q1, median, q3 = (ordered[k * last // 4] for k in QUARTERS)
    threshold = np.float32(median + np.float32(np.float32(FENCE_IQR) * np.float32(q3 - q1)))
    keep = importance >= threshold
    return b.astype(np.float64) + np.where(keep, tau.astype(np.float64), 0.0)
