"""How one tensor is merged — its route — chosen in one place for the merge of model folders
(engine/loop.py) and the in-memory API (engine/in_memory.py):

  copy      a tensor the kernels cannot merge whose bytes are the same in every model
  f64       F64 in every model and not the same: merged in float64 (writers/f64.py)
  vectors   vector by vector (methods/windows/per_vector.py): a method's --vectors rows/columns
  windows   window by window in numpy (the method's merge_windows: SCE, DELLA, RAM, Fusion)
  recipe    the native recipe kernel, after the reduction passes the method needs
  mergekit  --compute-dtype mergekit: whole, in torch, as mergekit computes the method
            (writers/mergekit_arithmetic.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from ..methods.core.spec import WINDOWS

COPY, F64, BY_VECTORS, IN_WINDOWS, RECIPE = "copy", "f64", "vectors", "windows", "recipe"
IN_MERGEKIT = "mergekit"


def route_of(settings, shape: Sequence[int], copied: bool = False,
             in_f64: bool = False, in_mergekit: bool = False) -> str:
    """The route of a tensor of `shape` under resolved settings (None for a copied tensor);
    `in_mergekit`: the merge's compute dtype is mergekit's."""
    if copied:
        return COPY
    if in_f64:
        return F64
    if in_mergekit:
        return IN_MERGEKIT
    if settings.by_vectors(shape):
        return BY_VECTORS
    return IN_WINDOWS if settings.spec.route == WINDOWS else RECIPE


def planned_route(tensor, settings: Optional[object], options) -> str:
    """The route of a planned tensor (plan.PlannedTensor) in a merge with `options`."""
    return route_of(settings, tensor.shape, tensor.is_copied, tensor.merged_in_f64,
                    options.compute_dtype == "mergekit")


@dataclass(frozen=True)
class WindowedTensor:
    """What a method merged in numpy windows reads of its tensor (a PlannedTensor has the
    same): its name (which keys random masks), shape, element count, and its sources (base
    first, then each model; only their number is read)."""

    name: str
    shape: Tuple[int, ...]
    count: int
    sources: Tuple


def window_elements(settings, shape: Sequence[int]) -> int:
    """Elements of one window of a tensor merged vector by vector or in numpy windows."""
    if settings.by_vectors(shape):
        from ..methods.windows import per_vector

        return per_vector.window_elements(shape, settings.vectors)
    return settings.spec.window_elements(shape)
