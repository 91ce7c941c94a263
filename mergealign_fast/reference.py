"""The float64 oracle for every method, and the error bound a correct kernel must meet.

Tests and benchmarks import these; nothing here is used on the fast path.  numpy has no bf16, so
the exact bf16 <-> float conversions the oracle needs live here too.
"""

from __future__ import annotations

import numpy as np

from .dtypes import DType


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact widening of bf16 bit patterns (uint16) to float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns, round-to-nearest-even, NaN kept NaN."""
    x = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((x + np.uint32(0x7FFF) + ((x >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((x[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def decode_to_f64(raw: np.ndarray, dtype: DType) -> np.ndarray:
    """Stored values (numpy storage dtype) -> float64, exactly."""
    if dtype is DType.BF16:
        return bf16_bits_to_f32(raw).astype(np.float64)
    return raw.astype(np.float64)


# Unit roundoff of fp32, the precision the kernels compute in.
FP32_UNIT_ROUNDOFF = 2.0**-24

# Per output dtype: (ulp of 1.0, smallest positive subnormal).  The spacing of representable
# numbers near |x| is max(ulp(1) * 2^floor(log2|x|), smallest subnormal).
_SPACING = {
    DType.F32: (2.0**-23, 2.0**-149),
    DType.F16: (2.0**-10, 2.0**-24),
    DType.BF16: (2.0**-7, 2.0**-133),
}


def merge_ref(base, domain, aligned, w_domain: float, w_align: float) -> np.ndarray:
    """MergeAlign / task arithmetic in float64: b + w_d (d - b) + w_a (a - b)."""
    b = np.asarray(base, dtype=np.float64)
    d = np.asarray(domain, dtype=np.float64)
    a = np.asarray(aligned, dtype=np.float64)
    return b + w_domain * (d - b) + w_align * (a - b)


def spacing(values: np.ndarray, dtype: DType) -> np.ndarray:
    """Distance between adjacent representable numbers of `dtype` around each |value|."""
    ulp_one, tiniest = _SPACING[dtype]
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
    return np.maximum(ulp_one * np.exp2(exponent), tiniest)


def merge_error_bound(base, domain, aligned, w_domain: float, w_align: float,
                      out_dtype: DType) -> np.ndarray:
    """Largest |kernel - merge_ref| a correct fused kernel may show, element by element.

    The kernel rounds the two weights to fp32 (1 rounding each) and evaluates
    ((b + w_d*(d-b)) + w_a*(a-b)) in fp32: two subtractions, two multiplications, two additions.
    Each operation's relative error is at most u = 2^-24, and every intermediate is bounded by
    S = |b| + |w_d (d-b)| + |w_a (a-b)|, so the fp32 result r is within E = 8 u S of the exact value
    (6 operations + 2 weight roundings; first-order, the u^2 terms are far below the slack).
    Storing r rounds once more, by at most half the output spacing at |r| <= |exact| + E.
    """
    b = np.asarray(base, dtype=np.float64)
    d = np.asarray(domain, dtype=np.float64)
    a = np.asarray(aligned, dtype=np.float64)
    scale = np.abs(b) + np.abs(w_domain * (d - b)) + np.abs(w_align * (a - b))
    fp32_error = 8 * FP32_UNIT_ROUNDOFF * scale
    exact = merge_ref(b, d, a, w_domain, w_align)
    return fp32_error + 0.5 * spacing(np.abs(exact) + fp32_error, out_dtype)
