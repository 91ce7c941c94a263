"""The Triton backend: the same fused pass as csrc/merge_math.h, written in Triton.

It mirrors the native arithmetic exactly: inputs widened to fp32, ((b + w_d(d-b)) + w_a(a-b))
without fused multiply-adds (launched with enable_fp_fusion=False), int64 offsets, and one
rounding at the store.  bf16 rounding is spelt out with integer operations, as in merge_math.h,
because Triton's CPU interpreter (TRITON_INTERPRET=1, used by the tests) would otherwise
truncate; fp16 and fp32 stores use Triton's own round-to-nearest-even conversion.

triton and torch are imported on first use only.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=None)
def _kernel():
    """Define the JIT kernel on first use (triton.jit reads TRITON_INTERPRET at definition)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _round_to_bf16(x):
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x40
        return tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _merge_kernel(base_ptr, domain_ptr, aligned_ptr, out_ptr, n, w_domain, w_align,
                      BLOCK: tl.constexpr, OUT_IS_BF16: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        b = tl.load(base_ptr + offsets, mask=mask).to(tl.float32)
        d = tl.load(domain_ptr + offsets, mask=mask).to(tl.float32)
        a = tl.load(aligned_ptr + offsets, mask=mask).to(tl.float32)
        merged = (b + w_domain * (d - b)) + w_align * (a - b)
        if OUT_IS_BF16:
            tl.store(out_ptr + offsets, _round_to_bf16(merged), mask=mask)
        else:
            tl.store(out_ptr + offsets, merged.to(out_ptr.dtype.element_ty), mask=mask)

    return _merge_kernel


def merge_tensors_triton(base, domain, aligned, out, w_domain: float, w_align: float) -> None:
    """The kernel on torch tensors (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    import torch
    import triton

    n = out.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK),)
    options = {} if interpreting() else {"enable_fp_fusion": False}
    _kernel()[grid](base.reshape(-1), domain.reshape(-1), aligned.reshape(-1), out.reshape(-1),
                    n, float(w_domain), float(w_align), BLOCK=BLOCK,
                    OUT_IS_BF16=out.dtype == torch.bfloat16, **options)


def merge(base: Buffer, domain: Buffer, aligned: Buffer, out: Buffer,
          w_domain: float, w_align: float, threads: int, stream: Optional[int] = None) -> None:
    """Registry entry: Buffers whose owners are torch tensors (Triton needs typed tensors)."""
    tensors = [getattr(b, "owner", None) for b in (base, domain, aligned, out)]
    if not all(hasattr(t, "data_ptr") for t in tensors):
        raise TypeError("the triton backend needs torch tensors")
    merge_tensors_triton(*tensors, w_domain, w_align)
