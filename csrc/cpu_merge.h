// CPU merge kernels: torch-free, raw pointers and element counts in, plain integers for dtypes.
#pragma once

#include <cstdint>
#include <string>

#include "merge_operands.h"

namespace mergealign {

// out[i] = merge_one(base[i], domain[i], aligned[i]) for i < count, split over `threads` threads.
void merge_cpu(const MergeOperands& ops, unsigned char* out, int threads);

// The same pass, but the result goes straight to a file: each thread computes at most
// kWritePieceBytes of output into a buffer it reuses and pwrite()s it at
// file_offset + its position.  Returns 0, the errno of the first failed write, or EFAULT when
// an input page vanished while being read (a truncated memory-mapped file: SIGBUS, caught); on
// success *crc is the CRC-32C of the bytes written.
int merge_cpu_to_file(const MergeOperands& ops, int fd, int64_t file_offset, int threads,
                      uint32_t* crc);

// One output of a multi-output pass: where it goes and which weights make it.
struct WriteTarget {
  int fd;
  int64_t file_offset;
  float w_domain;
  float w_align;
};

// merge_cpu_to_file for k weight pairs at once: the inputs are read once, each target gets its
// own merged output (bit-identical to a single merge with its weights) and crcs[j] its CRC-32C.
int merge_cpu_to_files(const MergeOperands& ops, const WriteTarget* targets, int k, int threads,
                       uint32_t* crcs);

// Sums over elements of the two task vectors tau_d = domain - base and tau_a = aligned - base,
// accumulated in fp64 from the exact fp32 widenings of the inputs.  Per-thread partial sums are
// added in thread order, so a result depends only on the thread count.
struct VectorStats {
  double domain_sq = 0;   // sum tau_d^2
  double align_sq = 0;    // sum tau_a^2
  double dot = 0;         // sum tau_d * tau_a
  int64_t conflicts = 0;  // elements where tau_d and tau_a have opposite signs (both non-zero)
  int64_t both_nonzero = 0;
};
VectorStats vector_stats_cpu(const MergeOperands& ops, int threads);

// Name of the instruction set the dispatcher picked on this CPU ("x86-64-v4", "x86-64-v3",
// "baseline").
std::string cpu_isa();

}  // namespace mergealign
