// The Python module's parts, each binding one family (bindings.cpp assembles the module).
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "merge_math.h"

namespace mergealign {

void bind_merges(pybind11::module_& m);      // bind_merges.cpp: kernels, Recipe, SetRecipe
void bind_reductions(pybind11::module_& m);  // bind_reductions.cpp: the passes' reductions
void bind_io(pybind11::module_& m);          // bind_io.cpp: files, buffers, CRC, machine

// A stored dtype code the kernels take (kF32, kF16, kBF16), else ValueError.
inline void check_dtype(int dtype) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16) {
    throw pybind11::value_error("unknown dtype code " + std::to_string(dtype));
  }
}

}  // namespace mergealign
