"""SCE (select, calculate, erase; mergekit's `sce`, arXiv 2408.07990) over a base and any
number of models: keep the `select_topk` fraction of elements whose τ vary most across the
models (exact threshold, ties in index order), weigh each model by its mean τ², let the sign of
Σ τ elect, base + the weighted mean of the τ that agree.  Numpy, window by window, on the CPU
path (methods/windows/sce.py)."""

from __future__ import annotations

from .core.spec import Contract, MergekitForm, MethodSpec, in_windows, others_at_least



def in_mergekit(s, group):
    """mergekit's SCE in the inputs' dtype: the top-k of the τ's variance (torch.topk), the
    weights mean τ² over their sum (a Python float), TIES' sign, the weighted mean."""
    import torch

    from .core.in_torch import sign_agreement

    base = group.base
    if not group.others:
        return base
    tvs = torch.stack([m - base for m in group.others], dim=0)
    if s.select_topk < 1:
        tvs = tvs * _top_variance(tvs, s.select_topk).unsqueeze(0)
    agree = sign_agreement(tvs)
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 \
        else weights / total
    weights = weights.reshape(-1, *([1] * (tvs.dim() - 1))) * agree
    return base + (tvs * weights).sum(dim=0) / torch.sum(weights, dim=0).clamp(min=1e-6)


def _top_variance(tvs, density: float):
    import torch

    if density <= 0:
        return torch.zeros_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


METHODS = (MethodSpec(
    "sce", "SCE (select, calculate, erase; mergekit's): keep the `select_topk` fraction of "
    "elements whose τ vary most across the models (exact threshold, ties in index order), "
    "weigh each model by its mean τ², let the sign of Σ τ elect, base + the weighted mean of "
    "the τ that agree; numpy window by window on the CPU", ("select_topk",),
    contract=Contract(on_sets=True), **in_windows("sce"),
    mergekit=MergekitForm(config_roles=others_at_least("sce", 2), registers="theirs",
                          arithmetic=in_mergekit),
    parameters_doc="`--select-topk` (1)"),)
