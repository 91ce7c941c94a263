"""The Triton kernels (@triton.jit).  Imported only on first launch (triton.jit reads
TRITON_INTERPRET when this module is imported); triton_backend.py is the launcher and says which
rules of csrc/merge_math.h they mirror."""

import triton
import triton.language as tl


@triton.jit
def _bf16_bits(x):
    # Round to nearest even with integer operations (csrc/merge_math.h's f32_to_bf16).
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)


@triton.jit
def _load_f32(ptr, offsets, mask):
    """Elements widened to fp32 exactly.  bf16 is widened from its bits (the high half of an
    fp32): Triton's own conversion flushed bf16 subnormals to zero (seen in the interpreter)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        raw = tl.load(ptr.to(tl.pointer_type(tl.uint16)) + offsets, mask=mask)
        return (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr + offsets, mask=mask).to(tl.float32)


@triton.jit
def _stored(merged, OUT_KIND: tl.constexpr):
    """`merged` rounded once to the output dtype (OUT_KIND: 0 fp32, 1 fp16, 2 bf16, the DType
    codes), every NaN the dtype's canonical NaN (merge_math.h: GPUs would give 0x7fff...)."""
    nan = merged != merged
    if OUT_KIND == 2:
        bits = tl.where(nan, 0x7FC0, _bf16_bits(merged).to(tl.int32))
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    if OUT_KIND == 1:
        half = merged.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
        return tl.where(nan, 0x7E00, half).to(tl.uint16).to(tl.float16, bitcast=True)
    bits = tl.where(nan, 0x7FC00000, merged.to(tl.uint32, bitcast=True).to(tl.int64))
    return bits.to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _merge_kernel(base_ptr, domain_ptr, aligned_ptr, out_ptr, n, w_domain, w_align,
                  BLOCK: tl.constexpr, OUT_KIND: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: > 2^31 elements
    mask = offsets < n
    b = _load_f32(base_ptr, offsets, mask)
    d = _load_f32(domain_ptr, offsets, mask)
    a = _load_f32(aligned_ptr, offsets, mask)
    merged = (b + w_domain * (d - b)) + w_align * (a - b)
    tl.store(out_ptr + offsets, _stored(merged, OUT_KIND), mask=mask)
