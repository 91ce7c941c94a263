// Bindings of the reduction passes (methods/core/passes.py): vector statistics, magnitude
// histograms and selection, ties, sparsity norms, and the counter-based random draws.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <errno.h>
#include <cstring>
#include <fcntl.h>

#include <thread>
#include <tuple>
#include <vector>

#include "cpu_merge.h"
#include "direct_path.h"
#include "reductions.h"
#include "crc32c.h"
#include "host_pipeline.h"
#include "mapped_file.h"
#include "read_ahead.h"
#include "write_behind.h"
#include "merge_math.h"
#include "model_set.h"
#include "parallel.h"
#include "operands_from_python.h"

#include "bindings.h"

namespace py = pybind11;
using namespace mergealign;

namespace {

// A read-only pass found an input page gone (a file truncated under its mapping): OSError with
// errno EFAULT, which the engine reports as "input changed".
void raise_input_fault(int err) {
  if (err != 0) throw FileError(err, "an input of the pass");
}

// The int64[2][kHistogramBins] histogram behind a writable Python buffer (a bytearray).
int64_t* histogram_rows(py::buffer hist) {
  const py::buffer_info info = hist.request(true);
  if (info.size * info.itemsize != int64_t(2 * kHistogramBins * sizeof(int64_t))) {
    throw py::value_error("histogram buffer must hold 2 x HISTOGRAM_BINS int64");
  }
  return static_cast<int64_t*>(info.ptr);
}

}  // namespace

void mergealign::bind_reductions(py::module_& m) {
  m.def(
      "vector_stats",
      [](const MergeOperands& ops, int threads, bool models) {
        VectorStats s;
        int err;
        {
          py::gil_scoped_release no_gil;
          err = vector_stats_cpu(ops, models, threads, &s);
        }
        raise_input_fault(err);
        return py::make_tuple(s.domain_sq, s.align_sq, s.dot, s.conflicts, s.both_nonzero,
                              s.model_domain_sq, s.model_align_sq, s.model_dot,
                              s.model_base_sq, s.model_base_domain, s.model_base_align);
      },
      py::arg("ops"), py::arg("threads"), py::arg("models") = false,
      "fp64 sums of the task vectors over `count` elements (OSError EFAULT if an input "
      "vanished): (sum tau_d^2, sum tau_a^2, "
      "sum tau_d*tau_a, sign conflicts, elements where both are non-zero, sum domain^2, "
      "sum aligned^2, sum domain*aligned, sum base^2, sum base*domain, sum base*aligned); "
      "models=False fills the first five, True the last six (the others are 0).");

  m.def(
      "magnitude_histogram",
      [](const MergeOperands& ops, int prefix_domain, int prefix_align, py::buffer hist,
         int threads) {
        int64_t* bins = histogram_rows(hist);
        const int prefix[2] = {prefix_domain, prefix_align};
        int err;
        {
          py::gil_scoped_release no_gil;
          err = magnitude_histogram_cpu(ops, prefix, bins, threads);
        }
        raise_input_fault(err);
      },
      py::arg("ops"), py::arg("prefix_domain"), py::arg("prefix_align"), py::arg("hist"),
      py::arg("threads"),
      "Adds the magnitude histograms of tau_d and tau_a to `hist` (a writable buffer of "
      "2 x HISTOGRAM_BINS int64): prefix -1 counts the top 16 bits of |tau|, p >= 0 the low "
      "16 bits of "
      "elements whose top bits are p, -2 skips that model.");

  m.def(
      "select_kth_largest",
      [](py::buffer hist, int row, int64_t k) {
        const int64_t* bins = histogram_rows(hist);
        if (row != 0 && row != 1) throw py::value_error("row must be 0 or 1");
        if (k < 1) throw py::value_error("k must be at least 1");
        const Selection s = select_kth_largest(bins + int64_t(row) * kHistogramBins, k);
        return py::make_tuple(s.bin, s.above);
      },
      py::arg("hist"), py::arg("row"), py::arg("k"),
      "(bin holding the k-th largest value, count in higher bins); bin -1 if fewer than k.");

  m.def(
      "count_magnitude_ties",
      [](const MergeOperands& ops, uint32_t bits_domain, uint32_t bits_align, int threads) {
        const uint32_t bits[2] = {bits_domain, bits_align};
        int64_t counts[2] = {0, 0};
        int err;
        {
          py::gil_scoped_release no_gil;
          err = count_magnitude_ties_cpu(ops, bits, threads, counts);
        }
        raise_input_fault(err);
        return py::make_tuple(counts[0], counts[1]);
      },
      py::arg("ops"), py::arg("bits_domain"), py::arg("bits_align"), py::arg("threads"),
      "(elements whose |tau_d| has the fp32 bits bits_domain, same for tau_a).");

  m.def(
      "nth_magnitude_tie",
      [](const MergeOperands& ops, int model, uint32_t bits, int64_t n) {
        if (model != 0 && model != 1) throw py::value_error("model must be 0 or 1");
        if (n < 1) throw py::value_error("n must be at least 1");
        int64_t index;
        int err;
        {
          py::gil_scoped_release no_gil;
          err = nth_magnitude_tie(ops, model, bits, n, &index);
        }
        raise_input_fault(err);
        return index;
      },
      py::arg("ops"), py::arg("model"), py::arg("bits"), py::arg("n"),
      "Tensor index of the n-th element (index order) whose |tau| has the fp32 bits `bits`; "
      "-1 if fewer.");

  m.def(
      "sparsity_stats",
      [](const MergeOperands& ops, const Recipe& recipe, int threads) {
        SparsityStats s;
        int err;
        {
          py::gil_scoped_release no_gil;
          err = sparsity_stats_cpu(ops, recipe, threads, &s);
        }
        raise_input_fault(err);
        return py::make_tuple(s.l1[0], s.kept_l1[0], s.l1[1], s.kept_l1[1]);
      },
      py::arg("ops"), py::arg("recipe"), py::arg("threads"),
      "fp64 (L1 of tau_d, L1 of kept tau_d, L1 of tau_a, L1 of kept tau_a) under the recipe's "
      "sparsification.");

  m.def("random_draw24", &random_draw24, py::arg("key_lo"), py::arg("key_hi"), py::arg("index"),
        "The 24-bit random draw of one element (DARE masks), for tests and other backends.");
  m.def(
      "random_draws24",
      [](uint32_t key_lo, uint32_t key_hi, int64_t first_index, uintptr_t out, int64_t count) {
        py::gil_scoped_release no_gil;
        auto* draws = reinterpret_cast<uint32_t*>(out);
        for (int64_t i = 0; i < count; ++i) {
          draws[i] = random_draw24(key_lo, key_hi, first_index + i);
        }
      },
      py::arg("key_lo"), py::arg("key_hi"), py::arg("first_index"), py::arg("out"),
      py::arg("count"),
      "The draws of elements first_index .. first_index + count - 1 into `count` uint32 at out "
      "(DELLA's masks in numpy: 15x numpy's own evaluation of the hash).");


  m.attr("HISTOGRAM_BINS") = kHistogramBins;
  m.attr("HISTOGRAM_HIGH_BITS") = kHighBits;
  m.attr("HISTOGRAM_SKIP") = kSkip;
}
