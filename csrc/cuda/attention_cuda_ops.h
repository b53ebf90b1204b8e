// Torch-facing CUDA attention ops (built only with CUDA): the tensors' checks, then the
// launchers of attention_kernels.h on the current stream.
#pragma once

#include <torch/extension.h>

#include <optional>

namespace rec2pm {

// cached_step_attention on CUDA: appends k_new / v_new (converted to the caches' dtype by
// the caller) into the caches in place, then returns (total_new, H, Dv) in q_new's dtype.
// q_new, k_new, v_new (total_new, H, D / Dv) with unit dim stride; caches (B, capacity, H,
// D / Dv) with unit dim stride; cu_seqlens_new (B + 1,) and cache_seqlens (B,) int64;
// rel_bias (H, buckets) fp32 or absent.
torch::Tensor cached_step_forward_cuda(const torch::Tensor& q_new, const torch::Tensor& k_new,
                                       const torch::Tensor& v_new, const torch::Tensor& cu_seqlens_new,
                                       torch::Tensor k_cache, torch::Tensor v_cache, const torch::Tensor& cache_seqlens,
                                       int64_t score, double scale, const std::optional<torch::Tensor>& rel_bias,
                                       double silu_norm);

// segment_attention forward on CUDA for short blocks (every pattern, both scores, the
// relative bias): q, k (T, H, D), v (T, H, Dv) of one dtype with unit dim stride;
// cu_seqlens (B + 1,) int64; max_seqlen at least the longest sequence.
torch::Tensor segment_attention_forward_cuda(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                             const torch::Tensor& cu_seqlens, int64_t max_seqlen, int64_t pattern,
                                             int64_t segment_len, int64_t num_memory_tokens, int64_t score,
                                             double scale, const std::optional<torch::Tensor>& rel_bias,
                                             double silu_norm);

}  // namespace rec2pm
