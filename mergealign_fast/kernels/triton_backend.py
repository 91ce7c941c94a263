"""The Triton backend: the same fused pass as csrc/merge_math.h, written in Triton.

It mirrors the native arithmetic exactly: inputs widened to fp32, ((b + w_d(d-b)) + w_a(a-b))
without fused multiply-adds (launched with enable_fp_fusion=False), int64 offsets, and one
rounding at the store, every NaN stored as the dtype's canonical NaN.  bf16 rounding is spelt
out with integer operations, as in merge_math.h, because Triton's CPU interpreter
(TRITON_INTERPRET=1, used by the tests) would otherwise truncate; fp16 stores use Triton's own
round-to-nearest-even conversion.

triton and torch are imported on first use only.
"""

from __future__ import annotations

import os
from typing import Optional

from .buffer import Buffer

# 4096 elements per program: 8 KiB per input in bf16, enough bytes in flight per SM to saturate
# HBM with 4 warps; the exact number matters little for a memory-bound kernel.
BLOCK = 4096


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason() -> Optional[str]:
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton or torch is not installed ({exc.name})"
    if interpreting():
        return None  # runs on CPU tensors, slowly: for tests
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (set TRITON_INTERPRET=1 to run on the CPU)"
    return None


def merge_tensors_triton(base, domain, aligned, out, w_domain: float, w_align: float) -> None:
    """The kernel on torch tensors (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    import triton

    from ..dtypes import from_torch

    n = out.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK),)
    options = {} if interpreting() else {"enable_fp_fusion": False}
    from .triton_kernels import _merge_kernel

    # Launched on the output's device and its current stream, whichever device is current.
    with _on_device(out.device):
        _merge_kernel[grid](base.reshape(-1), domain.reshape(-1), aligned.reshape(-1),
                            out.reshape(-1), n, float(w_domain), float(w_align), BLOCK=BLOCK,
                            OUT_KIND=int(from_torch(out.dtype)), **options)


def _on_device(device):
    import contextlib

    import torch

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def merge(base: Buffer, domain: Buffer, aligned: Buffer, out: Buffer,
          w_domain: float, w_align: float, threads: int, stream: Optional[int] = None) -> None:
    """Registry entry: Buffers whose owners are torch tensors (Triton needs typed tensors)."""
    tensors = [getattr(b, "owner", None) for b in (base, domain, aligned, out)]
    if not all(hasattr(t, "data_ptr") for t in tensors):
        raise TypeError("the triton backend needs torch tensors")
    merge_tensors_triton(*tensors, w_domain, w_align)
