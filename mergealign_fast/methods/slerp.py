"""SLERP: spherical interpolation per tensor with mergekit's formula (the angle of the
normalised tensors, a linear blend when |cos| > 0.9995).  `slerp`: of the two models, aligned
at t = 0 and domain at t = 1 (a config's t runs from base_model to the other model);
`slerp_vectors`: base + slerp(τ_a, τ_d, t)."""

from __future__ import annotations

from .core.geometry import slerp_coefficients
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
                                     registers="ours"), parameters_doc="`--t` (0.5)"),
    MethodSpec("slerp_vectors", "base + slerp(τ_a, τ_d, t)", ("t",),
               recipe=slerp_vectors_recipe, oracle=_slerp_vectors_oracle,
               parameters_doc="`--t`"),
)
