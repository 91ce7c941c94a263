"""Task arithmetic — MergeAlign's formula: base + λ·(w_d τ_d + w_a τ_a), τ = model − base.

With λ = 1 and no normalisation it is the fused formula every backend runs without a recipe
(the GPU kernels included); otherwise the generalized task arithmetic recipe with nothing
dropped.  On a model set, mergekit's base + λ·Σ w_m τ_m (summed first, then added to the base).
"""

from __future__ import annotations

from .core.generalized import vectors_merge
from .core.recipes import weights_recipe
from .core.spec import TASK_ARITHMETIC, Contract, MergekitForm, MethodSpec


GENERALIZED = vectors_merge()


def recipe(native, s, tensor_name: str, count: int, passes):
    if s.is_plain_task_arithmetic:
        return weights_recipe(native.Recipe(), TASK_ARITHMETIC, s.w_domain, s.w_align)
    return GENERALIZED["recipe"](native, s, tensor_name, count, passes)


def f64(s, b, *models):
    """base + λ·Σ w_m τ_m [/ Σw when normalized], summed left to right in model order."""
    combined = s.weights[0] * (models[0] - b)
    for w, m in zip(s.weights[1:], models[1:]):
        combined = combined + w * (m - b)
    weights = s.weights[0]
    for w in s.weights[1:]:
        weights += w
    if s.normalize and weights != 0:
        combined = combined / weights
    return b + s.lambda_ * combined


def in_mergekit(s, group):
    from .core import in_torch

    return in_torch.generalized(s, group)


def oracle(s, tensor_name: str, b, xs):
    from .core import oracle

    if s.is_plain_task_arithmetic:
        return oracle.task_arithmetic_ref(s, b, xs)
    return GENERALIZED["oracle"](s, tensor_name, b, xs)


METHODS = (MethodSpec(
    "task_arithmetic", "base + λ·(w_d τ_d + w_a τ_a) — MergeAlign",
    ("weight", "lambda", "normalize"), contract=Contract(on_sets=True), recipe=recipe,
    set_recipe=GENERALIZED["set_recipe"], f64=f64, fused_formula=True, oracle=oracle,
    mergekit=MergekitForm(needs_weights=True, registers="ours", arithmetic=in_mergekit),
    parameters_doc="weights (0.5, 0.5), `--lambda` (1), `--normalize` (off)"),)
