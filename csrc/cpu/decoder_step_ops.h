#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace rec2pm {

// A whole decoder's serving step: x (tokens, d) item embeddings of the new events,
// position_rows (tokens, d) SASRec's position embeddings of them (absent for HSTU),
// input_norm_weight / _bias the decoder's input LayerNorm (absent when it has none),
// per-layer caches appended in place; layers[l] the block's weights in the order of
// rec2pm/backbones/fused_step.py.  Returns the final-normed hidden states (tokens, d), or
// with last_rows_only each user's last new row's (batch, d): the last layer then runs its
// work after attention, and a prefill its attention, for those rows only (every user needs
// a new row; the caches still receive every row's K and V).
torch::Tensor decoder_step_cpu(torch::Tensor x, const std::optional<torch::Tensor>& position_rows,
                               const std::optional<torch::Tensor>& input_norm_weight,
                               const std::optional<torch::Tensor>& input_norm_bias,
                               const torch::Tensor& cu_seqlens_new, const std::vector<torch::Tensor>& k_caches,
                               const std::vector<torch::Tensor>& v_caches, const torch::Tensor& cache_seqlens,
                               const std::vector<std::vector<torch::Tensor>>& layers, int64_t backbone,
                               int64_t num_heads, double silu_norm, const torch::Tensor& final_norm_weight,
                               const torch::Tensor& final_norm_bias, double eps, bool last_rows_only);

// decoder_step_cpu over caches held per user (a serving session's entries, stepped without
// stacking them into one batch): user_k_caches[b][l] / user_v_caches[b][l] are user b's
// layer-l caches, (capacity_b, heads, head_dim) each, every user's with the strides of user
// 0's; capacities may differ.
torch::Tensor decoder_step_users_cpu(torch::Tensor x, const std::optional<torch::Tensor>& position_rows,
                                     const std::optional<torch::Tensor>& input_norm_weight,
                                     const std::optional<torch::Tensor>& input_norm_bias,
                                     const torch::Tensor& cu_seqlens_new,
                                     const std::vector<std::vector<torch::Tensor>>& user_k_caches,
                                     const std::vector<std::vector<torch::Tensor>>& user_v_caches,
                                     const torch::Tensor& cache_seqlens,
                                     const std::vector<std::vector<torch::Tensor>>& layers, int64_t backbone,
                                     int64_t num_heads, double silu_norm, const torch::Tensor& final_norm_weight,
                                     const torch::Tensor& final_norm_bias, double eps, bool last_rows_only);

// The same decoder as a causal forward pass over packed sequences (cu_seqlens), with no
// caches: what Decoder.forward computes with the causal pattern in inference.
torch::Tensor decoder_forward_cpu(torch::Tensor x, const std::optional<torch::Tensor>& position_rows,
                                  const std::optional<torch::Tensor>& input_norm_weight,
                                  const std::optional<torch::Tensor>& input_norm_bias,
                                  const torch::Tensor& cu_seqlens,
                                  const std::vector<std::vector<torch::Tensor>>& layers, int64_t backbone,
                                  int64_t num_heads, double silu_norm, const torch::Tensor& final_norm_weight,
                                  const torch::Tensor& final_norm_bias, double eps, bool last_rows_only);

}  // namespace rec2pm
