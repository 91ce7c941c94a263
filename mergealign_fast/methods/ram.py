"""Reinforced Agent Merging (mergekit's `ram` and `ramplus_tl`, arXiv 2601.13572) over a base and
any number of models: per element, a change |τ| > ε made by one model is kept whole, one made by
several is their mean; `ramplus_tl` scales each model's unshared changes by 1 + r·min(ρ, α), ρ
its shared over unshared changes in the tensor.  No weights.  Numpy, window by window, on the
CPU path (methods/windows/ram.py)."""

from __future__ import annotations

from .core.spec import Contract, Defaults, MergekitForm, MethodSpec, in_windows



def in_mergekit(plus: bool):
    """mergekit's ram / ramplus_tl in the inputs' dtype; ramplus_tl's scale is a float32
    count ratio, so its result is float32."""
    def merged(s, group):
        import torch

        base = group.base
        if not group.others:
            return base
        epsilon = s.epsilons[0]
        tv = torch.stack([m - base for m in group.others], dim=0).view(len(group.others), -1)
        changed = tv.abs() > epsilon
        counts = changed.sum(dim=0, keepdim=True)
        shared, alone = counts > 1, counts == 1
        tv = tv * changed
        unshared = tv * alone
        if plus:
            rho = (changed & shared).sum(dim=1) / (changed & alone).sum(dim=1).clamp(min=epsilon)
            unshared = unshared * (1 + s.r * rho.clamp(min=0, max=s.alpha)).unsqueeze(-1)
        merged_tv = (unshared + tv * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
        return base + merged_tv.reshape_as(base)
    return merged


METHODS = tuple(MethodSpec(
    name, summary, parameters, Defaults(epsilon=1e-5), Contract(on_sets=True),
    **in_windows("ram"),
    mergekit=MergekitForm(registers="theirs", arithmetic=in_mergekit(name == "ramplus_tl"),
                          writes_f32=name == "ramplus_tl"), parameters_doc=doc)
    for name, summary, parameters, doc in (
        ("ram", "Reinforced Agent Merging (mergekit's): per element, a change \\|τ\\| > ε made "
         "by one model is kept whole, one made by several is their mean; no weights",
         ("epsilon",), "`--epsilon` (1e-5)"),
        ("ramplus_tl", "ram, with each model's unshared changes scaled by 1 + r·min(ρ, α), ρ its "
         "shared over unshared changes in the tensor", ("epsilon", "r", "alpha"),
         "`--epsilon` (1e-5), `--r` (0.1), `--alpha` (0.2)")))
