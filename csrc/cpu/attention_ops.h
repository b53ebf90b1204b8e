#pragma once

#include <torch/extension.h>

#include <optional>

namespace rec2pm {

// segment_attention forward on the CPU: q, k (T, H, D), v (T, H, Dv), fp32 or fp64,
// contiguous; cu_seqlens (B + 1,) int64; rel_bias (H, buckets) of q's dtype or absent.
// Options as rec2pm_kernels.segment_attention after validation (pattern and score codes);
// HSTU's masks (causal only): num_targets (B,) int64, contextual_seq_len, max_attn_len,
// min_full_attn_seq_len; silu_norms (B,) replaces silu_norm per sequence when given;
// HSTU's timestamp bias ts_bias (H, buckets + 1) with int64 timestamps and query_timestamps (T,).
torch::Tensor segment_attention_forward_cpu(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                            const torch::Tensor& cu_seqlens, int64_t pattern, int64_t segment_len,
                                            int64_t num_memory_tokens, int64_t score, double scale,
                                            const std::optional<torch::Tensor>& rel_bias, double silu_norm,
                                            const std::optional<torch::Tensor>& num_targets,
                                            const std::optional<torch::Tensor>& silu_norms,
                                            int64_t contextual_seq_len, int64_t max_attn_len,
                                            int64_t min_full_attn_seq_len,
                                            const std::optional<torch::Tensor>& ts_bias,
                                            const std::optional<torch::Tensor>& timestamps,
                                            const std::optional<torch::Tensor>& query_timestamps);

// cached_step_attention on the CPU: appends k_new / v_new into the caches in place (unless
// `append` is false: the caller appended already), then returns (total_new, H, Dv).
// Caches (B, capacity, H, D) of q_new's dtype, with any non-overlapping strides.
torch::Tensor cached_step_forward_cpu(const torch::Tensor& q_new, const torch::Tensor& k_new,
                                      const torch::Tensor& v_new, const torch::Tensor& cu_seqlens_new,
                                      torch::Tensor k_cache, torch::Tensor v_cache, const torch::Tensor& cache_seqlens,
                                      bool append, int64_t score, double scale,
                                      const std::optional<torch::Tensor>& rel_bias, double silu_norm);

}  // namespace rec2pm
