"""The Triton kernels (@triton.jit).  Imported only on first launch (triton.jit reads
TRITON_INTERPRET when this module is imported); triton_backend.py is the launcher and says which
rules of csrc/merge_math.h they mirror."""

import triton
import triton.language as tl


@triton.jit
def _round_to_bf16(x):
    # Round to nearest even with integer operations, NaN kept quiet (csrc/merge_math.h).
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _merge_kernel(base_ptr, domain_ptr, aligned_ptr, out_ptr, n, w_domain, w_align,
                  BLOCK: tl.constexpr, OUT_IS_BF16: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: > 2^31 elements
    mask = offsets < n
    b = tl.load(base_ptr + offsets, mask=mask).to(tl.float32)
    d = tl.load(domain_ptr + offsets, mask=mask).to(tl.float32)
    a = tl.load(aligned_ptr + offsets, mask=mask).to(tl.float32)
    merged = (b + w_domain * (d - b)) + w_align * (a - b)
    if OUT_IS_BF16:
        tl.store(out_ptr + offsets, _round_to_bf16(merged), mask=mask)
    else:
        tl.store(out_ptr + offsets, merged.to(out_ptr.dtype.element_ty), mask=mask)
