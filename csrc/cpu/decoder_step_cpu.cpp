// One serving step of a whole SASRec or HSTU decoder in one call: every layer's norms,
// projections, activations, gating and residuals (ATen ops) and its attention over the
// per-layer K/V cache (the C++ cached step, appending in place).  On the CPU a step of a
// few new events costs mostly per-op overhead; one call per step keeps that in C++.
//
// The math is Decoder.step's exactly (rec2pm/backbones/{sasrec,hstu}.py); tests compare the two.
#include <ATen/ATen.h>

#include <cmath>

#include "attention_ops.h"
#include "decoder_step_ops.h"

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

constexpr int64_t kSoftmax = 0, kSilu = 1;  // rec2pm::Score codes

}  // namespace

torch::Tensor decoder_step_cpu(torch::Tensor x, const std::optional<torch::Tensor>& position_rows,
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
  if (position_rows) x = x + *position_rows;
  const auto heads_shape = std::vector<int64_t>{tokens, num_heads, head_dim};
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& w = layers[l];
    if (kind == Backbone::kSasrec) {
      TORCH_CHECK(w.size() == kSasrecWeights, "a SASRec layer needs ", kSasrecWeights, " weights");
      const auto h = at::layer_norm(x, {d}, w[kAttnNormW], w[kAttnNormB], eps);
      const auto q = at::linear(h, w[kQueryW], w[kQueryB]).view(heads_shape);
      const auto k = at::linear(h, w[kKeyW]).view(heads_shape);
      const auto v = at::linear(h, w[kValueW], w[kValueB]).view(heads_shape);
      const auto a = cached_step_forward_cpu(q, k, v, cu, k_caches[l], v_caches[l], filled, true, kSoftmax, scale,
                                             std::nullopt, 1.0);
      x = x + at::linear(a.view({tokens, d}), w[kAttnOutW], w[kAttnOutB]);
      const auto f = at::gelu(at::linear(at::layer_norm(x, {d}, w[kFfnNormW], w[kFfnNormB], eps), w[kFfnInW],
                                         w[kFfnInB]));
      x = x + at::linear(f, w[kFfnOutW], w[kFfnOutB]);
    } else {
      TORCH_CHECK(w.size() == kHstuWeights, "an HSTU layer needs ", kHstuWeights, " weights");
      const auto uvqk = at::silu(at::linear(at::layer_norm(x, {d}, w[kInputNormW], w[kInputNormB], eps), w[kF1W],
                                            w[kF1B]));
      const auto parts = uvqk.split(d, -1);  // U, V, Q, K
      const auto a = cached_step_forward_cpu(parts[2].contiguous().view(heads_shape),
                                             parts[3].contiguous().view(heads_shape),
                                             parts[1].contiguous().view(heads_shape), cu, k_caches[l], v_caches[l],
                                             filled, true, kSilu, scale, w[kRelBias], silu_norm);
      const auto gated = at::layer_norm(a.view({tokens, d}), {d}, w[kOutputNormW], w[kOutputNormB], eps) * parts[0];
      x = x + at::linear(gated, w[kF2W], w[kF2B]);
    }
  }
  return at::layer_norm(x, {d}, final_norm_weight, final_norm_bias, eps);
}

}  // namespace rec2pm
