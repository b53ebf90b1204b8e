// What both paths of the fused decoder step share (decoder_step_rows.cpp for a few new
// rows, decoder_step_matrices.cpp for many): the weight order of each block, the step's
// shape, and the row-wise math, written as loops that vectorise inside the callers'
// per-instruction-set clones.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_ops.h"
#include "vector_math.h"

namespace rec2pm {

enum class Backbone : int64_t { kSasrec = 0, kHstu = 1 };

// SASRec block weights, in the order rec2pm/backbones/fused_step.py packs them.
enum SasrecWeight {
  kAttnNormW, kAttnNormB, kQueryW, kQueryB, kKeyW, kValueW, kValueB, kAttnOutW, kAttnOutB,
  kFfnNormW, kFfnNormB, kFfnInW, kFfnInB, kFfnOutW, kFfnOutB, kSasrecWeights
};
// HSTU block weights.
enum HstuWeight { kInputNormW, kInputNormB, kF1W, kF1B, kRelBias, kOutputNormW, kOutputNormB, kF2W, kF2B, kHstuWeights };

// One call of the step: `rows` new rows of width d (cu: each user's rows, batch + 1
// offsets) after `filled[b]` rows already in user b's caches.  A prefill (every cache
// empty) attends causally over the new rows with the segment kernel; a forward pass is a
// prefill without caches (k_caches and v_caches empty).
struct DecoderStep {
  Backbone backbone;
  int64_t rows, d, heads, head_dim, batch;
  const int64_t* cu;
  const int64_t* filled;
  bool prefill;
  double scale, silu_norm, eps;
  const std::vector<torch::Tensor>* k_caches;
  const std::vector<torch::Tensor>* v_caches;
  const std::vector<std::vector<torch::Tensor>>* layers;
  const torch::Tensor* final_weight;
  const torch::Tensor* final_bias;
  // Caches held per user: k_users[l][b] is user b's layer-l K cache (v_users the V), each
  // (capacity_b, heads, head_dim) with the strides of k_caches[l] / v_caches[l], which are
  // user 0's.  Null for a batch of caches.
  const std::vector<std::vector<void*>>* k_users = nullptr;
  const std::vector<std::vector<void*>>* v_users = nullptr;
  // Only each user's last new row is read (every user has one): the last layer's work after
  // attention, and a prefill's last-layer attention, run for those rows only, and the output
  // is (batch, d).  The caches still receive every row's K and V.
  bool last_rows_only = false;
};

// Layer `layer`'s K or V caches as the attention loops take them: a pointer and strides.
template <typename T>
struct CacheArg {
  T* data;
  CacheLayout layout;
};
template <typename T>
CacheArg<T> cache_arg(const std::vector<torch::Tensor>& caches, const std::vector<std::vector<void*>>* users,
                      size_t layer) {
  const torch::Tensor& cache = caches[layer];
  if (users == nullptr) return {cache.data_ptr<T>(), layout_of(cache)};
  return {nullptr, {0, cache.stride(0), cache.stride(1), cache.stride(2), (*users)[layer].data()}};
}

template <typename T>
const T* ptr(const torch::Tensor& t) {
  return t.data_ptr<T>();
}

// sum_i f(i) for i < n in kLanes double partial sums (a fixed order that still vectorises).
template <typename Term>
__attribute__((always_inline)) inline double lane_sum_double(int64_t n, Term term) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += term(i + l);
  }
  for (; i < n; ++i) lanes[0] += term(i);
  double total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// out = LayerNorm(x) row by row, the moments in double.
template <typename T>
__attribute__((always_inline)) inline void layer_norm_rows(const T* x, int64_t rows, int64_t d, const T* weight,
                                                           const T* bias, double eps, T* out) {
  for (int64_t r = 0; r < rows; ++r, x += d, out += d) {
    const double mean = lane_sum_double(d, [&](int64_t i) { return static_cast<double>(x[i]); }) / d;
    const double var = lane_sum_double(d, [&](int64_t i) {
      const double centred = x[i] - mean;
      return centred * centred;
    }) / d;
    // The normalisation itself in T, as torch's LayerNorm has it (doubles here halved the
    // vector width of the loop).
    const T centre = static_cast<T>(mean), rstd = static_cast<T>(1.0 / std::sqrt(var + eps));
    for (int64_t i = 0; i < d; ++i) out[i] = (x[i] - centre) * rstd * weight[i] + bias[i];
  }
}

// x / (1 + e^-x), with the exp that vectorises.
template <typename T>
__attribute__((always_inline)) inline T vector_silu(T x) {
  return x / (T(1) + vector_exp(-x));
}

// HSTU: U, V, Q, K = split(silu(uvqk)) for rows of 4d values.  SiLU is applied in place
// (U is read from there), V, Q and K are copied out as (rows, heads, head_dim).
template <typename T>
__attribute__((always_inline)) inline void split_silu_rows(T* uvqk, int64_t rows, int64_t d, T* v, T* q, T* k) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = uvqk + r * 4 * d;
    for (int64_t i = 0; i < 4 * d; ++i) row[i] = vector_silu(row[i]);
    std::memcpy(v + r * d, row + d, d * sizeof(T));
    std::memcpy(q + r * d, row + 2 * d, d * sizeof(T));
    std::memcpy(k + r * d, row + 3 * d, d * sizeof(T));
  }
}

// HSTU's gate: out = LN(a) * U (U the first d of each uvqk row).
template <typename T>
__attribute__((always_inline)) inline void gate_rows(const T* a, const T* uvqk, int64_t rows, int64_t d,
                                                     const T* weight, const T* bias, double eps, T* out) {
  layer_norm_rows(a, rows, d, weight, bias, eps, out);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < d; ++i) out[r * d + i] *= uvqk[r * 4 * d + i];
  }
}

// The two paths (x: the residual stream (rows, d), updated in place; out: the final-normed
// rows).  The row loops take at most kMaxLoopRows rows, with every weight contiguous and of
// x's dtype; the matrix path takes any step.
constexpr int64_t kMaxLoopRows = 8;
bool rows_path_applies(const DecoderStep& step, const torch::Tensor& x);
void decoder_step_rows(const DecoderStep& step, torch::Tensor& x, torch::Tensor& out);
void decoder_step_matrices(const DecoderStep& step, torch::Tensor& x, torch::Tensor& out);

}  // namespace rec2pm
