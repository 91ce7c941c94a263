// The low-rank product of LoRA-adapted inputs (low_rank.h).
//
// Rows go in blocks of kRows, columns in register strips (rows_of_block).  Unlike OpenBLAS's
// sgemm, whose results change with the number of rows it is given, every element is the same
// whatever the window or thread count.
#include "low_rank.h"

#include <algorithm>
#include <cerrno>

#include "parallel.h"
#include "tiles.h"

namespace mergealign {
namespace {

// Register blocks of kRows rows x kStrip columns: 8 x 32 fp32 accumulators are 16 AVX-512 (or
// 32 AVX2) registers' worth, and each R strip loaded serves eight rows.  The products are
// accumulated with explicit fused multiply-adds: fmaf is exactly rounded everywhere (the
// AVX2/AVX-512 clones' vfmadd, the baseline clone's glibc fmaf), so every clone gives the same
// bits, while -ffp-contract=off still keeps the compiler from fusing anything else.  Measured
// on this project's 2-core EPYC VM (AVX-512 clone), rank 64, a 5632 x 2048 fp16 weight, two
// threads: ~230 GFLOP/s, against ~150 for 6 x 32 blocks without FMA, ~55 for 4 x 256 tiles
// kept in L1, and 100-160 for OpenBLAS's sgemm (4 x 16 and 8 x 16 blocks are slower still: GCC
// does not vectorise their short loops).
constexpr int64_t kRows = 8;
constexpr int64_t kStrip = 32;
// The columns left over past the last whole strip, and rows past the last whole block, go in
// tiles of kColumns kept in L1.
constexpr int64_t kColumns = 256;

// Where a block's result goes: out (out_dtype), and the stored W it is added to (dtype), both
// advancing `stride` elements a row.
struct Target {
  unsigned char* out;
  int out_dtype;
  const unsigned char* base;
  int dtype;
  int64_t stride;
  float scale;
};

// out = round(W + scale * acc) for NR rows of n columns from `first`.
template <int64_t NR, int64_t N>
inline __attribute__((always_inline)) void finish(const Target& t, int64_t first, int64_t n,
                                                  const float (&acc)[NR][N]) {
  alignas(64) float values[N];
  for (int64_t r = 0; r < NR; ++r) {
    load_stored_tile(t.base, t.dtype, r * t.stride + first, n, values);
    for (int64_t c = 0; c < n; ++c) values[c] = values[c] + t.scale * acc[r][c];
    store_tile(t.out, t.out_dtype, r * t.stride + first, n, values);
  }
}

// acc[r][c] = sum over k of L[r][k] * R[k][c] for NR rows and n <= N columns, in order, as
// fused multiply-adds: acc = fma(l1, r1, fma(l0, r0, 0)) ...  Inlined with n = N, the
// accumulators of a register strip stay in registers.
template <int64_t NR, int64_t N>
inline __attribute__((always_inline)) void accumulate(float (&acc)[NR][N], const float* left,
                                                      const float* right, int64_t rank,
                                                      int64_t width, int64_t n) {
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t c = 0; c < n; ++c) acc[r][c] = 0.0f;
  for (int64_t k = 0; k < rank; ++k) {
    const float* __restrict strip = right + k * width;
    for (int64_t r = 0; r < NR; ++r) {
      const float l = left[r * rank + k];
      float* __restrict a = acc[r];
      for (int64_t c = 0; c < n; ++c) a[c] = __builtin_fmaf(l, strip[c], a[c]);
    }
  }
}

// NR rows, columns [0, ncols) relative to col_begin: whole kStrip strips in registers (NR ==
// kRows only), the rest in kColumns tiles; every element the same sum either way.
template <int64_t NR>
MA_CPU_CLONES void rows_of_block(const Target& target, const float* left, const float* right,
                                 int64_t rank, int64_t width, int64_t col_begin, int64_t ncols) {
  int64_t c0 = 0;
  if (NR == kRows) {
    float acc[NR][kStrip];
    for (; c0 + kStrip <= ncols; c0 += kStrip) {
      accumulate<NR, kStrip>(acc, left, right + col_begin + c0, rank, width, kStrip);
      finish<NR, kStrip>(target, c0, kStrip, acc);
    }
  }
  alignas(64) float acc[NR][kColumns];
  for (; c0 < ncols; c0 += kColumns) {
    const int64_t n = std::min(kColumns, ncols - c0);
    accumulate<NR, kColumns>(acc, left, right + col_begin + c0, rank, width, n);
    finish<NR, kColumns>(target, c0, n, acc);
  }
}

}  // namespace

int low_rank_add(void* out, int out_dtype, const void* base, int base_dtype,
                 const float* left, const float* right, int64_t rows, int64_t rank,
                 int64_t width, int64_t col_begin, int64_t col_end, float scale, int threads) {
  const int64_t ncols = col_end - col_begin;
  if (rows <= 0 || ncols <= 0) return 0;
  auto* written = static_cast<unsigned char*>(out);
  const auto* stored = static_cast<const unsigned char*>(base);
  const int64_t itemsize = dtype_size(base_dtype), out_itemsize = dtype_size(out_dtype);
  auto target = [&](int64_t r) {
    return Target{written + r * ncols * out_itemsize, out_dtype,
                  stored + r * ncols * itemsize, base_dtype, ncols, scale};
  };
  // Threads take whole blocks of rows; a single row (the window's partial first or last) is
  // one thread's.
  const int use = effective_threads(rows * ncols * std::max<int64_t>(rank, 1) / 16, threads);
  return guarded_slices(rows, use, kRows, [&](int, int64_t begin, int64_t end) {
    int64_t r = begin;
    for (; r + kRows <= end; r += kRows) {
      rows_of_block<kRows>(target(r), left + r * rank, right, rank, width, col_begin, ncols);
    }
    for (; r < end; ++r) {
      rows_of_block<1>(target(r), left + r * rank, right, rank, width, col_begin, ncols);
    }
  });
}

}  // namespace mergealign
