"""Model Breadcrumbs: each task vector keeps a band of its magnitudes — its largest γ·n and
its smallest are dropped, int(density·n) kept, as mergekit counts them — then a weighted sum
(breadcrumbs) or TIES' sign election (breadcrumbs_ties)."""

from __future__ import annotations

from .core.generalized import vectors_merge
from .core.spec import KEEP_BAND, Contract, Defaults, MergekitForm, MethodSpec
from .ties import VECTOR_PARAMETERS


def in_mergekit(elects: bool):
    def merged(s, group):
        from .core import in_torch

        return in_torch.generalized(s, group, in_torch.trimmed_by("band"), consensus=elects)
    return merged


METHODS = tuple(MethodSpec(
    name, summary, VECTOR_PARAMETERS + ("gamma",),
    Defaults(sparsify=KEEP_BAND, sign_election=elects), Contract(on_sets=True),
    **vectors_merge(), mergekit=MergekitForm(needs_weights=True, registers="ours",
                                            arithmetic=in_mergekit(elects)),
    parameters_doc=doc)
    for name, summary, elects, doc in (
        ("breadcrumbs", "each τ keeps a band of its magnitudes: its largest `gamma`·n and its "
         "smallest are dropped, int(density·n) kept (Model Breadcrumbs); weighted sum", False,
         "weights, `--density` (1), `--gamma` (0.01), `--lambda`, `--normalize` (off), "
         "`--rescale` (none)"),
        ("breadcrumbs_ties", "breadcrumbs' band, then TIES' sign election", True,
         "as breadcrumbs")))
