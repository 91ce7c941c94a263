"""Reinforced Agent Merging (mergekit's `ram` and `ramplus_tl`, arXiv 2601.13572) over a base and
any number of models, window by window in numpy on the CPU path.

For τ_m = model_m - base, an element of τ_m counts where |τ_m| > ε (default 1e-5); c is how
many models count at an element.
  ram         base + Σ_m τ_m·[counts] / max(c, 1): an element one model changed keeps that
              model's change whole, one several changed gets their mean (no weights: a change
              is not diluted by the models that left the element alone).
  ramplus_tl  the same, but a model's unshared elements (c = 1) are scaled by
              λ_m = 1 + r·clamp(ρ_m, 0, α), ρ_m = (its counting elements with c > 1) /
              max(its counting elements with c = 1, ε), counted over the tensor (tensor-local;
              defaults r = 0.1, α = 0.2, mergekit's).
A counting pass (ramplus_tl only: integers, exact) comes before the merge pass, which computes
each window in fp32 (each model's term, then their sum in model order, as mergekit sums them)
and hands it to the kernel, which rounds it to the output dtype once.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence, TYPE_CHECKING, Tuple

import numpy as np

from .per_vector import WINDOW_ELEMENTS, quiet, result_chunk, task_vectors, workspace
from ...io.stream import Chunk

if TYPE_CHECKING:  # annotations only: the settings module reads the registry
    from ..core.settings import TensorSettings


def window_elements(shape: Sequence[int]) -> int:
    return WINDOW_ELEMENTS


def _counting(chunk: Chunk, epsilon: float) -> Tuple[np.ndarray, List[np.ndarray],
                                                      List[np.ndarray], np.ndarray]:
    """The window's base, τ_m (fp32), where each counts, and how many count per element."""
    base, taus = task_vectors(chunk)
    contributors = workspace.get("contributors", chunk.count, np.int32)
    contributors[:] = 0
    counts = []
    with quiet():
        for tau in taus:
            counting = np.abs(tau) > np.float32(epsilon)
            contributors += counting
            counts.append(counting)
    return base, taus, counts, contributors


def unshared_scales(s: TensorSettings, model_count: int, windows) -> np.ndarray:
    """Each model's λ_m (ones for ram)."""
    if s.name != "ramplus_tl":
        return np.ones(model_count)
    shared, unique = np.zeros(model_count), np.zeros(model_count)
    for chunk in windows():
        _, _, counts, contributors = _counting(chunk, s.epsilons[0])
        alone = contributors == 1
        for m, counting in enumerate(counts):
            unique[m] += np.count_nonzero(counting & alone)
            shared[m] += np.count_nonzero(counting & (contributors > 1))
        chunk.release_inputs()
    rho = shared / np.maximum(unique, s.epsilons[0])
    return 1.0 + s.r * np.clip(rho, 0.0, s.alpha)


def merged_chunk(s: TensorSettings, scales: np.ndarray, chunk: Chunk) -> Chunk:
    """The chunk holding the merged window (per_vector.result_chunk)."""
    f32 = np.float32
    base, taus, counts, contributors = _counting(chunk, s.epsilons[0])
    merged = workspace.get("merged", chunk.count, f32)
    np.copyto(merged, base)
    total, term, divisor = (workspace.get(name, chunk.count, f32)
                            for name in ("total", "term", "divisor"))
    with quiet():
        alone = contributors == 1
        np.maximum(contributors, 1, out=divisor, casting="unsafe")
        total[:] = 0.0
        for tau, counting, scale in zip(taus, counts, scales):
            tau *= counting
            np.divide(tau, divisor, out=term)  # shared: the mean of the changes
            np.multiply(tau, f32(scale), out=term, where=alone)  # unshared: scaled whole
            total += term
        merged += total
    return result_chunk(chunk, merged)


def merge_chunks(s: TensorSettings, tensor, windows) -> Iterator[Chunk]:
    """The merged windows of `tensor` (a PlannedTensor), after the counting pass (ramplus_tl)."""
    scales = unshared_scales(s, len(tensor.sources) - 1, windows)
    for chunk in windows(placed=True):
        yield merged_chunk(s, scales, chunk)


def reference(name: str, epsilon: float, r: float, alpha: float, base: np.ndarray,
              models: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """RAM or RAM+ in float64 on whole flat arrays, from the method's statement (for tests),
    and the scale of its fp32 evaluation (|base| + Σ|terms|); an element counts where its fp32
    τ exceeds ε, as merged."""
    taus = np.stack([np.asarray(x, np.float64) - base for x in models])
    counting = np.abs(taus.astype(np.float32)) > np.float32(epsilon)
    c = counting.sum(axis=0)
    scales = np.ones(len(taus))
    if name == "ramplus_tl":
        unique = (counting & (c == 1)).sum(axis=1)
        shared = (counting & (c > 1)).sum(axis=1)
        scales = 1.0 + r * np.clip(shared / np.maximum(unique, epsilon), 0.0, alpha)
    terms = np.where(c == 1, taus * counting * scales[:, None],
                     taus * counting / np.maximum(c, 1))
    return base + terms.sum(axis=0), np.abs(base) + np.abs(terms).sum(axis=0)
