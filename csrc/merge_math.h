// Per-element merge math shared by every native backend.
//
// This header is the single home of the arithmetic: the CPU kernel's tile layer (tiles.h) and
// the CUDA kernels (cuda_merge.cu) both call these functions, marked __host__ __device__ under
// nvcc, so CPU tests check the exact operations a GPU runs.  It depends on nothing but
// <cstdint>/<cstring>.
//
// Rules:
//   * every input is widened to fp32, all math is fp32, one rounding happens at the store
//     (coefficients are rounded to fp32 once, explicitly, before any element is computed);
//   * rounding to bf16/fp16 is IEEE round-to-nearest-even, NaN stays NaN, overflow gives ±inf;
//   * the formula is evaluated in one fixed order with no fused multiply-add, so the result of an
//     element never depends on vector width, thread count or chunking (the build passes
//     -ffp-contract=off; device code uses the explicit _rn intrinsics below).
#pragma once

#include <cstdint>
#include <cstring>

#include "merge_operands.h"

#if defined(__CUDACC__)
#define MA_HD __host__ __device__ __forceinline__
#else
#define MA_HD inline __attribute__((always_inline))
#endif

namespace mergealign {

// Numbering is part of the Python ABI (mergealign_fast/dtypes.py mirrors it).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

MA_HD int dtype_size(int dtype) { return dtype == kF32 ? 4 : 2; }

MA_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

MA_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// ---- bfloat16 -------------------------------------------------------------------------------

MA_HD float bf16_to_f32(uint16_t h) { return bits_float(uint32_t(h) << 16); }

// ---- NaN ------------------------------------------------------------------------------------
// Every NaN a merge stores is one canonical quiet NaN per dtype: 0x7fc00000 (fp32), 0x7fc0
// (bf16), 0x7e00 (fp16).  Hardware disagrees otherwise: x86 keeps the sign and payload of an
// operand NaN and makes inf - inf the negative 0xffc00000 (bf16 0xffc0), NVIDIA GPUs make every
// NaN result 0x7fffffff, and bf16 conversions on a GPU give 0x7fff.  One pattern makes "the same
// bits on every backend" hold for NaN results too.
constexpr uint32_t kCanonicalNanF32 = 0x7fc00000u;
constexpr uint16_t kCanonicalNanBf16 = 0x7fc0u;
constexpr uint16_t kCanonicalNanF16 = 0x7e00u;

MA_HD bool is_nan_bits(uint32_t x) { return (x & 0x7fffffffu) > 0x7f800000u; }

MA_HD float canonical_nan(float f) {
  return is_nan_bits(float_bits(f)) ? bits_float(kCanonicalNanF32) : f;
}

MA_HD uint16_t f32_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  // Round to nearest even: add 0x7fff plus the lowest kept bit, then truncate.  Values above the
  // largest bf16 carry into the exponent and become inf, as IEEE rounding requires.
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  return uint16_t(is_nan_bits(x) ? kCanonicalNanBf16 : rounded);
}

// ---- IEEE half ------------------------------------------------------------------------------
// Every case is computed and the answer picked with bit masks: with ?: GCC 12 keeps a branch in
// the loop and runs it scalar (0.25 Gelem/s measured against 4.8 for bf16).  The same code is
// exact on any IEEE-754 binary32 machine.

MA_HD uint32_t select_u32(bool take_first, uint32_t first, uint32_t second) {
  const uint32_t mask = 0u - uint32_t(take_first);
  return (first & mask) | (second & ~mask);
}

MA_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  // Normal numbers: rebias the exponent from 15 to 127 (add 112) and widen the mantissa.
  const uint32_t normal = ((exp + 112u) << 23) | (mant << 13);
  // Inf/NaN: all-ones exponent, payload kept, a NaN made quiet (as F16C and GPUs do, so every
  // code path gives the same bits).
  const uint32_t special = 0x7f800000u | (mant << 13) | select_u32(mant != 0, 0x400000u, 0u);
  // Subnormals (and zero): mant * 2^-24 is exact in fp32.
  // (int32 conversion: unsigned-to-float has no vector instruction before AVX-512.)
  const float sub = float(int32_t(mant)) * 5.9604644775390625e-8f;  // 2^-24
  const uint32_t magnitude = select_u32(exp == 0, float_bits(sub), select_u32(exp == 31, special, normal));
  return bits_float(sign | magnitude);
}

MA_HD uint16_t f32_to_f16(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  // Normal range: rebias 127 -> 15 and round the 13 dropped bits to nearest even.
  const uint32_t normal = (ax - (112u << 23) + 0xfffu + ((ax >> 13) & 1u)) >> 13;
  // Below 2^-14 the result is subnormal: adding 0.5f aligns the value so the FPU's own
  // round-to-nearest-even drops exactly the bits half precision cannot hold (ulp 2^-24).
  const uint32_t subnormal = float_bits(bits_float(ax) + 0.5f) - 0x3f000000u;
  const bool is_nan = ax > 0x7f800000u;
  // 65520 = 65504 + half an ulp: from here on round-to-nearest-even gives inf.
  const bool overflows = ax >= 0x477ff000u;
  uint32_t h = select_u32(ax < 0x38800000u, subnormal, normal);
  h = select_u32(overflows, 0x7c00u, h);
  return uint16_t(select_u32(is_nan, kCanonicalNanF16, sign | h));
}

// ---- loads and stores by dtype --------------------------------------------------------------
// Callers pass byte pointers: memory-mapped safetensors data is not necessarily aligned to the
// element size (tensors are packed back to back after a header of arbitrary length), so every
// access goes through memcpy, which compiles to a plain unaligned load on x86 and CUDA byte loads
// only where needed.

MA_HD float load_as_f32(const unsigned char* p, int64_t i, int dtype) {
  if (dtype == kF32) {
    float v;
    memcpy(&v, p + 4 * i, 4);
    return v;
  }
  uint16_t h;
  memcpy(&h, p + 2 * i, 2);
  return dtype == kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

// Rounded once to `dtype`, a NaN stored as the dtype's canonical NaN.
MA_HD void store_from_f32(unsigned char* p, int64_t i, int dtype, float v) {
  if (dtype == kF32) {
    v = canonical_nan(v);
    memcpy(p + 4 * i, &v, 4);
    return;
  }
  const uint16_t h = dtype == kBF16 ? f32_to_bf16(v) : f32_to_f16(v);
  memcpy(p + 2 * i, &h, 2);
}

// mergekit's `dtype` casts every input before merging: an input's value rounded to `cast` (the
// value as stored for kNoCast or kF32, to which every stored dtype widens exactly).
constexpr int kNoCast = -1;

MA_HD float cast_input(float v, int cast) {
  if (cast == kBF16) return bf16_to_f32(f32_to_bf16(v));
  if (cast == kF16) return f16_to_f32(f32_to_f16(v));
  return v;
}

// Does casting to `cast` change a value stored as `dtype`?
MA_HD bool cast_changes(int dtype, int cast) {
  return (cast == kBF16 || cast == kF16) && cast != dtype;
}

MA_HD float load_input(const unsigned char* p, int64_t i, int dtype, int cast) {
  const float v = load_as_f32(p, i, dtype);
  return cast_changes(dtype, cast) ? cast_input(v, cast) : v;
}

// The smallest magnitude that store_from_f32 turns into ±inf: an fp32 result v is stored as a
// finite value exactly when |v| < overflow_threshold(dtype) (NaN compares false).  Round to
// nearest even sends the halfway points to inf, because the largest finite bf16 (0x7f7f) and
// fp16 (0x7bff) have odd mantissas: bf16 0x7f7f8000 = 3.3961776e38, fp16 65520.
MA_HD float overflow_threshold(int dtype) {
  if (dtype == kBF16) return bits_float(0x7f7f8000u);
  if (dtype == kF16) return 65520.0f;
  return bits_float(0x7f800000u);  // fp32: only inf itself
}

// ---- the merge formula ----------------------------------------------------------------------
// theta = base + w_d * (domain - base) + w_a * (aligned - base), evaluated left to right.

#if defined(__CUDA_ARCH__)
MA_HD float ma_add(float x, float y) { return __fadd_rn(x, y); }
MA_HD float ma_sub(float x, float y) { return __fsub_rn(x, y); }
MA_HD float ma_mul(float x, float y) { return __fmul_rn(x, y); }
MA_HD float ma_div(float x, float y) { return __fdiv_rn(x, y); }
#else
MA_HD float ma_add(float x, float y) { return x + y; }
MA_HD float ma_sub(float x, float y) { return x - y; }
MA_HD float ma_mul(float x, float y) { return x * y; }
MA_HD float ma_div(float x, float y) { return x / y; }
#endif

MA_HD float merge_one(float base, float domain, float aligned, float w_domain, float w_align) {
  const float domain_step = ma_mul(w_domain, ma_sub(domain, base));
  const float align_step = ma_mul(w_align, ma_sub(aligned, base));
  return ma_add(ma_add(base, domain_step), align_step);
}

// ---- merge methods (recipes, merge_operands.h) ------------------------------------------------

// MurmurHash3's 32-bit finaliser: a bijection on 32 bits in which every input bit flips each
// output bit with probability ~1/2.
MA_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

// The random draw of element `index` of a stream, uniform on [0, 2^24): counter-based, a pure
// function of (key, index), so every backend, thread count and chunking draws the same mask.
// For indices below 2^32 (every tensor of today's LLMs) the map index -> draw is a permutation
// composed with the top-24-bit projection, so no two elements share a 32-bit hash.
// mergealign_fast/reference.py (numpy) implements the same function.  The draw is split in two
// so a kernel can mix the high half of the index once per tile: draw24(key_lo, high_mix(key_hi,
// index >> 32), uint32(index)).
MA_HD uint32_t high_mix(uint32_t key_hi, uint32_t index_hi) {
  return (index_hi * 0x9e3779b9u) ^ key_hi;
}

MA_HD uint32_t draw24(uint32_t key_lo, uint32_t mixed_hi, uint32_t index_lo) {
  return mix32(mix32(index_lo ^ key_lo) ^ mixed_hi) >> 8;
}

MA_HD uint32_t random_draw24(uint32_t key_lo, uint32_t key_hi, int64_t index) {
  const uint64_t i = uint64_t(index);
  return draw24(key_lo, high_mix(key_hi, uint32_t(i >> 32)), uint32_t(i));
}

MA_HD uint32_t magnitude_bits(float tau) { return float_bits(tau) & 0x7fffffffu; }

// Does a term keep its element?  The definition; CPU tiles evaluate the same rules in bulk
// (cpu_merge.cpp keep_tile).
// In the prefix of the largest |tau| (ties in index order) that (bits, last_tie) bound?
MA_HD bool in_largest(uint32_t magnitude, int64_t index, uint32_t bits, int64_t last_tie) {
  // |tau| as bits: for non-negative floats the bit patterns order like the values.
  return magnitude > bits || (magnitude == bits && index <= last_tie);
}

MA_HD bool term_keeps(const VectorTerm& term, float tau, int64_t index) {
  if (term.sparsify == kKeepLargest) {
    return in_largest(magnitude_bits(tau), index, term.min_magnitude_bits, term.last_tie_index);
  }
  if (term.sparsify == kKeepBand) {
    const uint32_t magnitude = magnitude_bits(tau);
    return in_largest(magnitude, index, term.min_magnitude_bits, term.last_tie_index) &&
           !in_largest(magnitude, index, term.drop_magnitude_bits, term.drop_last_tie_index);
  }
  if (term.sparsify == kKeepRandom) {
    return random_draw24(term.key_lo, term.key_hi, index) < term.keep_below;
  }
  return true;
}

// kVectors: TIES / DARE / RESTA.  A term is a task vector's element after sparsification:
// (tau * scale) * weight when kept (the order mergekit applies them in), 0 when dropped.  Every
// operation is computed and then selected: with an operation inside a ?: arm the compiler would
// not vectorise.
MA_HD float vector_term(const VectorTerm& term, float tau, bool keep) {
  const float value = ma_mul(ma_mul(tau, term.scale), term.weight);
  return keep ? value : 0.0f;
}

// base + lambda * (combined terms) / divisor.  With sign election a term counts only when its
// sign matches the sign of the sum of both terms (zero counts as positive), and the divisor is
// the sum of the weights of the terms that count (1 when none does): mergekit's disjoint mean.
template <bool kSignElection>
MA_HD float combine_terms(const Recipe& r, float base, float xd, float xa) {
  float mixed;
  float divisor = r.divisor;
  if (kSignElection) {
    // Bitwise, not && / ?: on bools: no control flow, so the CPU loop vectorises.
    const bool up = ma_add(xd, xa) >= 0.0f;
    const bool count_d = ((xd > 0.0f) & up) | ((xd < 0.0f) & !up);
    const bool count_a = ((xa > 0.0f) & up) | ((xa < 0.0f) & !up);
    mixed = ma_add(count_d ? xd : 0.0f, count_a ? xa : 0.0f);
    divisor = ma_add(count_d ? r.domain.weight : 0.0f, count_a ? r.align.weight : 0.0f);
    divisor = divisor == 0.0f ? 1.0f : divisor;
  } else {
    mixed = ma_add(xd, xa);
  }
  // x / 1 is exact: dividing always keeps the loop free of a branch.
  divisor = r.normalize ? divisor : 1.0f;
  return ma_add(base, ma_mul(ma_div(mixed, divisor), r.lambda));
}

MA_HD float merge_vectors(const Recipe& r, float base, float domain, float aligned,
                          int64_t index) {
  const float tau_d = ma_sub(domain, base);
  const float tau_a = ma_sub(aligned, base);
  const float xd = vector_term(r.domain, tau_d, term_keeps(r.domain, tau_d, index));
  const float xa = vector_term(r.align, tau_a, term_keeps(r.align, tau_a, index));
  return r.sign_election ? combine_terms<true>(r, base, xd, xa)
                         : combine_terms<false>(r, base, xd, xa);
}

// kModels: a weighted sum of the models themselves, with per-tensor coefficients (linear,
// SLERP, ChipAlign compute theirs from the tensor's norms).
MA_HD float merge_models(const Recipe& r, float base, float domain, float aligned) {
  const float sum = ma_add(ma_add(ma_mul(r.base_weight, base), ma_mul(r.domain.weight, domain)),
                           ma_mul(r.align.weight, aligned));
  return ma_div(sum, r.divisor);
}

// kNearSwap: where the models are within t of each other the domain model's value, further
// apart a blend that moves t toward it.  A NaN difference stays NaN (the comparisons are false
// for it, as torch's clamp passes NaN through).  t / distance is computed as torch computes
// mergekit's `t / tensor`: (1 / distance) * t, two roundings, so the results are its bits.
MA_HD float merge_nearswap(const Recipe& r, float base, float domain) {
  float distance = ma_sub(domain, base);
  distance = distance < 0.0f ? -distance : distance;
  float w = ma_mul(ma_div(1.0f, distance < kNearSwapEps ? kNearSwapEps : distance), r.swap_t);
  w = w < 0.0f ? 0.0f : (w > 1.0f ? 1.0f : w);
  return ma_add(ma_mul(w, domain), ma_mul(ma_sub(1.0f, w), base));
}

// One element of any recipe: the per-element path the CUDA kernels run.  The CPU computes the
// same values in bulk (tiles.h, direct_path.cpp); merge_cpu_elementwise runs this path on the
// CPU so that tests compare the two bit for bit without a GPU.
MA_HD float merge_element(const Recipe& r, float base, float domain, float aligned,
                          int64_t index) {
  if (r.kind == kTaskArithmetic) {
    return merge_one(base, domain, aligned, r.domain.weight, r.align.weight);
  }
  if (r.kind == kModels) return merge_models(r, base, domain, aligned);
  if (r.kind == kNearSwap) return merge_nearswap(r, base, domain);
  return merge_vectors(r, base, domain, aligned, index);
}

// ---- a base and any number of models (ModelSetRecipe) ------------------------------------------
// x[m] is model m's element.  Sums run in model order starting from the first model's value, as
// the two-model formulas above do, so two models give their bits.

MA_HD float merge_set_models(const ModelSetRecipe& r, float base, const float* x, int count) {
  float sum = ma_mul(r.base_weight, base);
  for (int m = 0; m < count; ++m) sum = ma_add(sum, ma_mul(r.terms[m].weight, x[m]));
  return ma_div(sum, r.divisor);
}

MA_HD bool counts_in_election(float term, bool up) {
  return ((term > 0.0f) & up) | ((term < 0.0f) & !up);
}

// kVectors over terms t[m] (already sparsified and weighted): combine_terms for any count.
MA_HD float combine_set_terms(const ModelSetRecipe& r, float base, const float* t, int count) {
  float mixed = t[0];
  for (int m = 1; m < count; ++m) mixed = ma_add(mixed, t[m]);
  float divisor = r.divisor;
  if (r.sign_election) {
    const bool up = mixed >= 0.0f;
    mixed = counts_in_election(t[0], up) ? t[0] : 0.0f;
    divisor = counts_in_election(t[0], up) ? r.terms[0].weight : 0.0f;
    for (int m = 1; m < count; ++m) {
      const bool counted = counts_in_election(t[m], up);
      mixed = ma_add(mixed, counted ? t[m] : 0.0f);
      divisor = ma_add(divisor, counted ? r.terms[m].weight : 0.0f);
    }
    divisor = divisor == 0.0f ? 1.0f : divisor;
  }
  divisor = r.normalize ? divisor : 1.0f;
  return ma_add(base, ma_mul(ma_div(mixed, divisor), r.lambda));
}

// One element of a ModelSetRecipe: the definition the CPU tiles (model_set.cpp) compute in bulk.
MA_HD float merge_set_element(const ModelSetRecipe& r, float base, const float* x, int count,
                              int64_t index) {
  if (r.kind == kModels) return merge_set_models(r, base, x, count);
  float t[kMaxModels] = {};
  for (int m = 0; m < count; ++m) {
    const float tau = ma_sub(x[m], base);
    t[m] = vector_term(r.terms[m], tau, term_keeps(r.terms[m], tau, index));
  }
  return combine_set_terms(r, base, t, count);
}

}  // namespace mergealign
