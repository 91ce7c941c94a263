// The direct path of the CPU kernel: plain task arithmetic whose three inputs and output share
// one dtype (every MergeAlign merge and sweep of a same-dtype trio), in one AVX2 loop with no
// tiles.
//
// Why a second path next to the tile layer (tiles.h): the tiles widen each input into an L1
// array, run the formula over the arrays and narrow the result from a fourth; at ~2.4 cycles
// per element one core stayed compute-bound at 41-60% of memcpy (AMD EPYC, 1 thread).  The
// direct loop keeps every value in registers, loads the inputs at 32-byte alignment where their
// addresses allow it (a load that splits a cache line cost ~25% of one core's bandwidth), and
// stores with streaming stores when the output goes to memory that will not be read soon (a
// normal store first reads the line: a fifth more memory traffic for a 3-in-1-out pass).
//
// It computes exactly what merge_math.h's merge_one and stores compute, in the same order with
// no FMA: the two paths are bit-identical (tests compare them with MERGEALIGN_TILES_ONLY=1).
#pragma once

#include <cstdint>

#include "merge_operands.h"

namespace mergealign {

// Whether merge_range_direct can do this pass: x86 with AVX2 (and F16C for fp16), every recipe
// plain task arithmetic, and one dtype for the three inputs and the output.
// MERGEALIGN_TILES_ONLY=1 turns the direct path off (for tests and comparisons).
bool direct_path_applies(const MergeOperands& ops, const Recipe* recipes, int k);

// Whether this CPU and environment run the direct path at all (what `bench` and `env` report).
bool direct_path_available();

// Elements [begin, end) merged with each of the k recipes' two weights; output element i of
// recipe j goes to outs[j][i - begin].  With `nonfinite`, nonfinite[j] grows by the outputs of
// recipe j that are NaN or ±inf once stored.  `stream` asks for streaming stores (outputs that
// go to memory, not to a buffer about to be read again).  Only when direct_path_applies.
void merge_range_direct(const MergeOperands& ops, const Recipe* recipes, int k, int64_t begin,
                        int64_t end, unsigned char* const* outs, int64_t* nonfinite, bool stream);

// The direct path aligns its loads on the base input.  A buffer that receives output element
// `begin` at this byte offset from a 32-byte boundary (the base address of element `begin`,
// modulo 32) gets aligned stores from the same element on.
constexpr int64_t kDirectAlignment = 32;  // one AVX2 register
int64_t direct_buffer_offset(const MergeOperands& ops, int64_t begin);

}  // namespace mergealign
