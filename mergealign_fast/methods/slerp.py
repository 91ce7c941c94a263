"""SLERP: spherical interpolation per tensor with mergekit's formula (the angle of the
normalised tensors, a linear blend when |cos| > 0.9995).  `slerp`: of the two models, aligned
at t = 0 and domain at t = 1 (a config's t runs from base_model to the other model);
`slerp_vectors`: base + slerp(τ_a, τ_d, t)."""

from __future__ import annotations

from .core.geometry import SLERP_DOT_THRESHOLD, SLERP_NORM_EPS, slerp_coefficients
from .core.recipes import weights_recipe
from .core.spec import MODELS, TASK_ARITHMETIC, MergekitForm, MethodSpec


def slerp_recipe(native, s, tensor_name: str, count: int, passes):
    dd, aa, da = passes.vector_stats(models=True)
    c_a, c_d = slerp_coefficients(s.t, aa, dd, da)
    return weights_recipe(native.Recipe(), MODELS, c_d, c_a)


def slerp_vectors_recipe(native, s, tensor_name: str, count: int, passes):
    dd, aa, da = passes.vector_stats(models=False)
    c_a, c_d = slerp_coefficients(s.t, aa, dd, da)
    return weights_recipe(native.Recipe(), TASK_ARITHMETIC, c_d, c_a)


# mergekit's slerp sums norms and dot products over slices of this many elements (its bound
# on scratch memory).
MERGEKIT_SLICE = 1 << 20


def in_mergekit(s, group):
    """mergekit's slerp from base_model (t = 0) to the other model, in float32 (float64 for
    float64 inputs), each sum over slices of MERGEKIT_SLICE elements; its result in the
    inputs' dtype."""
    import torch

    from .core.in_torch import float_of

    v0, v1 = group.base, group.others[0]
    dtype = float_of(v0)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor([s.t], dtype=dtype).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    slices = range(0, a.shape[1], MERGEKIT_SLICE)

    def part(x, start):
        return x[:, start:start + MERGEKIT_SLICE].to(dtype)

    def norm(x):
        parts = [torch.linalg.vector_norm(part(x, i), dim=1, keepdim=True) for i in slices]
        found = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(found > SLERP_NORM_EPS, found, 1)

    norm_a, norm_b = norm(a), norm(b)
    dot = torch.stack([(part(a, i) / norm_a * (part(b, i) / norm_b)).sum(dim=1, keepdim=True)
                       for i in slices]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    c_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    c_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for i in slices:
        result[:, i:i + MERGEKIT_SLICE] = c_a * part(a, i) + c_b * part(b, i)
    return result.reshape(v0.shape)


def toward_one_other(base, folders, others, problem, name):
    """From base_model (our aligned role, t = 0) toward one other model (domain, t = 1)."""
    if len(others) != 1:
        problem(f"{name} takes base_model and exactly one other model (got {len(others)} "
                "others)")
        return None
    return {"base": base, "domain": others[0], "aligned": base}


def _slerp_roles(base, folders, others, problem):
    return toward_one_other(base, folders, others, problem, "slerp")


def _slerp_oracle(s, tensor_name: str, b, xs):
    from .core import oracle

    d, a = xs
    c_a, c_d = oracle.slerp_ref(s.t, a, d)
    return oracle.combination((0.0, c_d, c_a), (b, d, a), 1.0)


def _slerp_vectors_oracle(s, tensor_name: str, b, xs):
    from .core import oracle

    td, ta = xs[0] - b, xs[1] - b
    c_a, c_d = oracle.slerp_ref(s.t, ta, td)
    return oracle.task_vector_sum(b, (c_d, c_a), (td, ta))


METHODS = (
    MethodSpec("slerp", "spherical interpolation of the two models, per tensor: aligned at "
               "t=0, domain at t=1", ("t",), recipe=slerp_recipe, oracle=_slerp_oracle,
               mergekit=MergekitForm(placeholder_base=True, config_roles=_slerp_roles,
                                     registers="ours", arithmetic=in_mergekit),
               parameters_doc="`--t` (0.5)"),
    MethodSpec("slerp_vectors", "base + slerp(τ_a, τ_d, t)", ("t",),
               recipe=slerp_vectors_recipe, oracle=_slerp_vectors_oracle,
               parameters_doc="`--t`"),
)
