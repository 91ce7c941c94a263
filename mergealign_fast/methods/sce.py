"""SCE (select, calculate, erase; mergekit's `sce`, arXiv 2408.07990) over a base and any
number of models: keep the `select_topk` fraction of elements whose τ vary most across the
models (exact threshold, ties in index order), weigh each model by its mean τ², let the sign of
Σ τ elect, base + the weighted mean of the τ that agree.  Numpy, window by window, on the CPU
path (methods/windows/sce.py)."""

from __future__ import annotations

from .core.spec import Contract, MergekitForm, MethodSpec, in_windows, others_at_least



METHODS = (MethodSpec(
    "sce", "SCE (select, calculate, erase; mergekit's): keep the `select_topk` fraction of "
    "elements whose τ vary most across the models (exact threshold, ties in index order), "
    "weigh each model by its mean τ², let the sign of Σ τ elect, base + the weighted mean of "
    "the τ that agree; numpy window by window on the CPU", ("select_topk",),
    contract=Contract(on_sets=True), **in_windows("sce"),
    mergekit=MergekitForm(config_roles=others_at_least("sce", 2), registers="theirs"),
    parameters_doc="`--select-topk` (1)"),)
