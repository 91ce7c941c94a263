"""NearSwap (mergekit's): w·domain + (1 − w)·base, w = clamp(t / |domain − base|, 0, 1) per
element — the domain model's value where the two are within t, else a step of t toward it
(the aligned model is not used)."""

from __future__ import annotations

from .core.spec import NEAR_SWAP, MergekitForm, MethodSpec
from .slerp import toward_one_other


def recipe(native, s, tensor_name: str, count: int, passes):
    recipe = native.Recipe()
    recipe.kind = NEAR_SWAP
    recipe.swap_t = s.t
    return recipe


def config_roles(base, folders, others, problem):
    return toward_one_other(base, folders, others, problem, "nearswap")


def backend(group, merge):
    return merge.trio(group.base, group.others[0], group.base, "nearswap", t=group.shared["t"])


def in_mergekit(s, group):
    """mergekit's NearSwap in the inputs' dtype (|a − b| clamped at 1e-6)."""
    import torch

    from .core.geometry import NEAR_SWAP_EPS

    a, b = group.base, group.others[0]
    weight = (s.t / torch.abs(a - b).clamp(min=NEAR_SWAP_EPS)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def oracle(s, tensor_name: str, b, xs):
    from .core import oracle

    return oracle.nearswap_ref(s.t, b, xs[0])


METHODS = (MethodSpec(
    "nearswap", "w·domain + (1−w)·base, w = clamp(t / \\|domain − base\\|, 0, 1): the domain "
    "value where the two are within t, else a step of t toward it (mergekit's NearSwap, bit "
    "for bit in fp32: mergekit computes a bf16 config in bf16; aligned unused)",
    ("t",), recipe=recipe, oracle=oracle,
    mergekit=MergekitForm(config_roles=config_roles, registers="theirs", backend=backend,
                          arithmetic=in_mergekit),
    parameters_doc="`--t`"),)
