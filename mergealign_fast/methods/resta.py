"""RESTA: domain + β·τ_a — the alignment vector added back to the whole expert (β is the
alignment weight), optionally with DARE on τ_d (its density; rescaled by 1/p by default)."""

from __future__ import annotations

from dataclasses import replace

from .core.recipes import vectors_recipe
from .core.spec import KEEP_RANDOM, Defaults, MethodSpec


def _kept_whole(s):
    """RESTA keeps the whole expert (weight 1) and its whole alignment vector (density 1)."""
    return replace(s, weights=(1.0, s.weights[1]), densities=(s.densities[0], 1.0))


def recipe(native, s, tensor_name: str, count: int, passes):
    recipe = native.Recipe()
    return vectors_recipe(recipe, [recipe.domain, recipe.align], _kept_whole(s), tensor_name,
                          count, passes)


def flag_problems(given):
    if given.get("domain_weight") is not None:
        return ["--domain-weight does not apply to resta: the expert is kept whole "
                "(--align-weight is β)"]
    return []


def oracle(s, tensor_name: str, b, xs):
    from .core import oracle

    return oracle.vectors_ref(_kept_whole(s), tensor_name, b, xs)


METHODS = (MethodSpec(
    "resta", "domain + β·τ_a (β = `--align-weight`), optionally DARE on τ_d",
    ("weight", "density", "rescale", "seed"),
    Defaults(rescale="inverse_density", sparsify=KEEP_RANDOM), recipe=recipe,
    flag_problems=flag_problems, oracle=oracle,
    parameters_doc="`--align-weight`, `--density`, `--seed`, `--rescale` (inverse_density)"),)
