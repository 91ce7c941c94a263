"""ChipAlign: ‖aligned‖^(1−t)·‖domain‖^t · slerp(aligned/‖aligned‖, domain/‖domain‖, t), per
tensor — the geodesic between the unit-norm models, rescaled by their norms' geometric mean
(a tensor without direction gives the linear blend).  In a config: the first model is the
domain expert, the second the aligned model; no base."""

from __future__ import annotations

from .core.geometry import chipalign_coefficients
from .core.recipes import weights_recipe
from .core.spec import MODELS, MergekitForm, MethodSpec


def recipe(native, s, tensor_name: str, count: int, passes):
    dd, aa, da = passes.vector_stats(models=True)
    c_d, c_a = chipalign_coefficients(s.t, dd, aa, da)
    return weights_recipe(native.Recipe(), MODELS, c_d, c_a)


def config_roles(base, folders, others, problem):
    if len(folders) != 2:
        problem(f"chipalign takes two models, domain then aligned (got {len(folders)})")
        return None
    return {"base": folders[1], "domain": folders[0], "aligned": folders[1]}


def oracle(s, tensor_name: str, b, xs):
    from .core import oracle

    d, a = xs
    c_d, c_a = oracle.chipalign_ref(s.t, d, a)
    return oracle.combination((0.0, c_d, c_a), (b, d, a), 1.0)


METHODS = (MethodSpec(
    "chipalign", "‖aligned‖^(1−t)·‖domain‖^t · slerp(aligned/‖aligned‖, domain/‖domain‖, t), "
    "per tensor", ("t",), recipe=recipe, oracle=oracle,
    mergekit=MergekitForm(needs_base=False, placeholder_base=True, config_roles=config_roles),
    parameters_doc="`--t`"),)
