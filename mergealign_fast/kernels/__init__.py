"""Backend registry: every backend computes the same fused merge on raw buffers.

A backend module has `unavailable_reason() -> str | None` and
`merge(base, domain, aligned, out, w_domain, w_align, threads)` over :class:`Buffer` views; the
cpu and cuda backends also have `merge_recipe(base, domain, aligned, out, recipe, first_index,
threads)`, the final pass of any merge method (methods.py).
``auto`` picks the first backend that can run for the data's device and falls back quietly;
naming a backend that cannot run is a clear one-line error.  Nothing here touches a GPU at import.
"""

from __future__ import annotations

from typing import Callable, Dict, List

from ..errors import MergeError
from . import cpu, cuda, torch_ref, triton_backend
from .buffer import Buffer

KernelFn = Callable[[Buffer, Buffer, Buffer, Buffer, float, float, int], None]

# name -> (module, description, devices whose memory it computes on)
_BACKENDS = {
    "cpu": (cpu, "native C++ (threads, runtime SIMD dispatch)", ("cpu",)),
    "cuda": (cuda, "native CUDA C++ (static runtime)", ("cuda",)),
    "triton": (triton_backend, "Triton JIT (CPU tensors only under TRITON_INTERPRET=1)",
               ("cuda", "cpu")),
    "torch": (torch_ref, "PyTorch fp32 reference (slow; for comparison)", ("cpu", "cuda")),
}
# auto's preference per device: the Triton interpreter is far too slow to be chosen for CPU data.
_AUTO_ORDER = {"cpu": ["cpu", "torch"], "cuda": ["cuda", "triton", "torch"]}


def backend_names() -> List[str]:
    return ["auto", *_BACKENDS]


def describe_backends() -> Dict[str, str]:
    """name -> 'available: ...' or 'unavailable: why', for `mergealign-fast env`."""
    report = {}
    for name, (module, text, _) in _BACKENDS.items():
        reason = module.unavailable_reason()
        report[name] = f"available: {text}" if reason is None else f"unavailable: {reason}"
    return report


def _reason(name: str, device: str):
    module, _, devices = _BACKENDS[name]
    if device not in devices:
        return f"it does not compute on {device} memory"
    if name == "triton" and device == "cpu" and not triton_backend.interpreting():
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    reason = module.unavailable_reason()
    if reason is None and device == "cuda" and name != "cuda":
        reason = _torch_gpu_reason()
    return reason


def _torch_gpu_reason():
    """Why torch cannot put tensors on a GPU here, or None (called only at merge time)."""
    import torch

    return None if torch.cuda.is_available() else "torch sees no CUDA device"


def resolve_backend(name: str, device: str = "cpu") -> str:
    """'auto' -> the first backend that can run on `device`; an explicit name must be able to."""
    if name == "auto":
        reasons = {}
        for candidate in _AUTO_ORDER[device]:
            reasons[candidate] = _reason(candidate, device)
            if reasons[candidate] is None:
                return candidate
        raise MergeError(f"no merge backend can run on {device} here: " +
                         "; ".join(f"{n}: {r}" for n, r in reasons.items()))
    if name not in _BACKENDS:
        raise MergeError(f"unknown backend {name!r}: choose one of {', '.join(backend_names())}")
    reason = _reason(name, device)
    if reason is not None:
        raise MergeError(f"backend {name!r} cannot run here: {reason}")
    return name


def get_kernel(name: str, device: str = "cpu") -> KernelFn:
    return _BACKENDS[resolve_backend(name, device)][0].merge


def get_recipe_kernel(name: str, device: str = "cpu"):
    """The backend's merge_recipe (methods other than plain task arithmetic); auto means the
    native backend of the device (Triton and torch run task arithmetic only)."""
    if name == "auto":
        name = "cuda" if device == "cuda" else "cpu"
    resolved = resolve_backend(name, device)
    kernel = getattr(_BACKENDS[resolved][0], "merge_recipe", None)
    if kernel is None:
        raise MergeError(f"backend {resolved!r} runs task_arithmetic only; other merge methods "
                         "run on the cpu and cuda backends")
    return kernel
