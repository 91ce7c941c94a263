// Python bindings for the CUDA launcher.  Compiled by the host compiler: cuda_merge.h has no CUDA
// types, and everything crosses as integers (device addresses, counts, dtype codes, a stream
// handle).  Importing this module does not initialise CUDA; the first call does.
#include <pybind11/pybind11.h>

#include "cuda_merge.h"
#include "merge_math.h"

namespace py = pybind11;
using namespace mergealign;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "mergealign-fast CUDA kernels (torch-free, static CUDA runtime)";

  m.def(
      "merge",
      [](uintptr_t base, int base_dtype, uintptr_t domain, int domain_dtype, uintptr_t aligned,
         int aligned_dtype, uintptr_t out, int out_dtype, int64_t count, double w_domain,
         double w_align, uintptr_t stream) {
        for (int dtype : {base_dtype, domain_dtype, aligned_dtype, out_dtype}) {
          if (dtype != kF32 && dtype != kF16 && dtype != kBF16) {
            throw py::value_error("unknown dtype code " + std::to_string(dtype));
          }
        }
        if (count < 0) throw py::value_error("negative element count");
        const MergeOperands ops{reinterpret_cast<const unsigned char*>(base),
                                reinterpret_cast<const unsigned char*>(domain),
                                reinterpret_cast<const unsigned char*>(aligned),
                                base_dtype, domain_dtype, aligned_dtype, out_dtype, count,
                                static_cast<float>(w_domain), static_cast<float>(w_align)};
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
