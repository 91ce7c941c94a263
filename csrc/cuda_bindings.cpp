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

  // Operands and Recipe are the types of mergealign_fast._native, which must be imported first.
  m.def(
      "merge_recipe",
      [](const MergeOperands& ops, uintptr_t out, const Recipe& recipe, uintptr_t stream,
         int device) {
        py::gil_scoped_release no_gil;
        return merge_recipe_cuda(ops, recipe, reinterpret_cast<unsigned char*>(out), stream,
                                 device);
      },
      py::arg("ops"), py::arg("out"), py::arg("recipe"), py::arg("stream"), py::arg("device") = -1,
      "Enqueue a merge method's Recipe on a CUDA stream of `device` (-1: the current one); "
      "returns a cudaError_t value (0 = launched).");

  m.def(
      "merge",
      [](const MergeOperands& ops, uintptr_t out, double w_domain, double w_align,
         uintptr_t stream, int device) {
        const MergeOperands weighted = with_weights(ops, w_domain, w_align);
        py::gil_scoped_release no_gil;
        return merge_cuda(weighted, reinterpret_cast<unsigned char*>(out), stream, device);
      },
      py::arg("ops"), py::arg("out"), py::arg("w_domain"), py::arg("w_align"), py::arg("stream"),
      py::arg("device") = -1,
      "Enqueue the fused merge on a CUDA stream of `device`; returns a cudaError_t value "
      "(0 = launched).");
  m.def("copy_async", &cuda_copy_async, py::arg("dst"), py::arg("src"), py::arg("bytes"),
        py::arg("stream"), py::arg("device") = -1, py::call_guard<py::gil_scoped_release>(),
        "cudaMemcpyAsync (kind Default) on a stream; returns a cudaError_t value.");
  m.def("host_register", &cuda_host_register, py::arg("address"), py::arg("bytes"),
        py::arg("read_only") = false, py::call_guard<py::gil_scoped_release>(),
        "Page-lock host memory for DMA (cudaHostRegister, portable); a cudaError_t value.");
  m.def("host_unregister", &cuda_host_unregister, py::arg("address"),
        py::call_guard<py::gil_scoped_release>());
  m.def("device_count", [] {
    int count = 0;
    const int err = cuda_device_count(&count);
    return py::make_tuple(err, count);
  }, "(cudaError_t value, number of devices); initialises the CUDA runtime.");
  m.def("error_string", &cuda_error_string, py::arg("error"));
  m.def("runtime_version", &cuda_runtime_version);
  m.def("architectures", &cuda_architectures);
}
