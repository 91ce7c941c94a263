"""nuslerp (mergekit's): base + slerp(τ_a, τ_d, t) with t = w_d/(w_d + w_a) — `nuslerp_models`:
slerp(aligned, domain, t), mergekit's nuslerp without a base_model — with nuslerp's own
epsilons (norms clamped up to 1e-7, the linear blend only when exactly collinear); per tensor,
or per row or column (`--vectors`; mergekit's nuslerp_flatten false, nuslerp_row_wise)."""

from __future__ import annotations

from .core.geometry import (NUSLERP_EPS, NUSLERP_NORM_EPS, NUSLERP_WEIGHT_EPS,
                            nuslerp_coefficients, nuslerp_t)
from .core.recipes import weights_recipe
from .core.spec import MODELS, TASK_ARITHMETIC, VECTOR_MODES, ByVectors, MergekitForm, MethodSpec


def _coefficients(s, passes, on_models: bool):
    dd, aa, da = passes.vector_stats(models=on_models)
    return nuslerp_coefficients(nuslerp_t(s.w_domain, s.w_align), aa, dd, da)


def recipe(native, s, tensor_name: str, count: int, passes):
    c_a, c_d = _coefficients(s, passes, on_models=False)
    return weights_recipe(native.Recipe(), TASK_ARITHMETIC, c_d, c_a)


def models_recipe(native, s, tensor_name: str, count: int, passes):
    c_a, c_d = _coefficients(s, passes, on_models=True)
    return weights_recipe(native.Recipe(), MODELS, c_d, c_a)


def vector_coefficients(base_coefficient: float):
    """(c_b, c_d, c_a) of one vector from its (Σd², Σa², Σd·a)."""
    def coefficients(s, dd: float, aa: float, da: float):
        c_a, c_d = nuslerp_coefficients(nuslerp_t(s.w_domain, s.w_align), aa, dd, da)
        return base_coefficient, c_d, c_a
    return coefficients


def config_roles(base, folders, others, problem):
    """Two models besides an optional base_model; t runs from the first to the second: our
    aligned to our domain (without base_model the first stands in the base role)."""
    if len(others) != 2:
        problem(f"nuslerp takes exactly two models besides an optional base_model (got "
                f"{len(others)})")
        return None
    return {"base": base or others[0], "domain": others[1], "aligned": others[0]}


def vectors_of(options) -> str:
    if options.get("nuslerp_flatten", True):
        return "tensor"
    return "columns" if options.get("nuslerp_row_wise") else "rows"


def backend(group, merge):
    """t runs from the first model to the second: our aligned to our domain."""
    (first, second), (w_first, w_second) = group.others, [p["weight"] for p in group.per_model]
    vectors = vectors_of(group.shared)
    if group.base is None:  # over the models themselves: the first stands in the base role
        return merge.trio(first, second, first, "nuslerp_models", w_second, w_first,
                          vectors=vectors)
    return merge.trio(group.base, second, first, "nuslerp", w_second, w_first, vectors=vectors)


def in_mergekit(s, group):
    """mergekit's nuslerp in the inputs' dtype: t = w_2/(w_1 + w_2) (0.5 when they sum to
    ~0) from the first model toward the second, on their task vectors when the config has a
    base_model, per tensor (flatten), row or column."""
    import torch

    first, second = group.others
    w1, w2 = group.other_weights
    total = w1 + w2
    t = 0.5 if abs(total) < NUSLERP_WEIGHT_EPS else w2 / total
    if group.base is None:
        return _mergekit_nuslerp(torch, t, first, second, s.vectors)
    base = group.base
    return base + _mergekit_nuslerp(torch, t, first - base, second - base, s.vectors)


def _mergekit_nuslerp(torch, t: float, v0, v1, vectors: str):
    shape = v0.shape
    if vectors == "tensor":
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif vectors == "columns":
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NUSLERP_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if vectors == "columns":
        result = result.transpose(0, -1)
    return result.reshape(shape)


def _oracle(on_models: bool):
    def oracle(s, tensor_name: str, b, xs):
        from .core import oracle

        d, a = xs
        if on_models:
            c_a, c_d = oracle.nuslerp_ref(s.w_domain, s.w_align, a, d)
            return oracle.combination((0.0, c_d, c_a), (b, d, a), 1.0)
        td, ta = d - b, a - b
        c_a, c_d = oracle.nuslerp_ref(s.w_domain, s.w_align, ta, td)
        return oracle.task_vector_sum(b, (c_d, c_a), (td, ta))
    return oracle


METHODS = (
    MethodSpec("nuslerp", "base + slerp(τ_a, τ_d, t) with t = w_d/(w_d + w_a), per tensor, or "
               "per row or column (`--vectors`) — mergekit's nuslerp with a base_model",
               ("weight",), recipe=recipe,
               vectors=ByVectors(VECTOR_MODES, False, "task_vectors", vector_coefficients(1.0)),
               oracle=_oracle(False), mergekit=MergekitForm(
                   needs_base=False, needs_weights=True, placeholder_base=True,
                   shape_options=("nuslerp_flatten", "nuslerp_row_wise"),
                   config_roles=config_roles, without_base="nuslerp_models",
                   vectors_of=vectors_of, registers="theirs", backend=backend,
                   arithmetic=in_mergekit),
               parameters_doc="weights, `--vectors`"),
    MethodSpec("nuslerp_models", "slerp(aligned, domain, t), t as for nuslerp — mergekit's "
               "nuslerp without one", ("weight",), recipe=models_recipe,
               vectors=ByVectors(VECTOR_MODES, True, "models_only", vector_coefficients(0.0)),
               oracle=_oracle(True),
               mergekit=MergekitForm(needs_base=False, arithmetic=in_mergekit),
               parameters_doc="weights"),
)
