#pragma once

#include <torch/extension.h>

#include <optional>

#include "rec2pm/attention_math.h"

namespace rec2pm {

// segment_attention forward on the CPU: q, k (T, H, D), v (T, H, Dv), fp32 or fp64,
// contiguous; cu_seqlens (B + 1,) int64; rel_bias (H, buckets) of q's dtype or absent.
// Options as rec2pm_kernels.segment_attention after validation (pattern and score codes);
// HSTU's masks (on the causal pattern only): num_targets (B,) int64, contextual_seq_len,
// max_attn_len, min_full_attn_seq_len, causal (false: bidirectional); silu_norms (B,) replaces silu_norm per sequence when given;
// HSTU's timestamp bias ts_bias (H, buckets + 1) with int64 timestamps and query_timestamps (T,).
torch::Tensor segment_attention_forward_cpu(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                            const torch::Tensor& cu_seqlens, int64_t pattern, int64_t segment_len,
                                            int64_t num_memory_tokens, int64_t score, double scale,
                                            const std::optional<torch::Tensor>& rel_bias, double silu_norm,
                                            const std::optional<torch::Tensor>& num_targets,
                                            const std::optional<torch::Tensor>& silu_norms,
                                            int64_t contextual_seq_len, int64_t max_attn_len,
                                            int64_t min_full_attn_seq_len, bool causal,
                                            const std::optional<torch::Tensor>& ts_bias,
                                            const std::optional<torch::Tensor>& timestamps,
                                            const std::optional<torch::Tensor>& query_timestamps);

// Cache strides, in elements: (batch, slot, head, dim).  Caches held per user (a serving
// session's entries, stepped without stacking them into one batch) list each user's own
// (slot, head, dim) tensor in `users` instead, and `batch` is unused.
struct CacheLayout {
  int64_t batch, slot, head, dim;
  void* const* users = nullptr;
};

// User b's cache: row b of the batch, or the user's own tensor.
template <typename T>
inline T* user_cache(T* cache, const CacheLayout& layout, int64_t b) {
  return layout.users != nullptr ? static_cast<T*>(layout.users[b]) : cache + b * layout.batch;
}

// A (batch, slot, head, dim) cache tensor's strides.
inline CacheLayout layout_of(const torch::Tensor& cache) {
  return {cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3)};
}

// The cached step on raw pointers, for a caller that has checked shapes, dtypes and that
// every user's new rows fit its cache (the fused decoder step): appends the new rows
// (tokens, heads, dim) contiguous, then writes out (tokens, heads, dim_v).
void cached_step_rows(const float* q, const float* k_new, const float* v_new, const int64_t* cu, const int64_t* cached,
                      int64_t batch, int64_t heads, int64_t dim, int64_t dim_v, float* k_cache, CacheLayout ks,
                      float* v_cache, CacheLayout vs, Score score, float scale, const float* bias, int64_t buckets,
                      float silu_norm, float* out);
void cached_step_rows(const double* q, const double* k_new, const double* v_new, const int64_t* cu,
                      const int64_t* cached, int64_t batch, int64_t heads, int64_t dim, int64_t dim_v, double* k_cache,
                      CacheLayout ks, double* v_cache, CacheLayout vs, Score score, double scale, const double* bias,
                      int64_t buckets, double silu_norm, double* out);

// The cached step's appends alone: each user's new rows into cache slots cached[b], ... .
void append_cache_rows(const float* k_new, const float* v_new, const int64_t* cu, const int64_t* cached,
                       int64_t batch, int64_t heads, int64_t dim, int64_t dim_v, float* k_cache, CacheLayout ks,
                       float* v_cache, CacheLayout vs);
void append_cache_rows(const double* k_new, const double* v_new, const int64_t* cu, const int64_t* cached,
                       int64_t batch, int64_t heads, int64_t dim, int64_t dim_v, double* k_cache, CacheLayout ks,
                       double* v_cache, CacheLayout vs);

// segment_attention's causal pattern (plain causal attention within each sequence) on raw
// contiguous (tokens, heads, dim) pointers, for a caller that has checked them (the fused
// decoder step's prefill); bias is a (heads, buckets) relative-bias table or null.
// `last_block_only`: only the block of kRowBlock rows holding each sequence's last row is
// written (with the bits the full call gives it); the other rows of `out` are left as they were.
void causal_attention_rows(const float* q, const float* k, const float* v, const int64_t* cu, int64_t batch,
                           int64_t tokens, int64_t heads, int64_t dim, int64_t dim_v, Score score, float scale,
                           const float* bias, int64_t buckets, float silu_norm, float* out, bool last_block_only);
void causal_attention_rows(const double* q, const double* k, const double* v, const int64_t* cu, int64_t batch,
                           int64_t tokens, int64_t heads, int64_t dim, int64_t dim_v, Score score, double scale,
                           const double* bias, int64_t buckets, double silu_norm, double* out, bool last_block_only);

// cached_step_attention on the CPU: appends k_new / v_new into the caches in place (unless
// `append` is false: the caller appended already), then returns (total_new, H, Dv).
// Caches (B, capacity, H, D) of q_new's dtype, with any non-overlapping strides.
torch::Tensor cached_step_forward_cpu(const torch::Tensor& q_new, const torch::Tensor& k_new,
                                      const torch::Tensor& v_new, const torch::Tensor& cu_seqlens_new,
                                      torch::Tensor k_cache, torch::Tensor v_cache, const torch::Tensor& cache_seqlens,
                                      bool append, int64_t score, double scale,
                                      const std::optional<torch::Tensor>& rel_bias, double silu_norm);

}  // namespace rec2pm
