// MergeOperands from the integers Python passes, checked: the `Operands` class of _native, which
// every binding of the CPU (_native) and CUDA (_cuda) modules takes.  Needs pybind11 (bad values
// raise Python's ValueError).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "merge_math.h"

namespace mergealign {

// input_cast: kNoCast or a dtype code.
inline void check_input_cast(int input_cast) {
  if (input_cast != kNoCast && input_cast != kF32 && input_cast != kF16 && input_cast != kBF16) {
    throw pybind11::value_error("unknown input cast dtype code " + std::to_string(input_cast));
  }
}

inline MergeOperands make_operands(uintptr_t base, int base_dtype, uintptr_t domain,
                                   int domain_dtype, uintptr_t aligned, int aligned_dtype,
                                   int64_t count, int out_dtype, int64_t first_index,
                                   int input_cast) {
  check_input_cast(input_cast);
  for (int dtype : {base_dtype, domain_dtype, aligned_dtype, out_dtype}) {
    if (dtype != kF32 && dtype != kF16 && dtype != kBF16) {
      throw pybind11::value_error("unknown dtype code " + std::to_string(dtype));
    }
  }
  if (count < 0) throw pybind11::value_error("negative element count");
  if (first_index < 0) throw pybind11::value_error("negative first index");
  MergeOperands ops{reinterpret_cast<const unsigned char*>(base),
                    reinterpret_cast<const unsigned char*>(domain),
                    reinterpret_cast<const unsigned char*>(aligned),
                    base_dtype, domain_dtype, aligned_dtype, out_dtype, count, 0.0f, 0.0f};
  ops.first_index = first_index;
  ops.input_cast = input_cast;
  return ops;
}

// The operands with the task-arithmetic weights set, rounded to fp32 once, here, explicitly:
// every backend then computes with the same two fp32 coefficients.
inline MergeOperands with_weights(MergeOperands ops, double w_domain, double w_align) {
  ops.w_domain = static_cast<float>(w_domain);
  ops.w_align = static_cast<float>(w_align);
  return ops;
}

// Registers `Operands` on module m (only _native does; _cuda uses that type).
inline void bind_operands(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<MergeOperands>(m, "Operands")
      .def(py::init(&make_operands), py::arg("base"), py::arg("base_dtype"), py::arg("domain"),
           py::arg("domain_dtype"), py::arg("aligned"), py::arg("aligned_dtype"),
           py::arg("count"), py::arg("out_dtype") = int(kF32), py::arg("first_index") = 0,
           py::arg("input_cast") = int(kNoCast),
           "Three inputs of `count` elements at raw addresses (dtype codes of DType), the output "
           "dtype, the index of the first element within its tensor (DARE's masks are keyed "
           "by it) and a dtype every input is rounded to first (-1: none).  The caller keeps "
           "the memory alive while a pass runs.")
      .def_readonly("count", &MergeOperands::count)
      .def_readonly("first_index", &MergeOperands::first_index)
      .def_readonly("out_dtype", &MergeOperands::out_dtype);
}

}  // namespace mergealign
