"""Multi-SLERP (mergekit's): base + ‖τ‖_w · normalize(Σ w τ/‖τ‖) — the weighted mean of the unit
task vectors back on the sphere at the weighted mean norm, per tensor (mergekit's tangent-space
average of those vectors sums to zero, so this closed form is its result); `multislerp_models`
the same over the models themselves (a config without base_model: any number of models, the
first standing in the base role, which weighs nothing)."""

from __future__ import annotations

import math

from ..errors import MergeError
from .core.geometry import MULTISLERP_EPS, multislerp_coefficients
from .core.recipes import weights_recipe
from .core.spec import (MODELS, SET_ROLE, TASK_ARITHMETIC, VECTORS, Contract, Defaults,
                        MergekitForm, MethodSpec, Parameter)

# mergekit's `eps`: added to each norm before dividing by it (default 1e-8).
EPS = Parameter("eps", "number", (), "multislerp: added to each norm before dividing by it "
                "(default 1e-8)", (("eps", ""),), default=MULTISLERP_EPS)


def _coefficients(s, tensor_name: str, gram):
    try:
        return multislerp_coefficients(s.weights, gram, s.normalize, s.own_value("eps"))
    except ValueError as exc:
        raise MergeError(f"tensor {tensor_name}: {exc}") from None


def _trio_recipe(on_models: bool):
    def recipe(native, s, tensor_name: str, count: int, passes):
        dd, aa, da = passes.vector_stats(models=on_models)
        c_d, c_a = _coefficients(s, tensor_name, [[dd, da], [da, aa]])
        return weights_recipe(native.Recipe(), MODELS if on_models else TASK_ARITHMETIC, c_d,
                              c_a)
    return recipe


def _set_recipe(on_models: bool):
    """base + Σ c_m τ_m (plain task arithmetic's recipe), or over the models themselves
    Σ c_m x_m with the base role only standing in."""
    def recipe(native, s, tensor_name: str, count: int, passes):
        recipe = native.SetRecipe()
        recipe.kind = MODELS if on_models else VECTORS
        gram = [row[1:] for row in passes.model_gram()[1:]] if on_models else passes.gram()
        for m, c in enumerate(_coefficients(s, tensor_name, gram)):
            recipe.term(m).weight = c
        return recipe
    return recipe


def config_roles(base, folders, others, problem):
    """With base_model: one other model (the trio, its aligned role the base's), two (the
    trio) or more (a model set).  Without: mergekit's base is optional, so one model (itself),
    two (the trio, the first standing in the base role) or more (a model set over them all, the
    first standing in the base role too)."""
    if not others:
        problem("multislerp takes at least one model besides base_model")
        return None
    if base is not None:
        return base, others
    if len(others) <= 2:
        return {"base": others[0], "domain": others[-1], "aligned": others[0]}
    return {"base": others[0], **{SET_ROLE.format(i + 1): f for i, f in enumerate(others)}}


def config_rules(roles):
    """One model and no base_model: it is the merge (mergekit returns it whatever its weight).
    Weights 1 and 0 give the coefficients 1 and 0 (1/(‖x‖+eps)·‖x‖ / (‖x‖/(‖x‖+eps)) is 1 in
    float64 to within 1e-16, exactly 1 in the fp32 kernel), so the output is the model's bits."""
    if "domain" in roles and roles["domain"] == roles["aligned"] == roles["base"]:
        return [("weight", "domain", 1.0), ("weight", "aligned", 0.0)]
    return []


def backend(group, merge):
    eps = group.shared.get("eps", MULTISLERP_EPS)
    rules = (("eps", None, eps),)
    others, weights = group.others, [p["weight"] for p in group.per_model]
    normalize = group.shared.get("normalize", True)
    if len(others) == 1 and group.base is None:
        return others[0]
    if group.base is None and len(others) == 2:  # the first stands in the base role
        return merge.trio(others[0], others[1], others[0], "multislerp_models", weights[1],
                          weights[0], normalize=normalize, rules=rules)
    if group.base is None:
        return merge.set(others[0], others, "multislerp_models",
                         parameters={"normalize": normalize, "eps": eps},
                         per_model=[{"weight": w} for w in weights])
    if len(others) <= 2:
        return merge.trio(group.base, others[0], others[-1], "multislerp", weights[0],
                          weights[-1] if len(others) == 2 else 0.0, normalize=normalize,
                          rules=rules)
    return merge.set(group.base, others, "multislerp", parameters={"normalize": normalize,
                                                                   "eps": eps},
                     per_model=[{"weight": w} for w in weights])


def settings_problems(s, where: str):
    eps = s.own_value("eps")
    if not (math.isfinite(eps) and eps >= 0.0):
        return [f"{where}: multislerp's eps must be a finite number of at least 0 (got {eps})"]
    return []


def in_mergekit(s, group):
    """mergekit's Multi-SLERP in the inputs' dtype: the weighted mean of the unit (task)
    vectors, projected to the tangent space there and back by the exponential map, at the
    weighted mean norm (a two-model linear blend where the mean's norm is below eps)."""
    import torch

    base, eps = group.base, s.own_value("eps")
    if len(group.others) == 1:
        return group.others[0]
    tensors = torch.stack(list(group.others), dim=0)
    if base is not None:
        tensors -= base
    flat = tensors.view(tensors.shape[0], -1)
    weights = torch.tensor(list(group.other_weights), dtype=tensors.dtype)
    if s.normalize:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] != 2:
            raise ValueError("the weighted sum of the unit task vectors is zero (antipodal "
                             "models with balancing weights): mergekit refuses it too")
        result = (tensors[0] * weights[0] + tensors[1] * weights[1]).view(tensors.shape[1:])
        return result if base is None else result + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    length = torch.norm(tangent) + eps
    result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(tensors.shape[1:])
    return result if base is None else result + base


def _oracle(on_models: bool):
    def oracle(s, tensor_name: str, b, xs):
        from .core import oracle

        return oracle.multislerp_ref(s, b, xs, on_models)
    return oracle


METHODS = (
    MethodSpec("multislerp", "base + ‖τ‖_w · normalize(Σ w τ/‖τ‖): the weighted mean of the unit "
               "task vectors back on the sphere at the weighted mean norm, per tensor "
               "(mergekit's Multi-SLERP)", ("weight", "normalize", "eps"),
               Defaults(normalize=True), Contract(on_sets=True), recipe=_trio_recipe(False),
               set_recipe=_set_recipe(False), oracle=_oracle(False), own_parameters=(EPS,),
               settings_problems=settings_problems, mergekit=MergekitForm(
                   needs_base=False, needs_weights=True, placeholder_base=True,
                   aliases={"normalize_weights": "normalize"}, config_roles=config_roles,
                   config_rules=config_rules, without_base="multislerp_models",
                   registers="theirs", backend=backend, arithmetic=in_mergekit),
               parameters_doc="weights, `--normalize` (on), `--eps` (1e-8)"),
    MethodSpec("multislerp_models", "multislerp over the models themselves (no base)",
               ("weight", "normalize", "eps"), Defaults(normalize=True),
               Contract(on_sets=True), recipe=_trio_recipe(True), set_recipe=_set_recipe(True),
               oracle=_oracle(True), own_parameters=(EPS,),
               settings_problems=settings_problems,
               mergekit=MergekitForm(needs_base=False, arithmetic=in_mergekit),
               parameters_doc="weights, `--normalize` (on), `--eps` (1e-8)"),
)
