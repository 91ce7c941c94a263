// Read-only statistics passes of the merge methods (reductions.cpp).  Each returns 0, or EFAULT
// when an input page vanished while being read; results are written only on success.
#pragma once

#include <cstdint>

#include "merge_operands.h"

namespace mergealign {

// Bins of one magnitude histogram: 16 bits of an fp32 pattern per radix pass.  Python reads it
// as _native.HISTOGRAM_BINS.
constexpr int64_t kHistogramBins = 1 << 16;

// Sums over elements of the two task vectors tau_d = domain - base and tau_a = aligned - base,
// accumulated in fp64 from the exact fp32 widenings of the inputs.  Per-thread partial sums are
// added in thread order, so a result depends only on the thread count.
struct VectorStats {
  double domain_sq = 0;   // sum tau_d^2
  double align_sq = 0;    // sum tau_a^2
  double dot = 0;         // sum tau_d * tau_a
  int64_t conflicts = 0;  // elements where tau_d and tau_a have opposite signs (both non-zero)
  int64_t both_nonzero = 0;
  double model_domain_sq = 0;  // sum domain^2 (SLERP and ChipAlign of the models)
  double model_align_sq = 0;   // sum aligned^2
  double model_dot = 0;        // sum domain * aligned
  double model_base_sq = 0;    // sum base^2 (with the two above, the models' Gram matrix:
  double model_base_domain = 0;  // sum base * domain       the Karcher mean's)
  double model_base_align = 0;   // sum base * aligned
};
// models = false sums the task vectors (the first five fields), true the models themselves (the
// last six): a pass computes only what its caller needs.
int vector_stats_cpu(const MergeOperands& ops, bool models, int threads, VectorStats* out);

// Radix selection of the TIES magnitude threshold, 16 bits per pass.  hist is
// int64[2][kHistogramBins], row 0 for tau_d and row 1 for tau_a, and is added to (so windows of
// a tensor accumulate).  prefix[m] = kHighBits: count the top 16 bits of |tau|'s fp32 pattern;
// >= 0: count the low 16 bits of the elements whose top bits equal prefix[m]; kSkip: leave row m
// alone.
constexpr int kHighBits = -1;
constexpr int kSkip = -2;
int magnitude_histogram_cpu(const MergeOperands& ops, const int prefix[2], int64_t* hist,
                            int threads);

// The bin holding the k-th largest value of a kHistogramBins-bin histogram, and how many values
// lie in higher bins.  k >= 1; returns bin -1 when the histogram holds fewer than k values.
struct Selection {
  int bin;
  int64_t above;
};
Selection select_kth_largest(const int64_t* row, int64_t k);

// Ties at a magnitude threshold: counts[m] += elements whose |tau| has exactly the fp32 bits
// bits[m] (m = 0: tau_d, 1: tau_a; bits[m] = 0xffffffff skips the model).
int count_magnitude_ties_cpu(const MergeOperands& ops, const uint32_t bits[2], int threads,
                             int64_t counts[2]);

// *index = the index (ops.first_index based) of the n-th element, n >= 1, in index order whose
// |tau| (model m) has exactly the fp32 bits `bits`, or -1 when there are fewer than n.  One
// thread: it scans a single window of a tensor, once per trimmed tensor.  Returns 0 or EFAULT.
int nth_magnitude_tie(const MergeOperands& ops, int model, uint32_t bits, int64_t n,
                      int64_t* index);

// L1 norms of the task vectors before and after the recipe's sparsification, for DARE's and
// TIES' rescale: index 0 for tau_d, 1 for tau_a.  Accumulated exactly (integer sums per fp32
// exponent), so they do not depend on the thread count or on how a tensor is split in windows.
struct SparsityStats {
  double l1[2] = {0, 0};
  double kept_l1[2] = {0, 0};
};
int sparsity_stats_cpu(const MergeOperands& ops, const Recipe& recipe, int threads,
                       SparsityStats* out);

}  // namespace mergealign
