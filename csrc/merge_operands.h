// What one fused merge pass needs, as plain data shared by the CPU and CUDA launchers.
#pragma once

#include <cstdint>

namespace mergealign {

// The three models' inputs and the output of one fused pass.  Pointers are byte pointers with no
// alignment requirement; dtypes use the DType numbering of merge_math.h.
struct MergeOperands {
  const unsigned char* base;
  const unsigned char* domain;
  const unsigned char* aligned;
  int base_dtype;
  int domain_dtype;
  int aligned_dtype;
  int out_dtype;
  int64_t count;  // elements, int64: LLM tensors pass 2^31 elements
  float w_domain;
  float w_align;
};

}  // namespace mergealign
