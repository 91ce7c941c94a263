"""Consensus merging (TALL masks, arXiv 2405.07813; mergekitty's `consensus_ta` and
`consensus_ties`) over a base and any number of models: merge the task vectors by task
arithmetic or TIES into τ_MTL, then keep an element of τ_MTL only where at least `k` models
agree with it — model m agrees where |τ_m| > λ·|τ_MTL − τ_m| (its TALL mask).  Elements only
one model changed (selfish weights) or none needs (catastrophic ones) are dropped.  Numpy,
window by window, on the CPU path (methods/windows/consensus.py)."""

from __future__ import annotations

from .core.spec import KEEP_LARGEST, Contract, Defaults, MergekitForm, MethodSpec, Parameter, \
    in_windows

# mergekitty's `k`: the fewest TALL masks that keep an element (1: any model's).
K = Parameter("k", "count", (), "consensus: the fewest models whose TALL masks must hold an "
              "element for it to be kept (default 1)", (("consensus_k", ""),), default=1)
TALL_LAMBDA = "the TALL masks' λ: model m holds an element where |τ_m| > λ·|τ_MTL − τ_m| " \
              "(default 1)"


def _spec(name: str, summary: str, parameters, defaults: Defaults, doc: str) -> MethodSpec:
    return MethodSpec(
        name, summary, parameters + ("lambda", "k"), defaults, Contract(on_sets=True),
        **in_windows("consensus"), own_parameters=(K,), meanings={"lambda": TALL_LAMBDA},
        mergekit=MergekitForm(needs_weights=True), parameters_doc=doc)


METHODS = (
    _spec("consensus_ta", "task arithmetic's τ_MTL = Σ w_m τ_m, kept where at least `k` "
          "models' TALL masks (|τ_m| > λ·|τ_MTL − τ_m|) hold it; numpy window by window on the "
          "CPU", ("weight", "normalize"), Defaults(),
          "weights, `--lambda` (1: the TALL masks' λ), `--consensus-k` (1), `--normalize` "
          "(off)"),
    _spec("consensus_ties", "TIES' τ_MTL (trim to `density`, elect signs, average the "
          "agreeing terms), kept where at least `k` models' TALL masks hold it; numpy window by "
          "window on the CPU", ("weight", "density", "normalize", "rescale"),
          Defaults(normalize=True, sparsify=KEEP_LARGEST, sign_election=True),
          "weights, `--density` (1), `--lambda` (1: the TALL masks' λ), `--consensus-k` (1), "
          "`--normalize` (on), `--rescale` (none)"),
)
