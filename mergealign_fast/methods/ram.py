"""Reinforced Agent Merging (mergekit's `ram` and `ramplus_tl`, arXiv 2601.13572) over a base and
any number of models: per element, a change |τ| > ε made by one model is kept whole, one made by
several is their mean; `ramplus_tl` scales each model's unshared changes by 1 + r·min(ρ, α), ρ
its shared over unshared changes in the tensor.  No weights.  Numpy, window by window, on the
CPU path (methods/windows/ram.py)."""

from __future__ import annotations

from .core.spec import Contract, Defaults, MergekitForm, MethodSpec, in_windows



METHODS = tuple(MethodSpec(
    name, summary, parameters, Defaults(epsilon=1e-5), Contract(on_sets=True),
    **in_windows("ram"),
    mergekit=MergekitForm(registers="theirs"), parameters_doc=doc)
    for name, summary, parameters, doc in (
        ("ram", "Reinforced Agent Merging (mergekit's): per element, a change \\|τ\\| > ε made "
         "by one model is kept whole, one made by several is their mean; no weights",
         ("epsilon",), "`--epsilon` (1e-5)"),
        ("ramplus_tl", "ram, with each model's unshared changes scaled by 1 + r·min(ρ, α), ρ its "
         "shared over unshared changes in the tensor", ("epsilon", "r", "alpha"),
         "`--epsilon` (1e-5), `--r` (0.1), `--alpha` (0.2)")))
