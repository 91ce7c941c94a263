// The tile layer of the CPU kernel: every pass over the inputs reads them through here, except
// same-dtype task arithmetic, which has its own loop (direct_path.h).
//
// Data moves in tiles of kTile elements: each input tile is widened to fp32 in a small stack
// array (1 KiB per input, stays in L1), the formula runs on the fp32 tiles, and the result is
// rounded once into the output.  Tiles keep the number of compiled loops at 3 loads + 1 formula +
// 3 stores instead of 3^4 dtype combinations, and each of those loops is a straight line GCC
// vectorises.  Nothing the size of a tensor is ever allocated.
//
// No -march=native: the functions that loop over tiles are compiled for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2) and the baseline (MA_CPU_CLONES), and the loader picks one at run time (GCC
// target_clones / ifunc).  Because the build uses -ffp-contract=off, every clone computes
// bit-identical results.  Everything here is inline: it must be compiled into each clone.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "merge_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define MA_HAVE_F16C_PATH 1
#define MA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MA_CPU_CLONES
#endif

namespace mergealign {

// 256 fp32 per input tile: 3 inputs + 1 result = 4 KiB, a tenth of a 32-48 KiB L1d.
constexpr int64_t kTile = 256;

// ---- IEEE half through F16C ----------------------------------------------------------------
// The portable conversions of merge_math.h cost ~10 integer operations per element; on one
// thread an fp16 merge was compute-bound at 16 GB/s against 34 GB/s for bf16.  F16C converts 8
// values per instruction with the same round-to-nearest-even (NaNs made canonical first, as
// merge_math.h stores them), so results are bit-identical; it is used when the CPU has it,
// decided once.

#ifdef MA_HAVE_F16C_PATH
// MERGEALIGN_NO_F16C=1 forces the portable path (the tests compare the two bit for bit).
inline bool cpu_has_f16c() {
  static const bool yes = [] {
    const char* off = std::getenv("MERGEALIGN_NO_F16C");
    if (off != nullptr && off[0] == '1') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return yes;
}

inline __attribute__((target("avx2,f16c"))) void load_half_tile_f16c(
    const unsigned char* src, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    _mm256_store_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < count; ++i) dst[i] = load_as_f32(src, i, kF16);
}

// NaN lanes replaced by the canonical NaN (merge_math.h): F16C and the bf16 rounding keep an
// operand NaN's sign and payload, and a canonical fp32 NaN converts to the canonical bf16/fp16.
inline __attribute__((target("avx2,f16c"))) __m256 canonical_nan8(__m256 v) {
  const __m256 nan = _mm256_castsi256_ps(_mm256_set1_epi32(int(kCanonicalNanF32)));
  return _mm256_blendv_ps(v, nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

inline __attribute__((target("avx2,f16c"))) void store_half_tile_f16c(
    unsigned char* dst, int64_t count, const float* src) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm256_cvtps_ph(canonical_nan8(_mm256_load_ps(src + i)),
                                      _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), h);
  }
  for (; i < count; ++i) store_from_f32(dst, i, kF16, src[i]);
}
#endif

// The tile as stored, widened to fp32.
inline void load_stored_tile(const unsigned char* src, int dtype, int64_t start, int64_t count,
                             float* dst) {
  switch (dtype) {
    case kBF16:
      for (int64_t i = 0; i < count; ++i) dst[i] = load_as_f32(src, start + i, kBF16);
      break;
    case kF16:
#ifdef MA_HAVE_F16C_PATH
      if (cpu_has_f16c()) {
        load_half_tile_f16c(src + 2 * start, count, dst);
        break;
      }
#endif
      for (int64_t i = 0; i < count; ++i) dst[i] = load_as_f32(src, start + i, kF16);
      break;
    default:
      for (int64_t i = 0; i < count; ++i) dst[i] = load_as_f32(src, start + i, kF32);
      break;
  }
}

// The tile widened to fp32 and, where `cast` changes it, rounded to that dtype (input_cast).
inline void load_tile(const unsigned char* src, int dtype, int64_t start, int64_t count,
                      float* dst, int cast = kNoCast) {
  load_stored_tile(src, dtype, start, count, dst);
  if (cast_changes(dtype, cast)) {
    for (int64_t i = 0; i < count; ++i) dst[i] = cast_input(dst[i], cast);
  }
}

inline void store_tile(unsigned char* dst, int dtype, int64_t start, int64_t count,
                       const float* src) {
  switch (dtype) {
    case kBF16:
      for (int64_t i = 0; i < count; ++i) store_from_f32(dst, start + i, kBF16, src[i]);
      break;
    case kF16:
#ifdef MA_HAVE_F16C_PATH
      if (cpu_has_f16c()) {
        store_half_tile_f16c(dst + 2 * start, count, src);
        break;
      }
#endif
      for (int64_t i = 0; i < count; ++i) store_from_f32(dst, start + i, kF16, src[i]);
      break;
    default:
      for (int64_t i = 0; i < count; ++i) store_from_f32(dst, start + i, kF32, src[i]);
      break;
  }
}

// Calls body(b, d, a, start, n) for each tile of elements [begin, end) of the three inputs,
// widened to fp32: the one place inputs are read, for merges and statistics alike.
template <typename Body>
inline __attribute__((always_inline)) void for_each_tile(const MergeOperands& ops,
                                                         int64_t begin, int64_t end, Body body) {
  alignas(64) float b[kTile];
  alignas(64) float d[kTile];
  alignas(64) float a[kTile];
  for (int64_t start = begin; start < end; start += kTile) {
    const int64_t n = std::min(kTile, end - start);
    load_tile(ops.base, ops.base_dtype, start, n, b, ops.input_cast);
    load_tile(ops.domain, ops.domain_dtype, start, n, d, ops.input_cast);
    load_tile(ops.aligned, ops.aligned_dtype, start, n, a, ops.input_cast);
    body(b, d, a, start, n);
  }
}

// How many of a tile's elements [first, first + n) lie at or before the tie index `last`.
inline int tie_limit_in_tile(int64_t last, int64_t first, int n) {
  return last >= first + n ? n : (last < first ? 0 : int(last - first + 1));
}

// keep[i] = term_keeps(term, tau[i], first + i) for one tile (n <= kTile), in loops the compiler
// vectorises: the tie limit becomes a count of leading elements and the random draw's high half
// is mixed once per tile.
inline __attribute__((always_inline)) void keep_tile(const VectorTerm& term, const float* tau,
                                                     int64_t first, int n, uint32_t* keep) {
  if (term.sparsify == kKeepLargest) {
    const uint32_t min_bits = term.min_magnitude_bits;
    const int tie_limit = tie_limit_in_tile(term.last_tie_index, first, n);
    for (int i = 0; i < n; ++i) {
      const uint32_t m = magnitude_bits(tau[i]);
      keep[i] = uint32_t((m > min_bits) | ((m == min_bits) & (i < tie_limit)));
    }
  } else if (term.sparsify == kKeepBand) {
    const uint32_t keep_bits = term.min_magnitude_bits;
    const uint32_t drop_bits = term.drop_magnitude_bits;
    const int keep_ties = tie_limit_in_tile(term.last_tie_index, first, n);
    const int drop_ties = tie_limit_in_tile(term.drop_last_tie_index, first, n);
    for (int i = 0; i < n; ++i) {
      const uint32_t m = magnitude_bits(tau[i]);
      const uint32_t kept = (m > keep_bits) | ((m == keep_bits) & (i < keep_ties));
      const uint32_t dropped = (m > drop_bits) | ((m == drop_bits) & (i < drop_ties));
      keep[i] = kept & (dropped ^ 1u);
    }
  } else if (term.sparsify == kKeepRandom) {
    const uint64_t f = uint64_t(first);
    if ((f >> 32) != ((f + uint64_t(n) - 1) >> 32)) {  // the tile straddles 2^32: per element
      for (int i = 0; i < n; ++i) keep[i] = uint32_t(term_keeps(term, tau[i], first + i));
      return;
    }
    const uint32_t hi = high_mix(term.key_hi, uint32_t(f >> 32));
    const uint32_t lo = uint32_t(f);
    const uint32_t key_lo = term.key_lo;
    const uint32_t below = term.keep_below;
    for (int i = 0; i < n; ++i) keep[i] = uint32_t(draw24(key_lo, hi, lo + uint32_t(i)) < below);
  } else {
    for (int i = 0; i < n; ++i) keep[i] = 1;
  }
}

// Task vectors of one tile, which of their elements each term keeps, and the terms.
struct VectorTile {
  alignas(64) float tau_d[kTile];
  alignas(64) float tau_a[kTile];
  alignas(64) uint32_t keep_d[kTile];  // 32-bit like the floats: GCC vectorises the selects
  alignas(64) uint32_t keep_a[kTile];
  alignas(64) float term_d[kTile];
  alignas(64) float term_a[kTile];

  inline __attribute__((always_inline)) void load(const Recipe& r, const float* b,
                                                  const float* d, const float* a,
                                                  int64_t first, int n) {
    for (int i = 0; i < n; ++i) {
      tau_d[i] = ma_sub(d[i], b[i]);
      tau_a[i] = ma_sub(a[i], b[i]);
    }
    keep_tile(r.domain, tau_d, first, n, keep_d);
    keep_tile(r.align, tau_a, first, n, keep_a);
  }

  inline __attribute__((always_inline)) void weigh(const Recipe& r, int n) {
    for (int i = 0; i < n; ++i) {
      term_d[i] = vector_term(r.domain, tau_d[i], keep_d[i] != 0);
      term_a[i] = vector_term(r.align, tau_a[i], keep_a[i] != 0);
    }
  }
};

// One tile merged with one recipe into `merged`.  The recipe's kind is decided per tile, so each
// formula's loop is a straight line the compiler vectorises.  The recipe is copied first: the
// stores to `merged` could otherwise alias its fields and force a reload every element.
inline __attribute__((always_inline)) void merge_tile(const Recipe& recipe, const float* b,
                                                      const float* d, const float* a,
                                                      int64_t first_index, int64_t count,
                                                      float* merged) {
  const Recipe r = recipe;
  const int n = int(count);
  switch (r.kind) {
    case kTaskArithmetic: {
      const float wd = r.domain.weight;
      const float wa = r.align.weight;
      for (int i = 0; i < n; ++i) merged[i] = merge_one(b[i], d[i], a[i], wd, wa);
      break;
    }
    case kModels:
      for (int i = 0; i < n; ++i) merged[i] = merge_models(r, b[i], d[i], a[i]);
      break;
    case kNearSwap:
      for (int i = 0; i < n; ++i) merged[i] = merge_nearswap(r, b[i], d[i]);
      break;
    default: {
      VectorTile v;
      v.load(r, b, d, a, first_index, n);
      v.weigh(r, n);
      // One loop per election setting, so neither carries the other's selects.
      if (r.sign_election) {
        for (int i = 0; i < n; ++i) {
          merged[i] = combine_terms<true>(r, b[i], v.term_d[i], v.term_a[i]);
        }
      } else {
        for (int i = 0; i < n; ++i) {
          merged[i] = combine_terms<false>(r, b[i], v.term_d[i], v.term_a[i]);
        }
      }
      break;
    }
  }
}

}  // namespace mergealign
