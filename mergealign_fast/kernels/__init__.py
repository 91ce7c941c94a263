"""Backend registry: every backend computes the same fused merge on raw buffers.

A backend is a callable ``(base, domain, aligned, out, w_domain, w_align, threads) -> None`` whose
arguments are :class:`Buffer` views.  ``auto`` picks the fastest backend that can run here and
falls back quietly; naming a backend that cannot run is a clear error.
"""

from __future__ import annotations

from typing import Callable, Dict, List

from ..errors import MergeError
from .buffer import Buffer
from . import cpu, torch_ref

KernelFn = Callable[[Buffer, Buffer, Buffer, Buffer, float, float, int], None]

# name -> (module with available()/unavailable_reason()/merge(), description), in auto's order.
_BACKENDS = {
    "cpu": (cpu, "native C++ (threads, runtime SIMD dispatch)"),
    "torch": (torch_ref, "PyTorch fp32 reference (slow; for comparison)"),
}
_AUTO_ORDER = ["cpu", "torch"]


def backend_names() -> List[str]:
    return ["auto", *_BACKENDS]


def describe_backends() -> Dict[str, str]:
    """name -> 'available: ...' or 'unavailable: why', for `mergealign-fast env`."""
    report = {}
    for name, (module, text) in _BACKENDS.items():
        reason = module.unavailable_reason()
        report[name] = f"available: {text}" if reason is None else f"unavailable: {reason}"
    return report


def resolve_backend(name: str) -> str:
    """'auto' -> the first available backend; an explicit name must be available."""
    if name == "auto":
        for candidate in _AUTO_ORDER:
            if _BACKENDS[candidate][0].unavailable_reason() is None:
                return candidate
        raise MergeError("no merge backend can run here: " + "; ".join(
            f"{n}: {_BACKENDS[n][0].unavailable_reason()}" for n in _AUTO_ORDER))
    if name not in _BACKENDS:
        raise MergeError(f"unknown backend {name!r}: choose one of {', '.join(backend_names())}")
    reason = _BACKENDS[name][0].unavailable_reason()
    if reason is not None:
        raise MergeError(f"backend {name!r} cannot run here: {reason}")
    return name


def get_kernel(name: str) -> KernelFn:
    return _BACKENDS[resolve_backend(name)][0].merge
