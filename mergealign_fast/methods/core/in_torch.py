"""Methods as mergekit 0.1.5 computes them (--compute-dtype mergekit): torch, whole tensors, in
the config's dtype, every operation rounded to it as torch rounds it — the pieces the methods
share; each method's own form is in its module (MergekitForm.arithmetic).

Bit for bit means the same torch operations on the same values in the same order: a sum of
bf16 terms is rounded after each addition, a sign is elected from a bf16 sum, a top-k is taken
on bf16 magnitudes (ties broken by torch's sort), a reduction over a whole tensor is torch's.
The results are mergekit's at the same torch version and thread count (torch splits a long
reduction between threads).  This is slower and takes more memory than the engine's own
arithmetic (a few copies of the tensor, not a few windows): it is for reproducing a published
merge, not for speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class MergekitGroup:
    """One tensor's inputs as mergekit's method sees them: `base` (None where mergekit's
    method takes no base: the config has no base_model, or the method ignores it), `others`
    (the models besides the base, in mergekit's order) and `entries` (every model, base_model
    included, in mergekit's order), with each model's parameters by the same index."""

    base: Optional[object]
    others: Sequence[object]
    entries: Sequence[object]
    other_weights: Sequence[float]
    entry_weights: Sequence[float]
    other_densities: Sequence[float]
    other_gammas: Sequence[float]
    other_epsilons: Sequence[float]


def sign_agreement(deltas):
    """mergekit's TIES consensus ("sum"): True where a term's sign is the sign of the sum of
    the terms (0 counts as +)."""
    sign = deltas.sign()
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return sign == majority


def _kept_l1(delta, mask, rescale: bool):
    """delta·mask, scaled back to delta's L1 norm when asked (unless either norm < 1e-7)."""
    masked = delta * mask
    if not rescale:
        return masked
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def largest(delta, density: float, rescale: bool):
    """The `density`·n largest magnitudes of delta kept (at least one), in fp32 order as
    mergekit sorts them on the CPU."""
    import torch

    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    order = torch.argsort(delta.abs().reshape(-1).float(), descending=True)
    mask[order[:k]] = 1
    return _kept_l1(delta, mask.reshape_as(delta), rescale)


def band(delta, density: float, gamma: float, rescale: bool):
    """Breadcrumbs: the `gamma`·n largest magnitudes dropped, then the smallest, leaving
    `density`·n (mergekit's magnitude_outliers)."""
    import torch

    if density >= 1:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(delta.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[order[bottom:bottom + keep]] = 1
    return _kept_l1(delta, mask.reshape_as(delta), rescale)


def generalized(s, group: MergekitGroup, trim=None, consensus: bool = False):
    """mergekit's generalized task arithmetic: each τ = model − base trimmed by `trim`
    (trim(τ, density, gamma, rescale) or None), weighted, summed (TIES: only the terms that
    agree with the elected sign, divided by their weights when normalized), times λ."""
    import torch

    base = group.base
    if not group.others:
        return base
    deltas = base.new_empty((len(group.others), *base.shape))
    for i, model in enumerate(group.others):
        delta = model - base
        if trim is not None:
            delta = trim(delta, group.other_densities[i], group.other_gammas[i],
                         s.rescale != "none")
        deltas[i] = delta
    weights = torch.tensor(list(group.other_weights), dtype=deltas.dtype)
    weights = weights.reshape(-1, *([1] * base.dim()))
    deltas.mul_(weights)
    if consensus:
        mask = sign_agreement(deltas)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if s.normalize:
        mixed /= divisor
    if s.lambda_ != 1:
        mixed *= s.lambda_
    return (base + mixed).to(base.dtype)


def trimmed_by(kind: str):
    """The trim of generalized() for a sparsification kind ("largest", "band")."""
    if kind == "largest":
        return lambda delta, density, gamma, rescale: largest(delta, density, rescale)
    return band


def float_of(tensor) -> object:
    """The dtype mergekit's float methods compute in: float64 for float64, else float32."""
    import torch

    return torch.float64 if tensor.dtype == torch.float64 else torch.float32

