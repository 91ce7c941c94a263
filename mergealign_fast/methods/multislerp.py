"""Multi-SLERP (mergekit's): base + ‖τ‖_w · normalize(Σ w τ/‖τ‖) — the weighted mean of the unit
task vectors back on the sphere at the weighted mean norm, per tensor (mergekit's tangent-space
average of those vectors sums to zero, so this closed form is its result); `multislerp_models`
the same over the models themselves (a config without base_model)."""

from __future__ import annotations

from ..errors import MergeError
from .core.geometry import MULTISLERP_EPS, multislerp_coefficients
from .core.recipes import weights_recipe
from .core.spec import (MODELS, TASK_ARITHMETIC, VECTORS, Contract, Defaults, MergekitForm,
                        MethodSpec)


def _coefficients(s, tensor_name: str, gram):
    try:
        return multislerp_coefficients(s.weights, gram, s.normalize)
    except ValueError as exc:
        raise MergeError(f"tensor {tensor_name}: {exc}") from None


def _trio_recipe(on_models: bool):
    def recipe(native, s, tensor_name: str, count: int, passes):
        dd, aa, da = passes.vector_stats(models=on_models)
        c_d, c_a = _coefficients(s, tensor_name, [[dd, da], [da, aa]])
        return weights_recipe(native.Recipe(), MODELS if on_models else TASK_ARITHMETIC, c_d,
                              c_a)
    return recipe


def set_recipe(native, s, tensor_name: str, count: int, passes):
    """base + Σ c_m τ_m: plain task arithmetic's recipe."""
    recipe = native.SetRecipe()
    recipe.kind = VECTORS
    for m, c in enumerate(_coefficients(s, tensor_name, passes.gram())):
        recipe.term(m).weight = c
    return recipe


def config_roles(base, folders, others, problem):
    """Without base_model two models (the base role stands in, as for nuslerp); with it two
    (the trio) or more (a model set)."""
    if (len(others) != 2) if base is None else (len(others) < 2):
        problem(f"multislerp takes two models, or base_model and two or more others (got "
                f"{len(others)} besides {'no base_model' if base is None else 'base_model'})")
        return None
    if base is None:
        return {"base": others[0], "domain": others[1], "aligned": others[0]}
    return base, others


def backend(group, merge):
    eps = group.shared.get("eps", MULTISLERP_EPS)
    if eps != MULTISLERP_EPS:
        raise ValueError(f"{group.name}: multislerp's eps is {MULTISLERP_EPS} here (got {eps})")
    others, weights = group.others, [p["weight"] for p in group.per_model]
    normalize = group.shared.get("normalize", True)
    if group.base is None:  # two models: the first stands in the base role
        return merge.trio(others[0], others[1], others[0], "multislerp_models", weights[1],
                          weights[0], normalize=normalize)
    if len(others) <= 2:
        return merge.trio(group.base, others[0], others[-1], "multislerp", weights[0],
                          weights[-1] if len(others) == 2 else 0.0, normalize=normalize)
    return merge.set(group.base, others, "multislerp", parameters={"normalize": normalize},
                     per_model=[{"weight": w} for w in weights])


def _oracle(on_models: bool):
    def oracle(s, tensor_name: str, b, xs):
        from .core import oracle

        return oracle.multislerp_ref(s, b, xs, on_models)
    return oracle


METHODS = (
    MethodSpec("multislerp", "base + ‖τ‖_w · normalize(Σ w τ/‖τ‖): the weighted mean of the unit "
               "task vectors back on the sphere at the weighted mean norm, per tensor "
               "(mergekit's Multi-SLERP)", ("weight", "normalize"), Defaults(normalize=True),
               Contract(on_sets=True), recipe=_trio_recipe(False), set_recipe=set_recipe,
               oracle=_oracle(False), mergekit=MergekitForm(
                   needs_base=False, needs_weights=True, placeholder_base=True,
                   aliases={"normalize_weights": "normalize"}, config_roles=config_roles,
                   without_base="multislerp_models", registers="theirs", backend=backend),
               parameters_doc="weights, `--normalize` (on)"),
    MethodSpec("multislerp_models", "multislerp over the models themselves (no base)",
               ("weight", "normalize"), Defaults(normalize=True), recipe=_trio_recipe(True),
               oracle=_oracle(True), mergekit=MergekitForm(needs_base=False),
               parameters_doc="weights, `--normalize` (on)"),
)
