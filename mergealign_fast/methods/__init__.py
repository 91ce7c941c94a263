"""Merge methods: one module per method or family in this folder, found by this registry.

To add a method, add `methods/<name>.py` with a `METHODS` tuple of `MethodSpec`s
(methods/core/spec.py says what a spec holds; a parameter no other method takes is declared
there too, in `own_parameters`) and its tests; everything else — the command line's `--method`
choices and flags, mergekit config checks, the mergekit backend's registrations, the merge
routes, docs/methods.md (`python -m mergealign_fast.tools.method_table > docs/methods.md`) —
reads the registry.  Subfolders hold what the methods share: `core/` (the parameter model, the
native reduction passes and recipe pieces, the coefficient formulas, the float64 oracle's
pieces) and `windows/` (numpy window by window merges).

Method modules are imported on first use (none of them loads numpy).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, Tuple

from .core.spec import MethodSpec

_found: Dict[str, MethodSpec] = {}


def _discover() -> Dict[str, MethodSpec]:
    """Every spec of every module of this folder, in the modules' name order."""
    if not _found:
        for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg):
            for spec in importlib.import_module(f".{module}", __name__).METHODS:
                if spec.name in _found:
                    raise RuntimeError(f"merge method {spec.name!r} is defined twice")
                _found[spec.name] = spec
    return _found


def specs() -> Tuple[MethodSpec, ...]:
    return tuple(_discover().values())


def names() -> Tuple[str, ...]:
    return tuple(_discover())


def is_method(name) -> bool:
    return isinstance(name, str) and name in _discover()


def get(name: str) -> MethodSpec:
    """The spec of a method; ValueError naming the choices for an unknown one."""
    found = _discover().get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown merge method {name!r}: choose one of {', '.join(names())}")
    return found


def set_names() -> Tuple[str, ...]:
    """The methods defined for a base and any number of models."""
    return tuple(s.name for s in specs() if s.contract.on_sets)
