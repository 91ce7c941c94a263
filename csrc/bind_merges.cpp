// Bindings of the merges: the fused trio and model-set kernels, in memory and to shard files
// (with CRC-32C and non-finite counts), and the Recipe / SetRecipe types they run.
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
#include "low_rank.h"
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

void mergealign::bind_merges(py::module_& m) {
  m.def(
      "low_rank_add",
      [](uintptr_t out, int out_dtype, uintptr_t base, int base_dtype, uintptr_t left,
         uintptr_t right, int64_t rows, int64_t rank, int64_t width, int64_t col_begin,
         int64_t col_end, double scale, int threads) {
        check_dtype(out_dtype);
        check_dtype(base_dtype);
        if (rows < 0 || rank < 0 || col_begin < 0 || col_begin > col_end || col_end > width ||
            (rows > 1 && col_end - col_begin != width)) {
          throw py::value_error("low_rank_add: a block is one row or whole rows");
        }
        py::gil_scoped_release no_gil;
        return low_rank_add(reinterpret_cast<void*>(out), out_dtype,
                            reinterpret_cast<const void*>(base), base_dtype, reinterpret_cast<const float*>(left),
                            reinterpret_cast<const float*>(right), rows, rank, width,
                            col_begin, col_end, float(scale), threads);
      },
      py::arg("out"), py::arg("out_dtype"), py::arg("base"), py::arg("base_dtype"),
      py::arg("left"), py::arg("right"),
      py::arg("rows"), py::arg("rank"), py::arg("width"), py::arg("col_begin"),
      py::arg("col_end"), py::arg("scale"), py::arg("threads"),
      "out = base + scale * (left @ right)[:, col_begin:col_end] for one row or whole rows of a "
      "LoRA-adapted tensor, in fp32 rounded once to out_dtype (left rows x rank, right rank x "
      "width, fp32): 0, or EFAULT when a page of base vanished.");
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

}
