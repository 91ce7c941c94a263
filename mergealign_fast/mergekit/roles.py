"""Which model of a mergekit config takes which of the engine's roles.

One or two models besides the base map onto the trio (base, domain, aligned): base_model is the
base and the other models are the domain expert then the aligned model (one other model: the
aligned role repeats the base, so its vector is zero).  More than two make a model set (the
base, then "model 1", "model 2", ... in the order listed) for the methods defined for any
number of models.  A method whose models map otherwise (linear merges base_model too, slerp
runs from base_model toward one other model, nuslerp's t runs from the first model to the
second, ...) says so in its spec's MergekitForm.config_roles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..methods.core.spec import SET_ROLE, TRIO_MODELS, MethodSpec

# The models besides the base that the trio holds.
TRIO_OTHERS = len(TRIO_MODELS)


def config_roles(spec: MethodSpec, base: Optional[Path], folders: List[Path],
                 problem: Callable[[str], None]) -> Optional[Dict[str, Path]]:
    """{role: folder} of a config's models (`folders` as listed), or None after reporting a
    problem."""
    form = spec.mergekit
    if form.needs_base and base is None:
        problem(f"{spec.name} needs `base_model`")
        return None
    others = [f for f in folders if base is None or f.resolve() != base.resolve()]
    if form.config_roles is not None:
        mapped = form.config_roles(base, folders, others, problem)
        if mapped is None or isinstance(mapped, dict):
            return mapped
        base, others = mapped
    if base is not None and len(others) > TRIO_OTHERS and spec.contract.on_sets:
        return {"base": base, **{SET_ROLE.format(i + 1): f for i, f in enumerate(others)}}
    if base is None or not 1 <= len(others) <= TRIO_OTHERS:
        problem(f"{spec.name}: the engine merges a base and one or two other models (got "
                f"{len(others)} besides the base)")
        return None
    return {"base": base, "domain": others[0],
            "aligned": others[1] if len(others) == 2 else base}
