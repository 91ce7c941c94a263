// Python bindings for the CUDA launcher.  Compiled by the host compiler: cuda_merge.h has no CUDA
// types, and everything crosses as integers (device addresses, counts, dtype codes, a stream
// handle).  Importing this module does not initialise CUDA; the first call does.
#include <pybind11/pybind11.h>

#include "cuda_merge.h"
#include "merge_math.h"
#include "operands_from_python.h"

namespace py = pybind11;
using namespace mergealign;


PYBIND11_MODULE(_cuda, m) {
  m.doc() = "mergealign-fast CUDA kernels (torch-free, static CUDA runtime)";

  m.def(
      "merge_recipe",
      [](uintptr_t base, int base_dtype, uintptr_t domain, int domain_dtype, uintptr_t aligned,
         int aligned_dtype, uintptr_t out, int out_dtype, int64_t count, int64_t first_index,
         const Recipe& recipe, uintptr_t stream) {
        MergeOperands ops = make_operands(base, base_dtype, domain, domain_dtype, aligned,
                                             aligned_dtype, out_dtype, count, 0.0, 0.0);
        ops.first_index = first_index;
        py::gil_scoped_release no_gil;
        return merge_recipe_cuda(ops, recipe, reinterpret_cast<unsigned char*>(out), stream);
      },
      py::arg("base"), py::arg("base_dtype"), py::arg("domain"), py::arg("domain_dtype"),
      py::arg("aligned"), py::arg("aligned_dtype"), py::arg("out"), py::arg("out_dtype"),
      py::arg("count"), py::arg("first_index"), py::arg("recipe"), py::arg("stream"),
      "Enqueue a merge method's Recipe (the type of mergealign_fast._native, which must be "
      "imported) on a CUDA stream; returns a cudaError_t value (0 = launched).");

  m.def(
      "merge",
      [](uintptr_t base, int base_dtype, uintptr_t domain, int domain_dtype, uintptr_t aligned,
         int aligned_dtype, uintptr_t out, int out_dtype, int64_t count, double w_domain,
         double w_align, uintptr_t stream) {
        const MergeOperands ops = make_operands(base, base_dtype, domain, domain_dtype,
                                                   aligned, aligned_dtype, out_dtype, count,
                                                   w_domain, w_align);
        py::gil_scoped_release no_gil;
        return merge_cuda(ops, reinterpret_cast<unsigned char*>(out), stream);
      },
      py::arg("base"), py::arg("base_dtype"), py::arg("domain"), py::arg("domain_dtype"),
      py::arg("aligned"), py::arg("aligned_dtype"), py::arg("out"), py::arg("out_dtype"),
      py::arg("count"), py::arg("w_domain"), py::arg("w_align"), py::arg("stream"),
      "Enqueue the fused merge on a CUDA stream; returns a cudaError_t value (0 = launched).");
  m.def("device_count", [] {
    int count = 0;
    const int err = cuda_device_count(&count);
    return py::make_tuple(err, count);
  }, "(cudaError_t value, number of devices); initialises the CUDA runtime.");
  m.def("error_string", &cuda_error_string, py::arg("error"));
  m.def("runtime_version", &cuda_runtime_version);
  m.def("architectures", &cuda_architectures);
}
