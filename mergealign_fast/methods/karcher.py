"""Karcher mean (mergekit's): ‖x‖_α · the weighted Karcher (Riemannian) mean of the unit models
on the sphere, α the weights of the base and each model — mergekit's iteration (max_iter steps,
tol), run in float64 on coefficient vectors over the tensor's Gram matrix, per tensor.  A
mergekit config weighs each model it lists (base_model too) 1/n, as mergekit does."""

from __future__ import annotations

from ..io.checkpoint import first_roles
from .core.geometry import KARCHER_STEPS, KARCHER_TOL, karcher_coefficients
from .core.recipes import weights_recipe
from .core.spec import MODELS, SET_ROLE, Contract, MergekitForm, MethodSpec


def _coefficients(s, gram):
    """Karcher's coefficients of the base and each model, from their Gram matrix."""
    return karcher_coefficients(gram, (s.w_base, *s.weights), s.max_iter, s.tol)


def recipe(native, s, tensor_name: str, count: int, passes):
    c_b, c_d, c_a = _coefficients(s, passes.model_gram())
    recipe = weights_recipe(native.Recipe(), MODELS, c_d, c_a)
    recipe.base_weight = c_b
    return recipe


def set_recipe(native, s, tensor_name: str, count: int, passes):
    """c_b·base + Σ c_m·x_m."""
    recipe = native.SetRecipe()
    recipe.kind = MODELS
    recipe.base_weight, *coefficients = _coefficients(s, passes.model_gram())
    for m, c in enumerate(coefficients):
        recipe.term(m).weight = c
    return recipe


def config_roles(base, folders, others, problem):
    """Every listed model and base_model: two or three of them take the trio's roles, more a
    model set's (without base_model the first model stands in the base role)."""
    merged = ([base] if base is not None else []) + others
    if len(merged) < 2:
        problem(f"karcher merges two or more models (base_model counts), got {len(merged)}")
        return None
    if len(merged) > 3:
        return {"base": merged[0], **{SET_ROLE.format(i + 1): f
                                      for i, f in enumerate(merged[1:])}}
    return {"base": merged[0], "domain": merged[1],
            "aligned": merged[2] if len(merged) == 3 else merged[0]}


def config_rules(roles):
    """(parameter, role, value) put before a config's own: each merged model weighs 1/n."""
    merged = set(first_roles(roles).values())
    return [("weight", role, 1.0 / len(merged) if role in merged else 0.0) for role in roles]


def backend(group, merge):
    """Every model (base_model first), each weighing 1/n, as mergekit's karcher."""
    tensors = ([group.base] if group.base is not None else []) + list(group.others)
    share = 1.0 / len(tensors)
    steps = {"max_iter": group.shared.get("max_iter", KARCHER_STEPS),
             "tol": group.shared.get("tol", KARCHER_TOL)}
    if len(tensors) <= 3:
        aligned = tensors[2] if len(tensors) == 3 else tensors[0]
        return merge.trio(tensors[0], tensors[1], aligned, "karcher", share,
                          share if len(tensors) == 3 else 0.0, base_weight=share, **steps)
    return merge.set(tensors[0], tensors[1:], "karcher", parameters=steps,
                     per_model=[{"weight": share}] * (len(tensors) - 1),
                     base_parameters={"weight": share})


def in_mergekit(s, group):
    """mergekit's Karcher mean of every model (1/n each) in the inputs' dtype, norms in
    float32 (float64 for float64 inputs), its loop and stopping rules."""
    import torch

    from .core.in_torch import float_of

    tensors, tol = list(group.entries), s.tol
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    dtype = float_of(tensors[0])

    def norm(x):
        return torch.linalg.vector_norm(x.to(dtype))

    norms = [norm(x) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype)
             for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    total = sum(alphas[i] for i in valid)
    shares, units = [alphas[i] / total for i in valid], [units[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for share, unit in zip(shares, units):
        mean += share * unit
    mean_norm = norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(s.max_iter):
        tangent = torch.zeros_like(mean)
        for share, unit in zip(shares, units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean
                + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = norm(mean)
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return sum(alpha * n for alpha, n in zip(alphas, norms)) * mean


def oracle(s, tensor_name: str, b, xs):
    from .core import oracle

    return oracle.karcher_ref((s.w_base, *s.weights), [b, *xs], s.max_iter, s.tol)


METHODS = (MethodSpec(
    "karcher", "‖x‖_α · the weighted Karcher (Riemannian) mean of the unit models on the "
    "sphere, α the weights of base, domain and aligned — mergekit's iteration (`max_iter` 10 "
    "steps, `tol` 1e-5: a config sets them), in float64 on the tensor's Gram matrix; a "
    "mergekit config weighs each model it lists (base_model too) 1/n",
    ("weight", "max_iter", "tol"), contract=Contract(on_sets=True, weighs_base=True),
    recipe=recipe, set_recipe=set_recipe, oracle=oracle, mergekit=MergekitForm(
        needs_base=False, ignores=("weight",), config_roles=config_roles,
        config_rules=config_rules, registers="theirs", backend=backend,
        arithmetic=in_mergekit),
    parameters_doc="`--base-weight` (0), weights"),)
