"""Linear: (w_b·base + Σ w_m·model_m) / Σw — a weighted average of the models themselves
(normalize, on by default, divides by the weights' sum).  mergekit's linear merges every model
it lists, base_model included; without base_model the first model stands in the base role."""

from __future__ import annotations

from .core.recipes import linear_divisor, weights_recipe
from .core.spec import MODELS, Contract, Defaults, MergekitForm, MethodSpec


def recipe(native, s, tensor_name: str, count: int, passes):
    return linear_divisor(weights_recipe(native.Recipe(), MODELS, s.w_domain, s.w_align), s)


def set_recipe(native, s, tensor_name: str, count: int, passes):
    recipe = native.SetRecipe()
    recipe.kind = MODELS
    for m, weight in enumerate(s.weights):
        recipe.term(m).weight = weight
    return linear_divisor(recipe, s)


def f64(s, b, *models):
    """(w_b base + Σ w_m model_m) [/ (w_b + Σw) when normalized], in model order."""
    merged, total = s.w_base * b, s.w_base
    for w, m in zip(s.weights, models):
        merged, total = merged + w * m, total + w
    return merged / total if s.normalize else merged


def settings_problems(s, where: str):
    if s.normalize and s.w_base + sum(s.weights) == 0:
        return [f"{where}: the weights sum to 0, so linear cannot normalize them: set "
                "normalize false (--no-normalize) or change the weights"]
    return []


def config_roles(base, folders, others, problem):
    """mergekit merges base_model too: the first model (base_model, else the first listed)
    takes the base role with its own weight; one model alone is (w·model)/w, that model."""
    first = base if base is not None else (folders[0] if folders else None)
    others = [f for f in folders if first is None or f.resolve() != first.resolve()]
    if first is not None and not others:
        return {"base": first, "domain": first, "aligned": first}
    return first, others


def in_mergekit(s, group):
    """mergekit's linear: Σ w·x over every model in its order (base_model included), each
    term added with addcmul in float32 (float64 for float64 inputs), divided by Σw when
    normalized, rounded to the inputs' dtype."""
    import torch

    from .core.in_torch import float_of

    first = group.entries[0]
    dtype = float_of(first)
    weights = torch.tensor([list(group.entry_weights)], dtype=dtype)
    shape = (1,) * (first.dim() + 1)  # mergekit's batch of one tensor, then the tensor's axes
    result = torch.zeros_like(first.unsqueeze(0), dtype=dtype)
    for x, w in zip(group.entries, weights.unbind(1)):
        result.addcmul_(x.unsqueeze(0), w.reshape(shape))
    if s.normalize:
        result.div_(weights.sum(dim=1).reshape(shape))
    return result[0].to(first.dtype)


def oracle(s, tensor_name: str, b, xs):
    from .core import oracle

    coefficients = (s.w_base, *s.weights)
    return oracle.combination(coefficients, (b, *xs),
                              sum(coefficients) if s.normalize else 1.0)


METHODS = (MethodSpec(
    "linear", "(w_b·base + w_d·domain + w_a·aligned) / Σw", ("weight", "normalize"),
    Defaults(normalize=True), Contract(on_sets=True, weighs_base=True), recipe=recipe,
    set_recipe=set_recipe, f64=f64, settings_problems=settings_problems, oracle=oracle,
    mergekit=MergekitForm(needs_base=False, needs_weights=True, config_roles=config_roles,
                          registers="ours", arithmetic=in_mergekit),
    parameters_doc="weights, `--base-weight` (0), `--normalize` (on)"),)
