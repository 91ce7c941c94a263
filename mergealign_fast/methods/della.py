"""DELLA (mergekit's `della` and `della_linear`, arXiv 2406.11617) over a base and any number of
models: each τ element kept with a probability from density − ε (its line's smallest |τ|) to
density + ε (the largest), l1 rescale, weighted sum; `della` with TIES' sign election and
division by the agreeing weights.  The drop is DARE's counter-based draw (the same merge on any
window or thread count).  Numpy, window by window, on the CPU path (methods/windows/della.py)."""

from __future__ import annotations

from .core.spec import Contract, Defaults, MergekitForm, MethodSpec, in_windows
from .dare import RANDOM_MASKS
from .ties import VECTOR_PARAMETERS



def settings_problems(s, where: str):
    """A probability band density ± ε inside (0, 1) wherever the density drops anything
    (mergekit refuses the merge otherwise), rescaled as mergekit can."""
    problems = []
    if s.rescale == "inverse_density":
        problems.append(f"{where}: rescale must be l1 or none for {s.name} (got "
                        "inverse_density)")
    return problems + [f"{where}: {role} density {d} ± epsilon {e} must stay inside (0, 1)"
                       for role, d, e in zip(s.roles, s.densities, s.epsilons)
                       if 0 < d < 1 and not (d - e > 0 and d + e < 1)]


METHODS = tuple(MethodSpec(
    name, summary, VECTOR_PARAMETERS + ("epsilon", "seed"),
    # mergekit's defaults: della normalizes and rescales (l1), ε = 0.15; della_linear rescales.
    Defaults(normalize=elects, rescale="l1", sign_election=elects, epsilon=0.15),
    Contract(on_sets=True), **in_windows("della"), per_model=("epsilon",),
    settings_problems=settings_problems,
    mergekit=MergekitForm(needs_weights=True, registers="theirs",
                          unreproducible=RANDOM_MASKS), parameters_doc=doc)
    for name, summary, elects, doc in (
        ("della", "DELLA (mergekit's): each τ element kept with a probability from density − ε "
         "(its row's smallest \\|τ\\|) to density + ε (the largest), l1 rescale, TIES' sign "
         "election and division by the agreeing weights; numpy window by window", True,
         "weights, `--density` (1), `--epsilon` (0.15), `--seed`, `--lambda`, `--normalize` "
         "(on), `--rescale` (l1 or none)"),
        ("della_linear", "della's drop and rescale, then the weighted sum (no election)", False,
         "as della, `--normalize` (off)")))
