"""Generalized task arithmetic (mergekit's family of TIES, DARE, Model Breadcrumbs and task
arithmetic itself): the MethodSpec fields its members share — the recipe of the trio and of a
model set (core/recipes.py's vectors_recipe) and the float64 oracle."""

from __future__ import annotations

from .recipes import vectors_recipe


def _vectors_trio(native, s, tensor_name: str, count: int, passes):
    recipe = native.Recipe()
    return vectors_recipe(recipe, [recipe.domain, recipe.align], s, tensor_name, count, passes)


def _vectors_set(native, s, tensor_name: str, count: int, passes):
    recipe = native.SetRecipe()
    terms = [recipe.term(m) for m in range(len(s.roles))]
    return vectors_recipe(recipe, terms, s, tensor_name, count, passes)


def _vectors_oracle(s, tensor_name: str, b, xs):
    from . import oracle

    return oracle.vectors_ref(s, tensor_name, b, xs)


def vectors_merge() -> dict:
    """The MethodSpec fields of a generalized task arithmetic method (TIES, DARE, Model
    Breadcrumbs): the recipe of the trio and of a model set, and the float64 oracle."""
    return {"recipe": _vectors_trio, "set_recipe": _vectors_set, "oracle": _vectors_oracle}
