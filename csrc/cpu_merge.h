// CPU merges (cpu_merge.cpp): torch-free, raw pointers and element counts in, plain integers for
// dtypes.  The read-only statistics passes of the merge methods are in reductions.h.
#pragma once

#include <cstdint>
#include <string>

#include "merge_operands.h"

namespace mergealign {

// out[i] = merge_one(base[i], domain[i], aligned[i]) for i < count, split over `threads` threads.
void merge_cpu(const MergeOperands& ops, unsigned char* out, int threads);

// The same with any merge method's recipe (merge_operands.h) instead of ops' two weights.
void merge_cpu_recipe(const MergeOperands& ops, const Recipe& recipe, unsigned char* out,
                      int threads);

// One output of a merge written to a file: where it goes and the recipe that makes it.
struct WriteTarget {
  int fd;
  int64_t file_offset;
  Recipe recipe;
};

// The merge written straight to files, for k recipes at once: each thread computes at most
// 1 MiB of each target's output into a buffer it reuses and pwrite()s it at
// file_offset + its position.  The inputs are read once; each target gets its own merged output
// (bit-identical to a single merge with its recipe), crcs[j] its CRC-32C and nonfinite[j] how
// many of its values are NaN or ±inf (NaN/inf in the inputs, or beyond the output dtype's
// range).  Returns 0, the errno of the first failed write, or EFAULT when an input page vanished
// while being read (a truncated memory-mapped file: SIGBUS, caught).
int merge_cpu_to_files(const MergeOperands& ops, const WriteTarget* targets, int k, int threads,
                       uint32_t* crcs, int64_t* nonfinite);

// A merge of a base and any number of models written to files: merge_cpu_to_files for
// ModelSetOperands (model_set.h), with the same pieces, checksums and return values.
struct SetWriteTarget {
  int fd;
  int64_t file_offset;
  ModelSetRecipe recipe;
};
int merge_set_to_files(const ModelSetOperands& ops, const SetWriteTarget* targets, int k,
                       int threads, uint32_t* crcs, int64_t* nonfinite);

// The merge one element at a time through merge_math.h's merge_element, on one thread: the
// per-element path the CUDA kernels run, for tests to compare the CPU kernel with.
void merge_cpu_elementwise(const MergeOperands& ops, const Recipe& recipe, unsigned char* out);

// Values of a stored output buffer that are NaN or ±inf (the GPU path counts its downloads).
int64_t count_nonfinite(const unsigned char* data, int64_t count, int dtype);

// Name of the instruction set the dispatcher picked on this CPU ("x86-64-v4", "x86-64-v3",
// "baseline").
std::string cpu_isa();

// Whether fp16 tiles convert with F16C instructions here (tiles.h; MERGEALIGN_NO_F16C=1: no).
bool cpu_uses_f16c();

// memcpy of `bytes` split over `threads` contiguous slices, as the merge splits its work: the
// floor `mergealign-fast bench` compares the kernel with.
void copy_threads(unsigned char* dst, const unsigned char* src, int64_t bytes, int threads);

}  // namespace mergealign
