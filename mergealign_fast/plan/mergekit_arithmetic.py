"""What --compute-dtype mergekit changes in a plan: the dtype each merged tensor is computed in
(mergekit's: the config's `dtype`, else the inputs' promoted dtype), the dtype it is written
in (`out_dtype`, else the method's result dtype: float32 where a float32 mask enters
mergekit's product), and what cannot run that way — said before anything is read."""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List

from ..dtypes import DType
from .model import PlannedTensor
from .options import MergeOptions


def compute_dtype_of(options: MergeOptions, tensor: PlannedTensor) -> DType:
    """The dtype mergekit computes `tensor` in."""
    if options.input_dtype is not None:
        return options.input_dtype
    stored = {tensor.rows.dtype} if tensor.rows is not None \
        else {DType[loc.streamed_dtype] for loc in tensor.sources}
    # torch promotes any mix of bf16, fp16 and fp32 to fp32.
    return stored.pop() if len(stored) == 1 else DType.F32


def _result_dtype(options: MergeOptions, tensor: PlannedTensor, spec) -> DType:
    if options.out_dtype is not None:
        return options.out_dtype
    compute = compute_dtype_of(options, tensor)
    if spec.mergekit.writes_f32 and compute.itemsize < DType.F32.itemsize:
        return DType.F32
    return compute


def with_mergekit_dtypes(tensors: List[PlannedTensor], settings: Dict[str, object],
                         options: MergeOptions) -> List[PlannedTensor]:
    """The merged tensors written in the dtype mergekit writes them in."""
    if options.compute_dtype != "mergekit":
        return tensors
    return [replace(t, out_dtype=_result_dtype(options, t, settings[t.name].spec))
            if t.on_native_kernel and t.name in settings else t for t in tensors]


def mergekit_problems(settings: Dict[str, object], options: MergeOptions) -> List[str]:
    """Why a merge cannot run in mergekit's arithmetic (one line each)."""
    if options.compute_dtype != "mergekit":
        return []
    problems = []  # (its device: plan._device_problems)
    for spec in {s.spec.name: s.spec for s in settings.values()}.values():
        if spec.mergekit.arithmetic is None:
            problems.append(f"--compute-dtype mergekit: {spec.name} cannot be computed as "
                            f"mergekit computes it ({spec.mergekit.unreproducible}); leave "
                            "the option out for this engine's arithmetic")
    try:
        import torch  # noqa: F401
    except ImportError:
        problems.append("--compute-dtype mergekit computes with torch, which is not "
                        "installed: pip install torch (the CPU build is enough)")
    return problems
