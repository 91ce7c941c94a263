"""DARE: drop each task-vector element with probability 1 − density, rescale the kept ones
(l1 by default, mergekit's), then a weighted sum (dare_linear) or TIES' sign election
(dare_ties).  The drop is a counter-based draw keyed by (seed, tensor, model, element): the
same merge on any thread count or window size."""

from __future__ import annotations

from .core.generalized import vectors_merge
from .core.spec import KEEP_RANDOM, Contract, Defaults, MergekitForm, MethodSpec
from .ties import VECTOR_PARAMETERS

# Why mergekit's DARE and DELLA tensors cannot be reproduced (MergekitForm.unreproducible).
RANDOM_MASKS = ("mergekit draws its drop masks from torch's global generator, in the order its "
                "executor happens to reach the tensors: no run reproduces them")

METHODS = tuple(MethodSpec(
    name, summary, VECTOR_PARAMETERS + ("seed",),
    Defaults(rescale="l1", sparsify=KEEP_RANDOM, sign_election=elects),
    Contract(on_sets=True), **vectors_merge(),
    mergekit=MergekitForm(needs_weights=True, registers="ours",
                          unreproducible=RANDOM_MASKS), parameters_doc=doc)
    for name, summary, elects, doc in (
        ("dare_linear", "drop each τ element with probability 1−density, rescale, weighted sum",
         False, "weights, `--density`, `--seed` (0), `--rescale` (l1), `--lambda`, "
         "`--normalize` (off)"),
        ("dare_ties", "DARE's drop and rescale, then TIES' sign election", True,
         "as dare_linear")))
