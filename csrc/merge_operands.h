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
  // Index of the first element within its tensor: random drop masks (DARE) are keyed by the
  // element's index in the tensor, so a chunked pass draws what a whole-tensor pass would.
  int64_t first_index = 0;
  // A dtype every input is rounded to before it is used (mergekit's `dtype`: its inputs are
  // cast first), or -1 (kNoCast) for the values as stored.
  int input_cast = -1;
};

// ---- recipes: what a merge method does to each element --------------------------------------
// The Python layer (mergealign_fast/methods.py) turns a method and one tensor's statistics into a
// Recipe; the kernels apply it element by element.  The numbering is part of the Python ABI.

enum RecipeKind : int {
  kTaskArithmetic = 0,  // base + w_d*tau_d + w_a*tau_a (the MergeAlign formula, fastest path)
  kVectors = 1,         // base + combination of sparsified, weighted task vectors (TIES, DARE)
  kModels = 2,          // (c_b*base + c_d*domain + c_a*aligned) / divisor: linear, SLERP,
                        // ChipAlign
  kNearSwap = 3,        // w*domain + (1 - w)*base, w = clamp(t / max(|domain - base|, eps),
                        // 0, 1): mergekit's NearSwap (the aligned input is not read)
};

// NearSwap's floor on |domain - base| (mergekit's clamp(min=1e-6)).
constexpr float kNearSwapEps = 1e-6f;

enum Sparsify : int {
  kKeepAll = 0,
  kKeepLargest = 1,  // keep |tau| >= a per-tensor threshold (TIES magnitude trim)
  kKeepRandom = 2,   // keep with a per-element counter-based draw (DARE)
  kKeepBand = 3,     // keep what kKeepLargest keeps, less a smaller prefix of the largest
                     // (Model Breadcrumbs: drop the largest outliers and the smallest)
};

// How one fine-tuned model's task vector tau enters a kVectors merge: kept or dropped, then
// (tau * scale) * weight, the order mergekit applies them in.
struct VectorTerm {
  float weight = 0.0f;
  float scale = 1.0f;  // rescale of the kept elements (DARE), 1 when none
  int sparsify = kKeepAll;
  // kKeepLargest: keep when the fp32 bits of |tau| exceed this, or equal it at an element index
  // <= last_tie_index (ties at the threshold go to the lowest indices, so exactly k are kept).
  uint32_t min_magnitude_bits = 0;
  int64_t last_tie_index = INT64_MAX;
  // kKeepBand: drop what a kKeepLargest with these would keep (the defaults drop nothing: no
  // |tau| has bits above 0x7fffffff).
  uint32_t drop_magnitude_bits = 0xFFFFFFFFu;
  int64_t drop_last_tie_index = -1;
  uint32_t keep_below = 0;          // kKeepRandom: keep when the 24-bit draw is < this
  uint32_t key_lo = 0;              // kKeepRandom: the stream of (seed, tensor, model)
  uint32_t key_hi = 0;
};

struct Recipe {
  int kind = kTaskArithmetic;
  VectorTerm domain;  // kModels and kTaskArithmetic read only the weights
  VectorTerm align;
  int sign_election = 0;  // TIES: drop terms whose sign differs from the sign of their sum
  int normalize = 0;      // kVectors: divide by the summed weights of the kept terms
  float lambda = 1.0f;    // kVectors: scale of the combined vector (mergekit's `lambda`)
  float base_weight = 0.0f;  // kModels
  float divisor = 1.0f;      // kModels, and kVectors without sign election
  float swap_t = 0.0f;       // kNearSwap: mergekit's t (|differences| up to t swap fully)
};


// ---- a base and any number of models (mergekit configs of 3+ models) --------------------------
// The same element rules as a Recipe, for model_count task vectors instead of two: the terms are
// summed in model order, so with two models the result is the bits of the Recipe with the same
// kind (tests compare the two).

// 32 models: beyond every public merge recipe we know of (the largest mix 8-12 experts), and the
// terms of a tile (32 x 256 fp32 = 32 KiB) stay on a worker thread's stack.
constexpr int kMaxModels = 32;

struct ModelSetOperands {
  const unsigned char* base = nullptr;
  int base_dtype = 0;
  int model_count = 0;
  const unsigned char* models[kMaxModels] = {};
  int model_dtypes[kMaxModels] = {};
  int out_dtype = 0;
  int64_t count = 0;
  int64_t first_index = 0;  // as MergeOperands::first_index
  int input_cast = -1;      // as MergeOperands::input_cast
};

struct ModelSetRecipe {
  int kind = kVectors;  // kVectors (task arithmetic, TIES, DARE) or kModels (linear)
  VectorTerm terms[kMaxModels];  // one per model: kModels reads only the weights
  int sign_election = 0;
  int normalize = 0;
  float lambda = 1.0f;
  float base_weight = 0.0f;  // kModels
  float divisor = 1.0f;      // kModels, and kVectors without sign election
};

}  // namespace mergealign
