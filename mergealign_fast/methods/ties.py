"""TIES: trim each task vector to its largest `density`·n magnitudes, elect each element's
sign by the sum of the weighted terms, and average the terms that agree (divided by their
weights).  The threshold comes from two native histogram passes, not a sort (core/recipes.py)."""

from __future__ import annotations

from .core.generalized import vectors_merge
from .core.spec import KEEP_LARGEST, Contract, Defaults, MergekitForm, MethodSpec

def in_mergekit(s, group):
    from .core import in_torch

    return in_torch.generalized(s, group, in_torch.trimmed_by("largest"), consensus=True)


VECTOR_PARAMETERS = ("weight", "density", "lambda", "normalize", "rescale")

METHODS = (MethodSpec(
    "ties", "trim each τ to its largest `density`·n magnitudes, elect the sign of the sum of "
    "the weighted terms, average the agreeing terms (÷ their weights)", VECTOR_PARAMETERS,
    Defaults(normalize=True, sparsify=KEEP_LARGEST, sign_election=True),
    Contract(on_sets=True), **vectors_merge(), mergekit=MergekitForm(
        needs_weights=True, registers="ours", arithmetic=in_mergekit),
    parameters_doc="weights, `--density` (1), `--lambda`, `--normalize` (on), `--rescale` "
    "(none)"),)
