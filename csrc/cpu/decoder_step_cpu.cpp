// One serving step of a whole SASRec or HSTU decoder in one call: every layer's norms,
// projections, activations, gating and residuals and its attention over the per-layer K/V
// cache (the C++ cached step, appending in place).  On the CPU a step of a few new events
// costs mostly per-op overhead; one call per step keeps that in C++, and a step of at most
// kMaxLoopRows rows runs as plain loops over the weights (no ATen op per layer at all),
// while larger batches use ATen's matrix products.
//
// The math is Decoder.step's exactly (rec2pm/backbones/{sasrec,hstu}.py); tests compare the two.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention_ops.h"
#include "decoder_step_ops.h"
#include "vector_math.h"

namespace rec2pm {
namespace {

enum class Backbone : int64_t { kSasrec = 0, kHstu = 1 };

// SASRec block weights, in the order rec2pm/backbones/fused_step.py packs them.
enum SasrecWeight {
  kAttnNormW, kAttnNormB, kQueryW, kQueryB, kKeyW, kValueW, kValueB, kAttnOutW, kAttnOutB,
  kFfnNormW, kFfnNormB, kFfnInW, kFfnInB, kFfnOutW, kFfnOutB, kSasrecWeights
};
// HSTU block weights.
enum HstuWeight { kInputNormW, kInputNormB, kF1W, kF1B, kRelBias, kOutputNormW, kOutputNormB, kF2W, kF2B, kHstuWeights };

// At most this many new rows run as loops: a row's matrix-vector products are a few
// thousand multiply-adds, less than one ATen call costs; beyond it a GEMM wins.
constexpr int64_t kMaxLoopRows = 8;
constexpr double kSqrtHalf = 0.70710678118654752440;  // GELU's erf(x / sqrt(2))

// ---------------------------------------------------------------------------------------
// The loop path: rows of d_model values, weights as nn.Linear stores them (out, in).

// out = LayerNorm(x) row by row, the moments in double.
template <typename T>
__attribute__((always_inline)) inline void layer_norm_rows(const T* x, int64_t rows, int64_t d, const T* weight,
                                                           const T* bias, double eps, T* out) {
  for (int64_t r = 0; r < rows; ++r, x += d, out += d) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < d; ++i) mean += x[i];
    mean /= d;
    for (int64_t i = 0; i < d; ++i) var += (x[i] - mean) * (x[i] - mean);
    const double rstd = 1.0 / std::sqrt(var / d + eps);
    for (int64_t i = 0; i < d; ++i) out[i] = static_cast<T>((x[i] - mean) * rstd) * weight[i] + bias[i];
  }
}

// y = x W^T + b for rows of x (in) and W (out, in); b may be null.  Each output is a dot
// of two contiguous rows, in a fixed order.
template <typename T>
__attribute__((always_inline)) inline void linear_rows(const T* x, int64_t rows, int64_t in, const T* weight,
                                                       const T* bias, int64_t out_dim, T* y) {
  for (int64_t r = 0; r < rows; ++r, x += in, y += out_dim) {
    for (int64_t o = 0; o < out_dim; ++o) y[o] = lane_dot(weight + o * in, x, in) + (bias ? bias[o] : T(0));
  }
}

template <typename T>
const T* ptr(const torch::Tensor& t) {
  return t.data_ptr<T>();
}

struct StepShape {
  int64_t rows, d, heads, head_dim, batch;
  const int64_t* cu;
  const int64_t* filled;
};

// One HSTU layer: x += f2(LN(A V) * U) with U, V, Q, K = split(silu(f1(LN(x)))).
template <typename T>
__attribute__((always_inline)) inline void hstu_layer_loops(const StepShape& s, const std::vector<torch::Tensor>& w,
                                                            T* k_cache, CacheLayout ks, T* v_cache, CacheLayout vs,
                                                            T scale, T silu_norm, double eps, T* x, T* work) {
  const int64_t rows = s.rows, d = s.d;
  T *h = work, *uvqk = h + rows * d, *q = uvqk + rows * 4 * d, *k = q + rows * d, *v = k + rows * d,
    *a = v + rows * d;
  layer_norm_rows(x, rows, d, ptr<T>(w[kInputNormW]), ptr<T>(w[kInputNormB]), eps, h);
  linear_rows(h, rows, d, ptr<T>(w[kF1W]), ptr<T>(w[kF1B]), 4 * d, uvqk);
  for (int64_t i = 0; i < rows * 4 * d; ++i) uvqk[i] = uvqk[i] / (T(1) + std::exp(-uvqk[i]));
  for (int64_t r = 0; r < rows; ++r) {  // (tokens, heads, head_dim) rows for the cached step
    const T* row = uvqk + r * 4 * d;
    for (int64_t i = 0; i < d; ++i) {
      v[r * d + i] = row[d + i];
      q[r * d + i] = row[2 * d + i];
      k[r * d + i] = row[3 * d + i];
    }
  }
  const auto& rel = w[kRelBias];
  cached_step_rows(q, k, v, s.cu, s.filled, s.batch, s.heads, s.head_dim, s.head_dim, k_cache, ks, v_cache, vs,
                   Score::kSilu, scale, ptr<T>(rel), rel.size(1), silu_norm, a);
  layer_norm_rows(a, rows, d, ptr<T>(w[kOutputNormW]), ptr<T>(w[kOutputNormB]), eps, h);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < d; ++i) h[r * d + i] *= uvqk[r * 4 * d + i];  // gated by U
  }
  linear_rows(h, rows, d, ptr<T>(w[kF2W]), ptr<T>(w[kF2B]), d, a);
  for (int64_t i = 0; i < rows * d; ++i) x[i] += a[i];
}

// One SASRec layer: x += out(attention(LN(x))); x += ffn(LN(x)) with a GELU (erf) between.
template <typename T>
__attribute__((always_inline)) inline void sasrec_layer_loops(const StepShape& s, const std::vector<torch::Tensor>& w,
                                                              T* k_cache, CacheLayout ks, T* v_cache, CacheLayout vs,
                                                              T scale, double eps, T* x, T* work) {
  const int64_t rows = s.rows, d = s.d;
  T *h = work, *q = h + rows * d, *k = q + rows * d, *v = k + rows * d, *a = v + rows * d, *f = a + rows * d;
  layer_norm_rows(x, rows, d, ptr<T>(w[kAttnNormW]), ptr<T>(w[kAttnNormB]), eps, h);
  linear_rows(h, rows, d, ptr<T>(w[kQueryW]), ptr<T>(w[kQueryB]), d, q);
  linear_rows(h, rows, d, ptr<T>(w[kKeyW]), static_cast<const T*>(nullptr), d, k);
  linear_rows(h, rows, d, ptr<T>(w[kValueW]), ptr<T>(w[kValueB]), d, v);
  cached_step_rows(q, k, v, s.cu, s.filled, s.batch, s.heads, s.head_dim, s.head_dim, k_cache, ks, v_cache, vs,
                   Score::kSoftmax, scale, static_cast<const T*>(nullptr), 1, T(1), a);
  linear_rows(a, rows, d, ptr<T>(w[kAttnOutW]), ptr<T>(w[kAttnOutB]), d, f);
  for (int64_t i = 0; i < rows * d; ++i) x[i] += f[i];
  layer_norm_rows(x, rows, d, ptr<T>(w[kFfnNormW]), ptr<T>(w[kFfnNormB]), eps, h);
  linear_rows(h, rows, d, ptr<T>(w[kFfnInW]), ptr<T>(w[kFfnInB]), d, f);
  for (int64_t i = 0; i < rows * d; ++i) f[i] = T(0.5) * f[i] * (T(1) + std::erf(f[i] * T(kSqrtHalf)));
  linear_rows(f, rows, d, ptr<T>(w[kFfnOutW]), ptr<T>(w[kFfnOutB]), d, a);
  for (int64_t i = 0; i < rows * d; ++i) x[i] += a[i];
}

// Scratch values per row the layers above use (HSTU's: h, uvqk, q, k, v, a).
constexpr int64_t kWorkPerRowAndWidth = 9;

template <typename T>
void decoder_loops(Backbone kind, const StepShape& s, const std::vector<torch::Tensor>& k_caches,
                   const std::vector<torch::Tensor>& v_caches, const std::vector<std::vector<torch::Tensor>>& layers,
                   T scale, T silu_norm, double eps, const torch::Tensor& final_weight,
                   const torch::Tensor& final_bias, T* x, T* out) {
  std::vector<T> work(kWorkPerRowAndWidth * s.rows * s.d);
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& kc = k_caches[l];
    const auto& vc = v_caches[l];
    const CacheLayout ks{kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3)};
    const CacheLayout vs{vc.stride(0), vc.stride(1), vc.stride(2), vc.stride(3)};
    if (kind == Backbone::kSasrec) {
      sasrec_layer_loops<T>(s, layers[l], kc.data_ptr<T>(), ks, vc.data_ptr<T>(), vs, scale, eps, x, work.data());
    } else {
      hstu_layer_loops<T>(s, layers[l], kc.data_ptr<T>(), ks, vc.data_ptr<T>(), vs, scale, silu_norm, eps, x,
                          work.data());
    }
  }
  layer_norm_rows(x, s.rows, s.d, ptr<T>(final_weight), ptr<T>(final_bias), eps, out);
}

// The loop path compiled per instruction set (templates cannot be cloned).
REC2PM_VECTOR_CLONES void decoder_loops_f32(Backbone kind, const StepShape& s, const std::vector<torch::Tensor>& kc,
                                            const std::vector<torch::Tensor>& vc,
                                            const std::vector<std::vector<torch::Tensor>>& layers, float scale,
                                            float silu_norm, double eps, const torch::Tensor& fw,
                                            const torch::Tensor& fb, float* x, float* out) {
  decoder_loops<float>(kind, s, kc, vc, layers, scale, silu_norm, eps, fw, fb, x, out);
}
REC2PM_VECTOR_CLONES void decoder_loops_f64(Backbone kind, const StepShape& s, const std::vector<torch::Tensor>& kc,
                                            const std::vector<torch::Tensor>& vc,
                                            const std::vector<std::vector<torch::Tensor>>& layers, double scale,
                                            double silu_norm, double eps, const torch::Tensor& fw,
                                            const torch::Tensor& fb, double* x, double* out) {
  decoder_loops<double>(kind, s, kc, vc, layers, scale, silu_norm, eps, fw, fb, x, out);
}

// Whether the loops apply: few rows, every weight a contiguous tensor of x's dtype (read
// through raw pointers), caches of x's dtype (read through their strides).
bool loops_apply(const torch::Tensor& x, const std::vector<std::vector<torch::Tensor>>& layers,
                 const std::vector<torch::Tensor>& k_caches, const std::vector<torch::Tensor>& v_caches,
                 const torch::Tensor& final_weight, const torch::Tensor& final_bias) {
  if (x.size(0) > kMaxLoopRows || (x.scalar_type() != torch::kFloat && x.scalar_type() != torch::kDouble)) {
    return false;
  }
  const auto fits = [&](const torch::Tensor& t) { return t.scalar_type() == x.scalar_type() && t.is_contiguous(); };
  for (const auto& layer : layers) {
    for (const auto& w : layer) {
      if (!fits(w)) return false;
    }
  }
  for (size_t l = 0; l < k_caches.size(); ++l) {
    if (k_caches[l].scalar_type() != x.scalar_type() || v_caches[l].scalar_type() != x.scalar_type()) return false;
  }
  return fits(final_weight) && fits(final_bias);
}

constexpr int64_t kSoftmax = 0, kSilu = 1;  // rec2pm::Score codes

}  // namespace

torch::Tensor decoder_step_cpu(torch::Tensor x, const std::optional<torch::Tensor>& position_rows,
                               const std::optional<torch::Tensor>& input_norm_weight,
                               const std::optional<torch::Tensor>& input_norm_bias,
                               const torch::Tensor& cu_seqlens_new, const std::vector<torch::Tensor>& k_caches,
                               const std::vector<torch::Tensor>& v_caches, const torch::Tensor& cache_seqlens,
                               const std::vector<std::vector<torch::Tensor>>& layers, int64_t backbone,
                               int64_t num_heads, double silu_norm, const torch::Tensor& final_norm_weight,
                               const torch::Tensor& final_norm_bias, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a (tokens, d_model) CPU tensor");
  TORCH_CHECK(k_caches.size() == layers.size() && v_caches.size() == layers.size(),
              "one K and one V cache per layer are required");
  c10::InferenceMode guard;
  const int64_t tokens = x.size(0), d = x.size(1), head_dim = d / num_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const auto kind = static_cast<Backbone>(backbone);
  const auto cu = cu_seqlens_new.to(torch::kLong).contiguous();
  const auto filled = cache_seqlens.to(torch::kLong).contiguous();
  TORCH_CHECK(input_norm_weight.has_value() == input_norm_bias.has_value(),
              "input_norm_weight and input_norm_bias go together");
  if (position_rows) x = x + *position_rows;
  if (input_norm_weight) x = at::layer_norm(x, {d}, *input_norm_weight, *input_norm_bias, eps);
  if (loops_apply(x, layers, k_caches, v_caches, final_norm_weight, final_norm_bias)) {
    x = x.contiguous().clone();  // the residual stream, updated in place
    auto out = torch::empty_like(x);
    const StepShape shape{tokens, d, num_heads, head_dim, filled.numel(), cu.data_ptr<int64_t>(),
                          filled.data_ptr<int64_t>()};
    if (x.scalar_type() == torch::kFloat) {
      decoder_loops_f32(kind, shape, k_caches, v_caches, layers, static_cast<float>(scale),
                        static_cast<float>(silu_norm), eps, final_norm_weight, final_norm_bias, x.data_ptr<float>(),
                        out.data_ptr<float>());
    } else {
      decoder_loops_f64(kind, shape, k_caches, v_caches, layers, scale, silu_norm, eps, final_norm_weight,
                        final_norm_bias, x.data_ptr<double>(), out.data_ptr<double>());
    }
    return out;
  }
  const auto heads_shape = std::vector<int64_t>{tokens, num_heads, head_dim};
  // A prefill (every cache empty, as Decoder.prefill calls it): the new rows are whole
  // blocks, so their attention is the causal segment kernel over the rows themselves, tiled
  // over rows and keys, and the caches only receive them.  The cached step would rescan
  // each row's prefix on its own: 2x the segment kernel's time on a 200-row block.
  const int64_t* filled_counts = filled.data_ptr<int64_t>();
  const bool prefill = std::all_of(filled_counts, filled_counts + filled.numel(), [](int64_t n) { return n == 0; });
  std::vector<torch::Tensor> slots;  // (user, slot) of each new row, for a prefill's appends
  if (prefill) {
    const auto lengths = cu.slice(0, 1) - cu.slice(0, 0, cu.numel() - 1);
    const auto user = at::repeat_interleave(lengths);
    slots = {user, at::arange(tokens, cu.options()) - cu.index({user})};
  }
  const auto attend = [&](size_t layer, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          int64_t score, const std::optional<torch::Tensor>& bias, double norm) {
    if (!prefill) {
      return cached_step_forward_cpu(q, k, v, cu, k_caches[layer], v_caches[layer], filled, true, score, scale, bias,
                                     norm);
    }
    k_caches[layer].index_put_({slots[0], slots[1]}, k);
    v_caches[layer].index_put_({slots[0], slots[1]}, v);
    return segment_attention_forward_cpu(q, k, v, cu, static_cast<int64_t>(Pattern::kCausal), 1, 0, score, scale,
                                         bias, norm, std::nullopt, std::nullopt, 0, 0, 0, true, std::nullopt,
                                         std::nullopt, std::nullopt);
  };
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& w = layers[l];
    if (kind == Backbone::kSasrec) {
      TORCH_CHECK(w.size() == kSasrecWeights, "a SASRec layer needs ", kSasrecWeights, " weights");
      const auto h = at::layer_norm(x, {d}, w[kAttnNormW], w[kAttnNormB], eps);
      const auto q = at::linear(h, w[kQueryW], w[kQueryB]).view(heads_shape);
      const auto k = at::linear(h, w[kKeyW]).view(heads_shape);
      const auto v = at::linear(h, w[kValueW], w[kValueB]).view(heads_shape);
      const auto a = attend(l, q, k, v, kSoftmax, std::nullopt, 1.0);
      x = x + at::linear(a.view({tokens, d}), w[kAttnOutW], w[kAttnOutB]);
      const auto f = at::gelu(at::linear(at::layer_norm(x, {d}, w[kFfnNormW], w[kFfnNormB], eps), w[kFfnInW],
                                         w[kFfnInB]));
      x = x + at::linear(f, w[kFfnOutW], w[kFfnOutB]);
    } else {
      TORCH_CHECK(w.size() == kHstuWeights, "an HSTU layer needs ", kHstuWeights, " weights");
      const auto uvqk = at::silu(at::linear(at::layer_norm(x, {d}, w[kInputNormW], w[kInputNormB], eps), w[kF1W],
                                            w[kF1B]));
      const auto parts = uvqk.split(d, -1);  // U, V, Q, K
      const auto a = attend(l, parts[2].contiguous().view(heads_shape), parts[3].contiguous().view(heads_shape),
                            parts[1].contiguous().view(heads_shape), kSilu, w[kRelBias], silu_norm);
      const auto gated = at::layer_norm(a.view({tokens, d}), {d}, w[kOutputNormW], w[kOutputNormB], eps) * parts[0];
      x = x + at::linear(gated, w[kF2W], w[kF2B]);
    }
  }
  return at::layer_norm(x, {d}, final_norm_weight, final_norm_bias, eps);
}

}  // namespace rec2pm
