"""Model Stock (mergekit's): (1 − t)·base + t·mean(models), t = n·c/(1 + (n − 1)·c) from the mean
cosine c of the task vectors' pairs; per tensor, or per row for two models (`--vectors rows`,
mergekit's filter_wise)."""

from __future__ import annotations

from .core.geometry import MODEL_STOCK_EPS, model_stock_t, pair_cosine
from .core.recipes import stock_recipe
from .core.spec import ByVectors, Contract, MergekitForm, MethodSpec


def recipe(native, s, tensor_name: str, count: int, passes):
    recipe = native.Recipe()
    t = model_stock_t([pair_cosine(*passes.vector_stats(models=False))], 2)
    return stock_recipe(recipe, [recipe.domain, recipe.align], t)


def set_recipe(native, s, tensor_name: str, count: int, passes):
    recipe = native.SetRecipe()
    terms = [recipe.term(m) for m in range(len(s.roles))]
    return stock_recipe(recipe, terms, model_stock_t(passes.cosines(), len(terms)))


def vector_coefficients(s, dd: float, aa: float, da: float):
    t = model_stock_t([pair_cosine(dd, aa, da)], 2)
    return 1.0 - t, t / 2, t / 2


def config_roles(base, folders, others, problem):
    if len(others) < 2:
        problem(f"model_stock takes base_model and at least two other models (got "
                f"{len(others)})")
        return None
    return base, others


def vectors_of(options) -> str:
    return "rows" if options.get("filter_wise") else "tensor"


def backend(group, merge):
    others, vectors = group.others, vectors_of(group.shared)
    if len(others) <= 2:
        return merge.trio(group.base, others[0], others[-1], "model_stock", vectors=vectors)
    if vectors != "tensor":
        raise ValueError(f"{group.name}: filter-wise Model Stock merges two models besides the "
                         f"base here (got {len(others)})")
    return merge.set(group.base, others, "model_stock")


def in_mergekit(s, group):
    """mergekit's Model Stock in the inputs' dtype: the mean cosine of the τ pairs (norms
    clamped at 1e-6), t = n·c/(1 + (n−1)·c) (0 where the denominator is below 1e-6), per
    tensor or per row (filter_wise)."""
    import torch

    w0, ws = group.base, list(group.others)
    if s.vectors == "rows":
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=MODEL_STOCK_EPS)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < MODEL_STOCK_EPS
    t = torch.where(singular, torch.zeros_like(cos),
                    (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(group.base.shape)


def oracle(s, tensor_name: str, b, xs):
    from .core import oracle

    return oracle.model_stock_ref(b, xs)


METHODS = (MethodSpec(
    "model_stock", "(1−t)·base + t·mean(domain, aligned), t = 2c/(1 + c) from the cosine c of "
    "τ_d and τ_a, per tensor or per row (`--vectors rows`) (Model Stock)", (),
    contract=Contract(on_sets=True, fewest=2), recipe=recipe, set_recipe=set_recipe,
    vectors=ByVectors(("tensor", "rows"), False, "models", vector_coefficients), oracle=oracle,
    mergekit=MergekitForm(shape_options=("filter_wise",), config_roles=config_roles,
                          vectors_of=vectors_of, registers="theirs", backend=backend,
                          arithmetic=in_mergekit),
    parameters_doc="`--vectors`"),)
