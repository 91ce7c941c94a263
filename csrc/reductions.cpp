// Read-only passes over a tensor's three inputs, for the merge methods' per-tensor statistics:
// fp64 sums (SLERP, ChipAlign, inspect), the radix histograms and tie search of the TIES
// threshold, and the exact L1 sums of the DARE/TIES rescale.  Each runs on per-thread slices
// guarded against vanishing inputs (parallel.h) and combines the partial results in thread order.
#include "reductions.h"

#include <array>
#include <cmath>
#include <vector>

#include "merge_math.h"
#include "parallel.h"
#include "tiles.h"

namespace mergealign {
namespace {

// A read-only pass: range(begin, end, &partial[t]) on each thread's slice, protected like
// guarded_slices; `partial` gets one default-constructed result per thread, which the caller
// combines in thread order.  Returns 0 or EFAULT.
template <typename Partial, typename Range>
int reduce_slices(const MergeOperands& ops, int threads, std::vector<Partial>* partial,
                  Range range) {
  const int n_threads = effective_threads(ops.count, threads);
  partial->assign(size_t(n_threads), Partial());
  return guarded_slices(ops.count, n_threads, kTile, [&](int t, int64_t begin, int64_t end) {
    range(begin, end, &(*partial)[size_t(t)]);
  });
}

}  // namespace

namespace {

// fp64 sums in kLanes independent partial sums per tile, added in lane order at the tile's end:
// one running sum would chain every addition on the previous one (4 cycles each) and keep the
// loop scalar.  Tiles start at multiples of kTile in the tensor, so only the split between
// threads changes the order of additions.
constexpr int kLanes = 8;

template <bool kModels>
inline __attribute__((always_inline)) void stats_range_of(const MergeOperands& ops,
                                                          int64_t begin, int64_t end,
                                                          VectorStats* stats) {
  VectorStats local;
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a, int64_t,
                                     int64_t n) __attribute__((always_inline)) {
    double s0[kLanes] = {}, s1[kLanes] = {}, s2[kLanes] = {};
    double bb[kLanes] = {}, bd[kLanes] = {}, ba[kLanes] = {};  // kModels: the base's products
    int64_t conflicts[kLanes] = {}, both[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) {
      const int lane = int(i % kLanes);
      // Differences and products of fp32 values are exact in fp64.
      const double x = kModels ? double(d[i]) : double(d[i]) - double(b[i]);
      const double y = kModels ? double(a[i]) : double(a[i]) - double(b[i]);
      s0[lane] += x * x;
      s1[lane] += y * y;
      s2[lane] += x * y;
      if (kModels) {
        const double z = double(b[i]);
        bb[lane] += z * z;
        bd[lane] += z * x;
        ba[lane] += z * y;
      } else {
        conflicts[lane] += (x * y < 0);
        both[lane] += (x != 0 && y != 0);
      }
    }
    for (int lane = 0; lane < kLanes; ++lane) {
      if (kModels) {
        local.model_domain_sq += s0[lane];
        local.model_align_sq += s1[lane];
        local.model_dot += s2[lane];
        local.model_base_sq += bb[lane];
        local.model_base_domain += bd[lane];
        local.model_base_align += ba[lane];
      } else {
        local.domain_sq += s0[lane];
        local.align_sq += s1[lane];
        local.dot += s2[lane];
        local.conflicts += conflicts[lane];
        local.both_nonzero += both[lane];
      }
    }
  });
  *stats = local;
}

MA_CPU_CLONES
void stats_range(const MergeOperands& ops, bool models, int64_t begin, int64_t end,
                 VectorStats* stats) {
  if (models) {
    stats_range_of<true>(ops, begin, end, stats);
  } else {
    stats_range_of<false>(ops, begin, end, stats);
  }
}

}  // namespace

int vector_stats_cpu(const MergeOperands& ops, bool models, int threads, VectorStats* out) {
  VectorStats total;
  *out = total;
  if (ops.count <= 0) return 0;
  std::vector<VectorStats> partial;
  const int err = reduce_slices(ops, threads, &partial, [&](int64_t b, int64_t e, VectorStats* p) {
    stats_range(ops, models, b, e, p);
  });
  if (err != 0) return err;
  for (const VectorStats& p : partial) {
    total.domain_sq += p.domain_sq;
    total.align_sq += p.align_sq;
    total.dot += p.dot;
    total.conflicts += p.conflicts;
    total.both_nonzero += p.both_nonzero;
    total.model_domain_sq += p.model_domain_sq;
    total.model_align_sq += p.model_align_sq;
    total.model_dot += p.model_dot;
    total.model_base_sq += p.model_base_sq;
    total.model_base_domain += p.model_base_domain;
    total.model_base_align += p.model_base_align;
  }
  *out = total;
  return 0;
}

namespace {

MA_CPU_CLONES
void histogram_range(const MergeOperands& ops, const int* prefix, int64_t begin, int64_t end,
                     int64_t* hist) {
  // Four interleaved uint32 sub-histograms per model: neighbouring elements often fall in one
  // bin, and back-to-back increments of one counter wait for each other's store (~5 cycles);
  // spread over four they overlap.  They are added into hist at the end, and before any counter
  // could pass 2^32.
  constexpr int kWays = 4;
  std::vector<uint32_t> sub(size_t(2) * kWays * kHistogramBins, 0);
  int64_t pending = 0;
  auto flush = [&] {
    for (int m = 0; m < 2; ++m) {
      for (int w = 0; w < kWays; ++w) {
        uint32_t* from = &sub[(size_t(m) * kWays + w) * kHistogramBins];
        for (int64_t bin = 0; bin < kHistogramBins; ++bin) {
          hist[m * kHistogramBins + bin] += from[bin];
        }
        std::fill(from, from + kHistogramBins, 0u);
      }
    }
    pending = 0;
  };
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a, int64_t,
                                     int64_t n) __attribute__((always_inline)) {
    const float* model[2] = {d, a};
    for (int m = 0; m < 2; ++m) {
      if (prefix[m] == kSkip) continue;
      uint32_t* h = &sub[size_t(m) * kWays * kHistogramBins];
      const float* x = model[m];
      if (prefix[m] == kHighBits) {
        for (int i = 0; i < int(n); ++i) {
          ++h[(i % kWays) * kHistogramBins + (magnitude_bits(ma_sub(x[i], b[i])) >> 16)];
        }
      } else {
        const uint32_t wanted = uint32_t(prefix[m]);
        for (int i = 0; i < int(n); ++i) {
          const uint32_t bits = magnitude_bits(ma_sub(x[i], b[i]));
          if ((bits >> 16) == wanted) ++h[(i % kWays) * kHistogramBins + (bits & 0xffffu)];
        }
      }
    }
    pending += n;
    if (pending >= (int64_t(1) << 31)) flush();
  });
  flush();
}

// L1 sums accumulated exactly: |tau| = mantissa * 2^(exponent - 150) for an fp32 with biased
// exponent >= 1 (2^-149 * mantissa for subnormals), so per model, kept or dropped, and exponent
// the integer mantissas are summed in int64 (2^39 elements per bin before overflow).  Integer
// sums do not depend on the order of the additions: the rescale factor, and so the merged
// model, is the same for every thread count and chunking.
struct ExactL1 {
  int64_t bins[2][2][256] = {};  // [model][kept][biased exponent]

  inline __attribute__((always_inline)) void add(int m, float tau, bool kept) {
    const uint32_t bits = magnitude_bits(tau);
    const uint32_t exponent = bits >> 23;
    const uint32_t mantissa = (bits & 0x7fffffu) | (exponent != 0 ? 0x800000u : 0u);
    bins[m][kept][exponent] += mantissa;
  }

  void add(const ExactL1& other) {
    for (int m = 0; m < 2; ++m) {
      for (int k = 0; k < 2; ++k) {
        for (int e = 0; e < 256; ++e) bins[m][k][e] += other.bins[m][k][e];
      }
    }
  }

  // Sum of bins[m][k] in fp64, in exponent order (a fixed order: deterministic).
  double value(int m, int k) const {
    double sum = 0;
    for (int e = 0; e < 256; ++e) {
      sum += std::ldexp(double(bins[m][k][e]), std::max(e, 1) - 150);
    }
    return sum;
  }
};

MA_CPU_CLONES
void sparsity_range(const MergeOperands& ops, const Recipe& r, int64_t begin, int64_t end,
                    ExactL1* sums) {
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a,
                                     int64_t start, int64_t n) __attribute__((always_inline)) {
    VectorTile v;
    v.load(r, b, d, a, ops.first_index + start, int(n));
    for (int i = 0; i < int(n); ++i) {
      sums->add(0, v.tau_d[i], v.keep_d[i] != 0);
      sums->add(1, v.tau_a[i], v.keep_a[i] != 0);
    }
  });
}

MA_CPU_CLONES
void ties_range(const MergeOperands& ops, const uint32_t* bits, int64_t begin, int64_t end,
                int64_t* counts) {
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a, int64_t,
                                     int64_t n) __attribute__((always_inline)) {
    const float* model[2] = {d, a};
    for (int m = 0; m < 2; ++m) {
      int64_t c = 0;
      for (int64_t i = 0; i < n; ++i) c += magnitude_bits(ma_sub(model[m][i], b[i])) == bits[m];
      counts[m] += c;
    }
  });
}

// The n-th tie of nth_magnitude_tie in [begin, end): tiles are counted in bulk and only the tile
// holding it is searched element by element.
MA_CPU_CLONES
int64_t find_nth_tie(const MergeOperands& ops, int model, uint32_t bits, int64_t n,
                     int64_t begin, int64_t end) {
  const unsigned char* x = model == 0 ? ops.domain : ops.aligned;
  const int dtype = model == 0 ? ops.domain_dtype : ops.aligned_dtype;
  alignas(64) float bt[kTile];
  alignas(64) float xt[kTile];
  for (int64_t start = begin; start < end; start += kTile) {
    const int count = int(std::min(kTile, end - start));
    load_tile(ops.base, ops.base_dtype, start, count, bt, ops.input_cast);
    load_tile(x, dtype, start, count, xt, ops.input_cast);
    int64_t ties = 0;
    for (int i = 0; i < count; ++i) ties += magnitude_bits(ma_sub(xt[i], bt[i])) == bits;
    if (ties < n) {
      n -= ties;
      continue;
    }
    for (int i = 0; i < count; ++i) {
      if (magnitude_bits(ma_sub(xt[i], bt[i])) == bits && --n == 0) {
        return ops.first_index + start + i;
      }
    }
  }
  return -1;
}

}  // namespace

int count_magnitude_ties_cpu(const MergeOperands& ops, const uint32_t bits[2], int threads,
                             int64_t counts[2]) {
  if (ops.count <= 0) return 0;
  std::vector<std::array<int64_t, 2>> partial;
  const int err = reduce_slices(ops, threads, &partial,
                                [&](int64_t b, int64_t e, std::array<int64_t, 2>* p) {
                                  ties_range(ops, bits, b, e, p->data());
                                });
  if (err != 0) return err;
  for (const auto& p : partial) {
    counts[0] += p[0];
    counts[1] += p[1];
  }
  return 0;
}

int nth_magnitude_tie(const MergeOperands& ops, int model, uint32_t bits, int64_t n,
                      int64_t* index) {
  *index = -1;
  int64_t found = -1;
  const int err = guarded_slices(ops.count, 1, kTile, [&](int, int64_t begin, int64_t end) {
    found = find_nth_tie(ops, model, bits, n, begin, end);
  });
  if (err != 0) return err;
  *index = found;
  return 0;
}

int magnitude_histogram_cpu(const MergeOperands& ops, const int prefix[2], int64_t* hist,
                            int threads) {
  if (ops.count <= 0) return 0;
  // Per-thread histograms (2 x 512 KiB each), added in thread order: counts are exact.
  std::vector<std::vector<int64_t>> partial;
  const int err = reduce_slices(ops, threads, &partial,
                                [&](int64_t b, int64_t e, std::vector<int64_t>* p) {
                                  p->assign(2 * kHistogramBins, 0);
                                  histogram_range(ops, prefix, b, e, p->data());
                                });
  if (err != 0) return err;
  for (const auto& p : partial) {
    for (int64_t i = 0; i < 2 * kHistogramBins; ++i) hist[i] += p[i];
  }
  return 0;
}

Selection select_kth_largest(const int64_t* row, int64_t k) {
  int64_t above = 0;
  for (int bin = int(kHistogramBins) - 1; bin >= 0; --bin) {
    if (above + row[bin] >= k) return Selection{bin, above};
    above += row[bin];
  }
  return Selection{-1, above};
}

int sparsity_stats_cpu(const MergeOperands& ops, const Recipe& recipe, int threads,
                       SparsityStats* out) {
  *out = SparsityStats();
  if (ops.count <= 0) return 0;
  std::vector<ExactL1> partial;
  const int err = reduce_slices(ops, threads, &partial, [&](int64_t b, int64_t e, ExactL1* p) {
    sparsity_range(ops, recipe, b, e, p);
  });
  if (err != 0) return err;
  ExactL1 total;
  for (const ExactL1& p : partial) total.add(p);
  for (int m = 0; m < 2; ++m) {
    out->kept_l1[m] = total.value(m, 1);
    out->l1[m] = out->kept_l1[m] + total.value(m, 0);
  }
  return 0;
}

}  // namespace mergealign
