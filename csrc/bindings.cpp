// Python bindings for the native core.  Everything crosses as plain integers (addresses, counts,
// dtype codes, file descriptors) so the core links against neither torch nor numpy; the Python
// layer (mergealign_fast/kernels/cpu.py) validates dtypes, sizes and lifetimes before calling.
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

void check_dtype(int dtype) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16) {
    throw py::value_error("unknown dtype code " + std::to_string(dtype));
  }
}

ModelSetOperands make_set_operands(uintptr_t base, int base_dtype,
                                   const std::vector<uintptr_t>& models,
                                   const std::vector<int>& model_dtypes, int64_t count,
                                   int out_dtype, int64_t first_index, int input_cast) {
  check_input_cast(input_cast);
  if (models.empty() || models.size() > size_t(kMaxModels)) {
    throw py::value_error("a model set holds 1 to " + std::to_string(kMaxModels) +
                          " models besides the base (got " + std::to_string(models.size()) + ")");
  }
  if (models.size() != model_dtypes.size()) {
    throw py::value_error("one dtype per model");
  }
  if (count < 0) throw py::value_error("negative element count");
  if (first_index < 0) throw py::value_error("negative first index");
  ModelSetOperands ops;
  ops.base = reinterpret_cast<const unsigned char*>(base);
  check_dtype(base_dtype);
  check_dtype(out_dtype);
  ops.base_dtype = base_dtype;
  ops.model_count = int(models.size());
  for (size_t m = 0; m < models.size(); ++m) {
    check_dtype(model_dtypes[m]);
    ops.models[m] = reinterpret_cast<const unsigned char*>(models[m]);
    ops.model_dtypes[m] = model_dtypes[m];
  }
  ops.out_dtype = out_dtype;
  ops.count = count;
  ops.first_index = first_index;
  ops.input_cast = input_cast;
  return ops;
}

VectorTerm& set_term(ModelSetRecipe& r, int m) {
  if (m < 0 || m >= kMaxModels) throw py::index_error("model index out of range");
  return r.terms[m];
}

// [(fd, file_offset, recipe), ...] from Python.
template <typename Target, typename RecipeType>
std::vector<Target> parse_targets(py::list targets) {
  std::vector<Target> parsed;
  for (py::handle item : targets) {
    auto t = item.cast<py::tuple>();
    parsed.push_back(Target{t[0].cast<int>(), t[1].cast<int64_t>(), t[2].cast<RecipeType>()});
  }
  return parsed;
}

// (errno or 0, [CRC-32C per target], [NaN/inf values per target]) of a write to files.
template <typename Write>
py::tuple write_to_files(size_t k, Write write) {
  std::vector<uint32_t> crcs(k);
  std::vector<int64_t> nonfinite(k);
  int err;
  {
    py::gil_scoped_release no_gil;
    err = write(crcs.data(), nonfinite.data());
  }
  py::list crc_list, nonfinite_list;
  for (uint32_t c : crcs) crc_list.append(c);
  for (int64_t n : nonfinite) nonfinite_list.append(n);
  return py::make_tuple(err, crc_list, nonfinite_list);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "mergealign-fast native CPU core (torch-free)";

  // A failed open()/mmap() surfaces as Python's OSError with errno and file name, so callers can
  // report "base/model.safetensors: Permission denied" without parsing strings.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const FileError& e) {
      errno = e.err;
      PyErr_SetFromErrnoWithFilename(PyExc_OSError, e.path.c_str());
    }
  });

  bind_operands(m);

  m.def(
      "merge",
      [](const MergeOperands& ops, uintptr_t out, double w_domain, double w_align, int threads) {
        const MergeOperands weighted = with_weights(ops, w_domain, w_align);
        py::gil_scoped_release no_gil;
        merge_cpu(weighted, reinterpret_cast<unsigned char*>(out), threads);
      },
      py::arg("ops"), py::arg("out"), py::arg("w_domain"), py::arg("w_align"), py::arg("threads"),
      "Fused task-arithmetic merge of the operands into `out` (ops.out_dtype).");

  m.def(
      "merge_recipe",
      [](const MergeOperands& ops, uintptr_t out, const Recipe& recipe, int threads) {
        py::gil_scoped_release no_gil;
        merge_cpu_recipe(ops, recipe, reinterpret_cast<unsigned char*>(out), threads);
      },
      py::arg("ops"), py::arg("out"), py::arg("recipe"), py::arg("threads"),
      "Merge of the operands with a method's Recipe into `out`.");

  m.def(
      "merge_elementwise",
      [](const MergeOperands& ops, uintptr_t out, const Recipe& recipe) {
        py::gil_scoped_release no_gil;
        merge_cpu_elementwise(ops, recipe, reinterpret_cast<unsigned char*>(out));
      },
      py::arg("ops"), py::arg("out"), py::arg("recipe"),
      "The merge one element at a time through the per-element path the CUDA kernels run.");

  m.def(
      "merge_to_files",
      [](const MergeOperands& ops, py::list targets, int threads) {
        auto parsed = parse_targets<WriteTarget, Recipe>(targets);
        return write_to_files(parsed.size(), [&](uint32_t* crcs, int64_t* nonfinite) {
          return merge_cpu_to_files(ops, parsed.data(), int(parsed.size()), threads, crcs,
                                    nonfinite);
        });
      },
      py::arg("ops"), py::arg("targets"), py::arg("threads"),
      "One pass over the inputs, one output per (fd, file_offset, recipe) target, written in "
      "<= 1 MiB pwrite()s; returns (errno or 0, [CRC-32C per target], [NaN/inf values per "
      "target]).");

  py::class_<ModelSetOperands>(m, "SetOperands")
      .def(py::init(&make_set_operands), py::arg("base"), py::arg("base_dtype"),
           py::arg("models"), py::arg("model_dtypes"), py::arg("count"),
           py::arg("out_dtype") = int(kF32), py::arg("first_index") = 0,
           py::arg("input_cast") = int(kNoCast),
           "A base and 1 to MAX_MODELS models of `count` elements at raw addresses (input_cast "
           "as for Operands).")
      .def_readonly("count", &ModelSetOperands::count)
      .def_readonly("model_count", &ModelSetOperands::model_count)
      .def_readonly("first_index", &ModelSetOperands::first_index)
      .def_readonly("out_dtype", &ModelSetOperands::out_dtype);

  py::class_<ModelSetRecipe>(m, "SetRecipe")
      .def(py::init<>())
      .def_readwrite("kind", &ModelSetRecipe::kind)
      .def("term", &set_term, py::arg("model"), py::return_value_policy::reference_internal,
           "Model `model`'s VectorTerm, changed in place.")
      .def_readwrite("sign_election", &ModelSetRecipe::sign_election)
      .def_readwrite("normalize", &ModelSetRecipe::normalize)
      .def_readwrite("lambda_", &ModelSetRecipe::lambda)
      .def_readwrite("base_weight", &ModelSetRecipe::base_weight)
      .def_readwrite("divisor", &ModelSetRecipe::divisor);
  m.attr("MAX_MODELS") = kMaxModels;

  m.def(
      "merge_set",
      [](const ModelSetOperands& ops, uintptr_t out, const ModelSetRecipe& recipe, int threads) {
        py::gil_scoped_release no_gil;
        merge_set_cpu(ops, recipe, reinterpret_cast<unsigned char*>(out), threads);
      },
      py::arg("ops"), py::arg("out"), py::arg("recipe"), py::arg("threads"),
      "Merge of a base and a set of models with a SetRecipe into `out`.");

  m.def(
      "merge_set_elementwise",
      [](const ModelSetOperands& ops, uintptr_t out, const ModelSetRecipe& recipe) {
        py::gil_scoped_release no_gil;
        merge_set_elementwise(ops, recipe, reinterpret_cast<unsigned char*>(out));
      },
      py::arg("ops"), py::arg("out"), py::arg("recipe"),
      "merge_set one element at a time through the per-element definition.");

  m.def(
      "merge_set_to_files",
      [](const ModelSetOperands& ops, py::list targets, int threads) {
        auto parsed = parse_targets<SetWriteTarget, ModelSetRecipe>(targets);
        return write_to_files(parsed.size(), [&](uint32_t* crcs, int64_t* nonfinite) {
          return merge_set_to_files(ops, parsed.data(), int(parsed.size()), threads, crcs,
                                    nonfinite);
        });
      },
      py::arg("ops"), py::arg("targets"), py::arg("threads"),
      "merge_to_files for a base and a set of models (SetOperands, SetRecipe targets).");

  m.def(
      "count_nonfinite",
      [](uintptr_t address, int64_t count, int dtype) {
        if (dtype != kF32 && dtype != kF16 && dtype != kBF16) {
          throw py::value_error("unknown dtype code " + std::to_string(dtype));
        }
        py::gil_scoped_release no_gil;
        return count_nonfinite(reinterpret_cast<const unsigned char*>(address), count, dtype);
      },
      py::arg("address"), py::arg("count"), py::arg("dtype"),
      "NaN and ±inf values among `count` stored values of `dtype` at `address`.");

  m.def(
      "crc32c",
      [](uintptr_t address, int64_t length, uint32_t crc) {
        py::gil_scoped_release no_gil;
        return crc32c_update(crc, reinterpret_cast<const unsigned char*>(address), size_t(length));
      },
      py::arg("address"), py::arg("length"), py::arg("crc") = 0,
      "CRC-32C of `length` bytes at `address`, continuing from `crc`.");
  m.def("crc32c_combine", &crc32c_combine, py::arg("crc_a"), py::arg("crc_b"),
        py::arg("length_b"), "CRC-32C of A+B from crc(A), crc(B) and len(B).");

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

  py::class_<VectorTerm>(m, "VectorTerm")
      .def(py::init<>())
      .def_readwrite("weight", &VectorTerm::weight)
      .def_readwrite("scale", &VectorTerm::scale)
      .def_readwrite("sparsify", &VectorTerm::sparsify)
      .def_readwrite("min_magnitude_bits", &VectorTerm::min_magnitude_bits)
      .def_readwrite("last_tie_index", &VectorTerm::last_tie_index)
      .def_readwrite("drop_magnitude_bits", &VectorTerm::drop_magnitude_bits)
      .def_readwrite("drop_last_tie_index", &VectorTerm::drop_last_tie_index)
      .def_readwrite("keep_below", &VectorTerm::keep_below)
      .def_readwrite("key_lo", &VectorTerm::key_lo)
      .def_readwrite("key_hi", &VectorTerm::key_hi);

  py::class_<Recipe>(m, "Recipe")
      .def(py::init<>())
      .def_readwrite("kind", &Recipe::kind)
      .def_readwrite("domain", &Recipe::domain)
      .def_readwrite("align", &Recipe::align)
      .def_readwrite("sign_election", &Recipe::sign_election)
      .def_readwrite("normalize", &Recipe::normalize)
      .def_readwrite("lambda_", &Recipe::lambda)
      .def_readwrite("base_weight", &Recipe::base_weight)
      .def_readwrite("divisor", &Recipe::divisor)
      .def_readwrite("swap_t", &Recipe::swap_t);

  m.attr("HISTOGRAM_BINS") = kHistogramBins;
  m.attr("HISTOGRAM_HIGH_BITS") = kHighBits;
  m.attr("HISTOGRAM_SKIP") = kSkip;
  m.def("cpu_isa", &cpu_isa, "Instruction set the kernel dispatcher selected on this CPU.");
  m.def("cpu_uses_f16c", &cpu_uses_f16c, "Whether fp16 converts with F16C instructions here.");
  m.def("cpu_uses_direct_path", &direct_path_available,
        "Whether same-dtype task arithmetic runs the AVX2 direct path here.");
  m.def(
      "copy_threads",
      [](uintptr_t dst, uintptr_t src, int64_t bytes, int threads) {
        py::gil_scoped_release no_gil;
        copy_threads(reinterpret_cast<unsigned char*>(dst),
                     reinterpret_cast<const unsigned char*>(src), bytes, threads);
      },
      py::arg("dst"), py::arg("src"), py::arg("bytes"), py::arg("threads"),
      "memcpy split over `threads` threads (the floor the bench compares the kernel with).");
  m.def(
      "copy_guarded",
      [](uintptr_t dst, uintptr_t src, int64_t bytes) {
        py::gil_scoped_release no_gil;
        return copy_guarded(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                            bytes);
      },
      py::arg("dst"), py::arg("src"), py::arg("bytes"),
      "memcpy from a mapped input with the kernel's SIGBUS guard: 0, or EFAULT when an input "
      "page vanished (the file was truncated under the mapping).");
  m.def(
      "gather_rows_guarded",
      [](uintptr_t dst, uintptr_t src, int64_t row_bytes, uintptr_t index, int64_t count) {
        py::gil_scoped_release no_gil;
        const int64_t* rows = reinterpret_cast<const int64_t*>(index);
        auto gather = [&]() __attribute__((noinline)) {
          for (int64_t i = 0; i < count; ++i) {
            std::memcpy(reinterpret_cast<unsigned char*>(dst) + i * row_bytes,
                        reinterpret_cast<const unsigned char*>(src) + rows[i] * row_bytes,
                        size_t(row_bytes));
          }
        };
        return run_guarded(gather) ? 0 : EFAULT;
      },
      py::arg("dst"), py::arg("src"), py::arg("row_bytes"), py::arg("index"), py::arg("count"),
      "Rows index[0..count) (an int64 array's address) of a mapped input copied to dst in "
      "order, with the kernel's SIGBUS guard: 0, or EFAULT when an input page vanished.");
  m.def("hardware_threads", [] { return int(std::thread::hardware_concurrency()); });

  py::class_<MappedFile>(m, "MappedFile")
      .def(py::init<const std::string&>(), py::arg("path"))
      .def_property_readonly("address", &MappedFile::address)
      .def_property_readonly("size", &MappedFile::size)
      .def_property_readonly("path", &MappedFile::path)
      .def_property_readonly("closed", &MappedFile::closed)
      .def("prefetch", &MappedFile::prefetch, py::arg("offset"), py::arg("length"))
      .def("release", &MappedFile::release, py::arg("offset"), py::arg("length"))
      .def("close", &MappedFile::close)
      .def_property_readonly("fd", &MappedFile::fd);

  py::class_<WriteBehind>(m, "WriteBehind")
      .def(py::init<>())
      .def("submit", &WriteBehind::submit, py::arg("fd"), py::arg("offset"), py::arg("length"))
      .def("drain", &WriteBehind::drain, py::call_guard<py::gil_scoped_release>())
      .def("stop", &WriteBehind::stop, py::call_guard<py::gil_scoped_release>());

  py::class_<HostBuffer>(m, "HostBuffer")
      .def(py::init<int64_t>(), py::arg("bytes"))
      .def_property_readonly("address", &HostBuffer::address)
      .def_property_readonly("size", &HostBuffer::size)
      .def("release", &HostBuffer::release);
  m.def(
      "fill_staging",
      [](const std::vector<std::tuple<uintptr_t, uintptr_t, int64_t, int, int64_t>>& pieces,
         int threads) {
        std::vector<StagePiece> native_pieces;
        for (const auto& [src, dst, bytes, fd, offset] : pieces) {
          native_pieces.push_back({src, dst, bytes, fd, offset});
        }
        py::gil_scoped_release no_gil;
        return fill_staging(native_pieces, threads);
      },
      py::arg("pieces"), py::arg("threads"),
      "Copy (src, dst, bytes, fd, file_offset) pieces on `threads` threads: pread from fd when "
      "fd >= 0, else memory at src with the input fault guard.  0, EFAULT when an input ended "
      "early or a page vanished, or a read's errno.");
  py::class_<StagedWriter>(m, "StagedWriter")
      .def(py::init<>())
      .def(
          "submit",
          [](StagedWriter& w, int fd, int64_t file_offset, uintptr_t data, int64_t count,
             int dtype, int64_t delay_us) {
            check_dtype(dtype);
            return w.submit({fd, file_offset, data, count, dtype, delay_us});
          },
          py::arg("fd"), py::arg("file_offset"), py::arg("data"), py::arg("count"),
          py::arg("dtype"), py::arg("delay_us") = 0)
      .def(
          "wait",
          [](StagedWriter& w, int64_t ticket) {
            StagedWriter::Done done;
            {
              py::gil_scoped_release no_gil;
              done = w.wait(ticket);
            }
            return py::make_tuple(done.error, done.crc, done.nonfinite);
          },
          py::arg("ticket"), "(errno or 0, CRC-32C, NaN/inf count) of a submitted job.")
      .def("stop", &StagedWriter::stop, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("busy_seconds", &StagedWriter::busy_seconds);

  py::class_<ReadAhead::Range>(m, "ReadAheadRange")
      .def(py::init([](int file, int64_t offset, int64_t length, int64_t position) {
             return ReadAhead::Range{file, offset, length, position};
           }),
           py::arg("file"), py::arg("offset"), py::arg("length"), py::arg("position"));
  py::class_<ReadAhead>(m, "ReadAhead")
      .def(py::init<const std::vector<int>&, std::vector<ReadAhead::Range>, int64_t, int>(),
           py::arg("fds"), py::arg("ranges"), py::arg("depth"), py::arg("mode"))
      .def("reached", &ReadAhead::reached, py::arg("position"))
      .def_property_readonly("requested", &ReadAhead::requested)
      .def("stop", &ReadAhead::stop, py::call_guard<py::gil_scoped_release>());
}
