// Tiles of a base and any number of models: each model's tile is widened to fp32, turned into
// its term and added to the running sum, so memory per thread is a few tiles whatever the model
// count (sign election keeps every term of the tile: it needs their sum before it can count any).
// Every coefficient a loop uses is copied to a local first: read through the recipe, it could
// alias the float stores of the loop, and the compiler would reload it per element and not
// vectorise.
#include "model_set.h"

#include <cmath>

#include "merge_math.h"
#include "parallel.h"
#include "tiles.h"

namespace mergealign {
namespace {

struct SetTile {
  alignas(64) float x[kTile];
  alignas(64) float tau[kTile];
  alignas(64) uint32_t keep[kTile];
  alignas(64) float sum[kTile];
  alignas(64) float terms[kMaxModels][kTile];  // sign election only
};

inline __attribute__((always_inline)) void models_tile(const ModelSetOperands& ops,
                                                       const ModelSetRecipe& r, const float* b,
                                                       int64_t start, int n, SetTile& s,
                                                       float* merged) {
  const float base_weight = r.base_weight;
  const float divisor = r.divisor;
  for (int i = 0; i < n; ++i) s.sum[i] = ma_mul(base_weight, b[i]);
  for (int m = 0; m < ops.model_count; ++m) {
    load_tile(ops.models[m], ops.model_dtypes[m], start, n, s.x, ops.input_cast);
    const float w = r.terms[m].weight;
    for (int i = 0; i < n; ++i) s.sum[i] = ma_add(s.sum[i], ma_mul(w, s.x[i]));
  }
  for (int i = 0; i < n; ++i) merged[i] = ma_div(s.sum[i], divisor);
}

// Model m's terms of the tile into `out`.
inline __attribute__((always_inline)) void term_tile(const ModelSetOperands& ops,
                                                     const VectorTerm& term, int m,
                                                     const float* b, int64_t start, int n,
                                                     SetTile& s, float* out) {
  const VectorTerm t = term;
  load_tile(ops.models[m], ops.model_dtypes[m], start, n, s.x, ops.input_cast);
  if (t.sparsify == kKeepAll) {  // vector_term of a kept element, in one loop
    const float scale = t.scale;
    const float weight = t.weight;
    for (int i = 0; i < n; ++i) out[i] = ma_mul(ma_mul(ma_sub(s.x[i], b[i]), scale), weight);
    return;
  }
  for (int i = 0; i < n; ++i) s.tau[i] = ma_sub(s.x[i], b[i]);
  keep_tile(t, s.tau, ops.first_index + start, n, s.keep);
  for (int i = 0; i < n; ++i) out[i] = vector_term(t, s.tau[i], s.keep[i] != 0);
}

inline __attribute__((always_inline)) void vectors_tile(const ModelSetOperands& ops,
                                                        const ModelSetRecipe& r, const float* b,
                                                        int64_t start, int n, SetTile& s,
                                                        float* merged) {
  const int count = ops.model_count;
  const float lambda = r.lambda;
  const bool normalize = r.normalize != 0;
  alignas(64) float divisor[kTile];
  if (r.sign_election) {
    for (int m = 0; m < count; ++m) term_tile(ops, r.terms[m], m, b, start, n, s, s.terms[m]);
    for (int i = 0; i < n; ++i) s.sum[i] = s.terms[0][i];
    for (int m = 1; m < count; ++m) {
      for (int i = 0; i < n; ++i) s.sum[i] = ma_add(s.sum[i], s.terms[m][i]);
    }
    // s.sum now elects the sign; it becomes the sum of the terms that agree with it.
    for (int i = 0; i < n; ++i) s.keep[i] = uint32_t(s.sum[i] >= 0.0f);
    for (int m = 0; m < count; ++m) {
      const float w = r.terms[m].weight;
      const float* t = s.terms[m];
      for (int i = 0; i < n; ++i) {  // the first term starts the sums, as in merge_math.h
        const bool counted = counts_in_election(t[i], s.keep[i] != 0);
        const float value = counted ? t[i] : 0.0f;
        const float weight = counted ? w : 0.0f;
        s.x[i] = m == 0 ? value : ma_add(s.x[i], value);
        divisor[i] = m == 0 ? weight : ma_add(divisor[i], weight);
      }
    }
    for (int i = 0; i < n; ++i) {
      const float d = divisor[i] == 0.0f ? 1.0f : divisor[i];
      s.sum[i] = s.x[i];
      divisor[i] = normalize ? d : 1.0f;
    }
  } else {
    term_tile(ops, r.terms[0], 0, b, start, n, s, s.sum);
    for (int m = 1; m < count; ++m) {
      term_tile(ops, r.terms[m], m, b, start, n, s, s.terms[0]);
      for (int i = 0; i < n; ++i) s.sum[i] = ma_add(s.sum[i], s.terms[0][i]);
    }
    const float d = normalize ? r.divisor : 1.0f;
    for (int i = 0; i < n; ++i) divisor[i] = d;
  }
  for (int i = 0; i < n; ++i) {
    merged[i] = ma_add(b[i], ma_mul(ma_div(s.sum[i], divisor[i]), lambda));
  }
}

}  // namespace

MA_CPU_CLONES
void merge_set_range(const ModelSetOperands& ops, const ModelSetRecipe* recipes, int k,
                     int64_t begin, int64_t end, unsigned char* const* outs,
                     int64_t* nonfinite) {
  alignas(64) float b[kTile];
  alignas(64) float merged[kTile];
  SetTile s;
  const float limit = overflow_threshold(ops.out_dtype);
  for (int64_t start = begin; start < end; start += kTile) {
    const int n = int(std::min(kTile, end - start));
    load_tile(ops.base, ops.base_dtype, start, n, b, ops.input_cast);
    for (int j = 0; j < k; ++j) {
      const ModelSetRecipe& r = recipes[j];
      if (r.kind == kModels) {
        models_tile(ops, r, b, start, n, s, merged);
      } else {
        vectors_tile(ops, r, b, start, n, s, merged);
      }
      store_tile(outs[j], ops.out_dtype, start - begin, n, merged);
      if (nonfinite != nullptr) {
        int64_t bad = 0;
        for (int i = 0; i < n; ++i) bad += !(std::fabs(merged[i]) < limit);
        nonfinite[j] += bad;
      }
    }
  }
}

void merge_set_cpu(const ModelSetOperands& ops, const ModelSetRecipe& recipe, unsigned char* out,
                   int threads) {
  if (ops.count <= 0) return;
  const int64_t out_size = dtype_size(ops.out_dtype);
  parallel_slices(ops.count, effective_threads(ops.count, threads), kTile,
                  [&](int, int64_t begin, int64_t end) {
                    unsigned char* slice_out = out + begin * out_size;
                    merge_set_range(ops, &recipe, 1, begin, end, &slice_out, nullptr);
                  });
}

void merge_set_elementwise(const ModelSetOperands& ops, const ModelSetRecipe& recipe,
                           unsigned char* out) {
  float x[kMaxModels];
  for (int64_t i = 0; i < ops.count; ++i) {
    const float b = load_input(ops.base, i, ops.base_dtype, ops.input_cast);
    for (int m = 0; m < ops.model_count; ++m) {
      x[m] = load_input(ops.models[m], i, ops.model_dtypes[m], ops.input_cast);
    }
    store_from_f32(out, i, ops.out_dtype,
                   merge_set_element(recipe, b, x, ops.model_count, ops.first_index + i));
  }
}

}  // namespace mergealign
