// W + s·(L·R) for a block of a LoRA-adapted tensor (io/adapters.py): the model a PEFT adapter
// stands for, computed window by window inside the merge's streaming pass.
#pragma once

#include <cstdint>

namespace mergealign {

// out[i][j] = base[i][j] + scale * sum_k L[i][k] * R[k][col_begin + j] for the `rows` rows of
// the block and its columns [col_begin, col_end), computed in fp32, rounded once to out_dtype
// and written contiguously (the block is a single row or whole rows, as the stream's windows
// cut them).  L is rows x rank, R rank x width, both fp32 row-major; base is the stored tensor
// (kF32, kF16 or kBF16) at the block's first element.  The sum runs over k in order, as
// exactly rounded fused multiply-adds, so an element's value does not depend on the block, the
// window, the thread count or the instruction set.  0, or EFAULT when a page of `base` vanished (an input
// truncated while mapped).
int low_rank_add(void* out, int out_dtype, const void* base, int base_dtype, const float* left,
                 const float* right, int64_t rows, int64_t rank, int64_t width,
                 int64_t col_begin, int64_t col_end, float scale, int threads);

}  // namespace mergealign
