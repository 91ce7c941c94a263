// Merges of a base and any number of models (merge_operands.h ModelSetOperands): mergekit
// configs that merge three or more models.  Two models go through cpu_merge.h's kernels.
#pragma once

#include <cstdint>

#include "merge_operands.h"

namespace mergealign {

// Elements [begin, end) merged with each of k recipes into outs[j][i - begin]; nonfinite[j] (when
// given) grows by recipe j's outputs that are NaN or ±inf once stored.  Each model's tile is read
// once per recipe.
void merge_set_range(const ModelSetOperands& ops, const ModelSetRecipe* recipes, int k,
                     int64_t begin, int64_t end, unsigned char* const* outs, int64_t* nonfinite);

// The whole merge into memory, split over `threads` threads.
void merge_set_cpu(const ModelSetOperands& ops, const ModelSetRecipe& recipe, unsigned char* out,
                   int threads);

// The same one element at a time through merge_set_element, for tests.
void merge_set_elementwise(const ModelSetOperands& ops, const ModelSetRecipe& recipe,
                           unsigned char* out);

}  // namespace mergealign
