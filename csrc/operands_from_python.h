// MergeOperands from the integers a binding receives, checked: shared by the CPU (_native) and
// CUDA (_cuda) modules.  Needs pybind11 (bad values raise Python's ValueError).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "merge_math.h"

namespace mergealign {

inline MergeOperands make_operands(uintptr_t base, int base_dtype, uintptr_t domain,
                                   int domain_dtype, uintptr_t aligned, int aligned_dtype,
                                   int out_dtype, int64_t count, double w_domain,
                                   double w_align) {
  for (int dtype : {base_dtype, domain_dtype, aligned_dtype, out_dtype}) {
    if (dtype != kF32 && dtype != kF16 && dtype != kBF16) {
      throw pybind11::value_error("unknown dtype code " + std::to_string(dtype));
    }
  }
  if (count < 0) throw pybind11::value_error("negative element count");
  // The coefficients are rounded to fp32 once, here, explicitly (STYLE.md §6).
  return MergeOperands{reinterpret_cast<const unsigned char*>(base),
                       reinterpret_cast<const unsigned char*>(domain),
                       reinterpret_cast<const unsigned char*>(aligned),
                       base_dtype, domain_dtype, aligned_dtype, out_dtype, count,
                       static_cast<float>(w_domain), static_cast<float>(w_align)};
}

}  // namespace mergealign
