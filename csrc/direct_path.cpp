// The direct path (direct_path.h): AVX2 loops, one per dtype, no tiles.
#include "direct_path.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "merge_math.h"
#include "tiles.h"

namespace mergealign {

int64_t direct_buffer_offset(const MergeOperands& ops, int64_t begin) {
  const uintptr_t address = uintptr_t(ops.base) + uintptr_t(begin * dtype_size(ops.base_dtype));
  return int64_t(address % kDirectAlignment);
}

#ifdef MA_HAVE_F16C_PATH
namespace {

bool tiles_only() {
  static const bool yes = [] {
    const char* only = std::getenv("MERGEALIGN_TILES_ONLY");
    return only != nullptr && only[0] == '1';
  }();
  return yes;
}

bool cpu_has_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return bool(__builtin_cpu_supports("avx2"));
  }();
  return yes;
}

// Elements [first, last) one at a time with merge_math.h's own functions: the unaligned head
// and the tail shorter than a vector step.
void merge_scalar(const MergeOperands& ops, const Recipe* recipes, int k, int64_t begin,
                  int64_t first, int64_t last, unsigned char* const* outs, int64_t* nonfinite) {
  const int dt = ops.out_dtype;
  const float limit = overflow_threshold(dt);
  for (int64_t i = first; i < last; ++i) {
    const float b = load_as_f32(ops.base, i, dt);
    const float d = load_as_f32(ops.domain, i, dt);
    const float a = load_as_f32(ops.aligned, i, dt);
    for (int j = 0; j < k; ++j) {
      const float v = merge_one(b, d, a, recipes[j].domain.weight, recipes[j].align.weight);
      store_from_f32(outs[j], i - begin, dt, v);
      if (nonfinite != nullptr) nonfinite[j] += !(std::fabs(v) < limit);
    }
  }
}

#pragma GCC push_options
#pragma GCC target("avx2,f16c")

// 16 stored 16-bit values with NaNs (magnitude above the dtype's infinity `inf_bits`) made the
// canonical NaN: 3 operations per 16 values, where blending the fp32 lanes before rounding took
// 4 (one-thread bf16 lost 9% to that).
inline __m256i canonical_nan16(__m256i h, int16_t inf_bits, uint16_t canonical) {
  const __m256i magnitude = _mm256_and_si256(h, _mm256_set1_epi16(0x7fff));
  const __m256i nan = _mm256_cmpgt_epi16(magnitude, _mm256_set1_epi16(inf_bits));
  return _mm256_blendv_epi8(h, _mm256_set1_epi16(int16_t(canonical)), nan);
}

// Each codec moves one 32-byte store's worth of values per step (kStep: 16 of a 2-byte dtype,
// 8 of fp32): load widens kStep values from element i of a byte pointer to fp32 in kRegs
// registers, store narrows kRegs registers to element i, rounded as merge_math.h's
// store_from_f32 rounds.
template <bool kStream>
inline void store32(unsigned char* p, __m256i v) {
  if (kStream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
}

struct Bf16 {
  static constexpr int kDtype = kBF16;
  static constexpr int64_t kSize = 2;
  static constexpr int64_t kLine = 64 / kSize;  // elements per 64-byte line
  static constexpr int64_t kStep = 16;
  static constexpr int kRegs = 2;
  // 16 bf16 values into two registers of fp32, a bf16 being the high half of its fp32: v[0]
  // holds the even elements (each 32-bit lane shifted up), v[1] the odd ones (low halves
  // cleared).  Every lane is computed alike, and store puts each back in its 16-bit slot with
  // one blend: 2 operations a step where unpacking and packing took 3, which a single thread,
  // compute-bound on bf16 at ~3.5 instructions a cycle, turns into speed.
  static void load(const unsigned char* p, int64_t i, __m256* v) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2 * i));
    v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    v[1] = _mm256_castsi256_ps(_mm256_and_si256(h, _mm256_set1_epi32(int(0xffff0000u))));
  }
  // f32_to_bf16 on 8 lanes, the result in the high half of each 32-bit lane (the low half is
  // left over): round to nearest even.  A NaN here is an input NaN (low 16 bits zero) or x86's
  // default NaN 0xffc00000, so adding 0x7fff cannot carry out of its payload: it stays a NaN,
  // which store then makes the canonical one.
  static __m256i round8_high(__m256 v) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), odd);
  }
  template <bool kStream>
  static void store(unsigned char* p, int64_t i, const __m256* v) {
    const __m256i even = _mm256_srli_epi32(round8_high(v[0]), 16);
    const __m256i packed = _mm256_blend_epi16(even, round8_high(v[1]), 0xaa);
    store32<kStream>(p + 2 * i, canonical_nan16(packed, 0x7f80, kCanonicalNanBf16));
  }
};

struct F16 {
  static constexpr int kDtype = kF16;
  static constexpr int64_t kSize = 2;
  static constexpr int64_t kLine = 64 / kSize;  // elements per 64-byte line
  static constexpr int64_t kStep = 16;
  static constexpr int kRegs = 2;
  static void load(const unsigned char* p, int64_t i, __m256* v) {
    v[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * i)));
    v[1] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * i + 16)));
  }
  template <bool kStream>
  static void store(unsigned char* p, int64_t i, const __m256* v) {
    const __m128i l = _mm256_cvtps_ph(v[0], _MM_FROUND_TO_NEAREST_INT);
    const __m128i h = _mm256_cvtps_ph(v[1], _MM_FROUND_TO_NEAREST_INT);
    const __m256i packed = _mm256_inserti128_si256(_mm256_castsi128_si256(l), h, 1);
    store32<kStream>(p + 2 * i, canonical_nan16(packed, 0x7c00, kCanonicalNanF16));
  }
};

struct F32 {
  static constexpr int kDtype = kF32;
  static constexpr int64_t kSize = 4;
  static constexpr int64_t kLine = 64 / kSize;
  // 8 at a time, not 16 in two registers: with 16, GCC schedules the second store of a line
  // before the first, and one thread ran 3-4% slower (fp32, AMD EPYC, 3 x 8 rounds).
  static constexpr int64_t kStep = 8;
  static constexpr int kRegs = 1;
  static void load(const unsigned char* p, int64_t i, __m256* v) {
    v[0] = _mm256_loadu_ps(reinterpret_cast<const float*>(p + 4 * i));
  }
  template <bool kStream>
  static void store(unsigned char* p, int64_t i, const __m256* v) {
    store32<kStream>(p + 4 * i, _mm256_castps_si256(canonical_nan8(v[0])));
  }
};

// merge_one on 8 lanes, in its order: (base + w_d (domain - base)) + w_a (aligned - base).
// The codecs' stores make a NaN the canonical NaN every store writes (merge_math.h).
inline __m256 merge8(__m256 b, __m256 d, __m256 a, __m256 wd, __m256 wa) {
  const __m256 domain_step = _mm256_mul_ps(wd, _mm256_sub_ps(d, b));
  const __m256 align_step = _mm256_mul_ps(wa, _mm256_sub_ps(a, b));
  return _mm256_add_ps(_mm256_add_ps(b, domain_step), align_step);
}

// Lanes that are NaN or at least `limit` in magnitude (they store as NaN or ±inf).
inline int64_t count_nonfinite8(__m256 v, __m256 limit) {
  const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
  const int finite = _mm256_movemask_ps(_mm256_cmp_ps(magnitude, limit, _CMP_LT_OQ));
  return 8 - __builtin_popcount(unsigned(finite));
}

// Software prefetch of each input, kPrefetchBytes ahead plus kPrefetchStagger per input.  The
// hardware prefetchers alone left one core at 69-78% of memcpy on fp32 (AMD EPYC, 1 thread).
// 512 bytes ahead covers a DRAM latency (~100 ns at ~8 GB/s per input stream).  The stagger:
// the three inputs of a trio usually sit at the same offset modulo a large power of two (one
// file layout, or one array split in three), so their lines map to the same DRAM channel and
// bank at the same moment; asking for each a little further than the last spreads the requests
// over channels.  Measured on a plain fp32 loop, 1 thread, best of 12 rounds, 128 MiB per input,
// percent of the fastest memcpy, for one array split in three (6 runs) and three arrays
// allocated apart (4 runs): 1 KiB ahead + 2 KiB stagger 81-91 / 87-89, 512 + 1 KiB 89-94 /
// 88-96, 512 + 768 90-95 / 90-96, 256 + 1 KiB 84-92 / 96-99, stagger only 86-88 / 98-101; no
// prefetch 78-82; T1 (L2) prefetches 4 KiB ahead 70-78.  512 + 768 has the best worst case.  A
// prefetch past the end of an input is harmless: the instruction never faults.
constexpr int64_t kPrefetchBytes = 512;
constexpr int64_t kPrefetchStagger = 768;

inline void prefetch_ahead(const unsigned char* p, int input) {
  _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes + input * kPrefetchStagger),
               _MM_HINT_T0);
}

// One line (64 bytes) of each input per iteration, so each line is prefetched once: 32 elements
// of a 2-byte dtype, 16 of fp32, in steps of one 32-byte store.  kSingle (one recipe, its
// weights kept in registers) and kCount (NaN/inf counted) are template arguments so the common
// cases carry no per-element branch.
template <class Codec, bool kStream, bool kSingle, bool kCount>
void merge_vectors_direct(const MergeOperands& ops, const Recipe* recipes, int k, int64_t begin,
                          int64_t first, int64_t last, unsigned char* const* outs,
                          int64_t* nonfinite) {
  const __m256 limit = _mm256_set1_ps(overflow_threshold(Codec::kDtype));
  const __m256 single_wd = _mm256_set1_ps(recipes[0].domain.weight);
  const __m256 single_wa = _mm256_set1_ps(recipes[0].align.weight);
  const int count = kSingle ? 1 : k;
  const unsigned char* base = ops.base;
  const unsigned char* domain = ops.domain;
  const unsigned char* aligned = ops.aligned;
  unsigned char* const single_out = outs[0];  // read once: the stores could alias outs[]
  constexpr int kRegs = Codec::kRegs;
  for (int64_t line = first; line < last; line += Codec::kLine) {
    prefetch_ahead(base + line * Codec::kSize, 0);
    prefetch_ahead(domain + line * Codec::kSize, 1);
    prefetch_ahead(aligned + line * Codec::kSize, 2);
    for (int64_t step = 0; step < Codec::kLine; step += Codec::kStep) {
      const int64_t i = line + step;
      __m256 b[kRegs], d[kRegs], a[kRegs], merged[kRegs];
      Codec::load(base, i, b);
      Codec::load(domain, i, d);
      Codec::load(aligned, i, a);
      for (int j = 0; j < count; ++j) {
        const __m256 wd = kSingle ? single_wd : _mm256_set1_ps(recipes[j].domain.weight);
        const __m256 wa = kSingle ? single_wa : _mm256_set1_ps(recipes[j].align.weight);
        for (int r = 0; r < kRegs; ++r) merged[r] = merge8(b[r], d[r], a[r], wd, wa);
        Codec::template store<kStream>(kSingle ? single_out : outs[j], i - begin, merged);
        if (kCount) {
          for (int r = 0; r < kRegs; ++r) nonfinite[j] += count_nonfinite8(merged[r], limit);
        }
      }
    }
  }
  if (kStream) _mm_sfence();  // streaming stores are weakly ordered: publish them before return
}

template <class Codec, bool kStream>
void merge_vectors_direct(const MergeOperands& ops, const Recipe* recipes, int k, int64_t begin,
                          int64_t first, int64_t last, unsigned char* const* outs,
                          int64_t* nonfinite) {
  if (k == 1 && nonfinite == nullptr) {
    merge_vectors_direct<Codec, kStream, true, false>(ops, recipes, k, begin, first, last, outs,
                                                       nonfinite);
  } else if (k == 1) {
    merge_vectors_direct<Codec, kStream, true, true>(ops, recipes, k, begin, first, last, outs,
                                                      nonfinite);
  } else if (nonfinite == nullptr) {
    merge_vectors_direct<Codec, kStream, false, false>(ops, recipes, k, begin, first, last, outs,
                                                        nonfinite);
  } else {
    merge_vectors_direct<Codec, kStream, false, true>(ops, recipes, k, begin, first, last, outs,
                                                       nonfinite);
  }
}

// Elements from `begin` to the first 32-byte boundary of the base input; none when its address
// is not a multiple of the element size (then no element of it is aligned).
inline int64_t elements_to_alignment(const MergeOperands& ops, int64_t begin, int64_t size) {
  const int64_t misaligned = direct_buffer_offset(ops, begin);
  if (misaligned % size != 0) return 0;
  return (kDirectAlignment - misaligned) % kDirectAlignment / size;
}

template <class Codec>
void merge_direct(const MergeOperands& ops, const Recipe* recipes, int k, int64_t begin,
                  int64_t end, unsigned char* const* outs, int64_t* nonfinite, bool stream) {
  constexpr int64_t size = Codec::kSize;
  const int64_t first = begin + std::min(end - begin, elements_to_alignment(ops, begin, size));
  const int64_t last = first + (end - first) / Codec::kLine * Codec::kLine;
  merge_scalar(ops, recipes, k, begin, begin, first, outs, nonfinite);
  bool outputs_aligned = true;
  for (int j = 0; j < k; ++j) {
    outputs_aligned &= uintptr_t(outs[j] + (first - begin) * size) % kDirectAlignment == 0;
  }
  if (stream && outputs_aligned) {
    merge_vectors_direct<Codec, true>(ops, recipes, k, begin, first, last, outs, nonfinite);
  } else {
    merge_vectors_direct<Codec, false>(ops, recipes, k, begin, first, last, outs, nonfinite);
  }
  merge_scalar(ops, recipes, k, begin, last, end, outs, nonfinite);
}

#pragma GCC pop_options

}  // namespace

bool direct_path_available() { return !tiles_only() && cpu_has_avx2(); }

bool direct_path_applies(const MergeOperands& ops, const Recipe* recipes, int k) {
  const int dt = ops.out_dtype;
  if (!direct_path_available()) return false;
  if (ops.base_dtype != dt || ops.domain_dtype != dt || ops.aligned_dtype != dt) return false;
  if (cast_changes(dt, ops.input_cast)) return false;
  if (dt == kF16 && !cpu_has_f16c()) return false;
  for (int j = 0; j < k; ++j) {
    if (recipes[j].kind != kTaskArithmetic) return false;
  }
  return true;
}

void merge_range_direct(const MergeOperands& ops, const Recipe* recipes, int k, int64_t begin,
                        int64_t end, unsigned char* const* outs, int64_t* nonfinite,
                        bool stream) {
  switch (ops.out_dtype) {
    case kBF16:
      merge_direct<Bf16>(ops, recipes, k, begin, end, outs, nonfinite, stream);
      break;
    case kF16:
      merge_direct<F16>(ops, recipes, k, begin, end, outs, nonfinite, stream);
      break;
    default:
      merge_direct<F32>(ops, recipes, k, begin, end, outs, nonfinite, stream);
      break;
  }
}

#else  // not x86-64 GCC: the tile layer does every pass

bool direct_path_available() { return false; }

bool direct_path_applies(const MergeOperands&, const Recipe*, int) { return false; }

void merge_range_direct(const MergeOperands&, const Recipe*, int, int64_t, int64_t,
                        unsigned char* const*, int64_t*, bool) {
  std::abort();  // unreachable: direct_path_applies is false here
}

#endif

}  // namespace mergealign
