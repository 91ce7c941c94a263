"""Arcee Fusion (mergekit's): base + τ_d where |τ_d|·KL(softmax(domain row) ‖ softmax(base row))
reaches median + 1.5·IQR of that importance over the tensor (exact quartiles: mergekit
estimates them from a random million elements of a larger tensor); the aligned model is not
used.  Numpy, window by window, on the CPU path (methods/windows/fusion.py)."""

from __future__ import annotations

from .core.spec import MergekitForm, MethodSpec, in_windows, others_at_least


def in_mergekit(s, group):
    """mergekit's Arcee Fusion in the inputs' dtype: importance |τ|·KL per row, the
    threshold from quartiles read off the sorted importances at ⌊q·(n−1)⌋, a float32 mask
    (so a float32 result).  mergekit reads the quartiles of a tensor over a million elements
    off a random sample; this sorts every element (its exact quartiles)."""
    import torch
    import torch.nn.functional as F

    from .windows.fusion import FENCE_IQR, SOFTMAX_EPS

    base, model = group.base, group.others[0]
    p = F.softmax(model, dim=-1) + SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + SOFTMAX_EPS
    importance = (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered, _ = torch.sort(importance.reshape(-1))
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at]
    mask = (importance >= median + FENCE_IQR * (q3 - q1)).float()
    return base + (model - base) * mask


METHODS = (MethodSpec(
    "arcee_fusion", "Arcee Fusion (mergekit's): base + τ_d where \\|τ_d\\|·KL(softmax(domain "
    "row) ‖ softmax(base row)) reaches median + 1.5·IQR of that importance over the tensor "
    "(exact quartiles); aligned unused", (), **in_windows("fusion"), mergekit=MergekitForm(
        config_roles=others_at_least("arcee_fusion", 1, exactly=True), registers="theirs",
        arithmetic=in_mergekit, writes_f32=True),
    parameters_doc="–"),)
