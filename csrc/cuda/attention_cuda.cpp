// Torch-facing wrappers of the CUDA attention kernels (built only with CUDA).  The public
// functions' validation (rec2pm_kernels.validation) runs before these; the checks here
// guard the raw pointers the kernels take.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cpu/input_checks.h"
#include "attention_cuda_ops.h"
#include "attention_kernels.h"
#include "rec2pm/split_keys.h"

namespace rec2pm {
namespace {

ElementType element_type(const torch::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case torch::kFloat: return ElementType::kFloat32;
    case torch::kHalf: return ElementType::kFloat16;
    case torch::kBFloat16: return ElementType::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16 for the CUDA kernels, got ", t.scalar_type());
  }
}

void check_on(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

RowsView rows_view(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  check_on(t, like, name);
  TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1, name, " must be (tokens, heads, dim) with a unit dim stride");
  return {t.data_ptr(), t.stride(0), t.stride(1)};
}

CacheView cache_view(torch::Tensor& t, const torch::Tensor& like, const char* name) {
  check_on(t, like, name);
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, name, " must be (batch, capacity, heads, dim) with a unit dim stride");
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

void check_index_vector(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  check_on(t, like, name);
  TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous() && t.dim() == 1, name,
              " must be a contiguous int64 vector");
}

// The bias table as the kernels read it (fp32, contiguous) and the options around it;
// `table` keeps the converted tensor alive.
ScoreOptions score_options(int64_t score, double scale, const std::optional<torch::Tensor>& rel_bias,
                           double silu_norm, int64_t heads, const torch::Tensor& like, torch::Tensor& table) {
  check_score_code(score);
  if (rel_bias) {
    check_on(*rel_bias, like, "rel_bias");
    check_bias_table(rel_bias, heads, "rel_bias");
    table = rel_bias->to(torch::kFloat).contiguous();
  }
  return {static_cast<Score>(score), static_cast<float>(scale), static_cast<float>(silu_norm),
          rel_bias ? table.data_ptr<float>() : nullptr, rel_bias ? table.size(1) : 1};
}

// The launch grids (rows, heads, chunks): CUDA takes at most 2^31 - 1 blocks in x and 65,535
// in y and z; a grid past them fails to launch (after the cached step has appended).
void check_grid(int64_t rows, int64_t heads, int64_t max_keys) {
  TORCH_CHECK(rows <= 2147483647 && heads <= 65535, "the CUDA kernels take at most 2^31 - 1 rows and 65,535 heads, ",
              "got ", rows, " and ", heads);
  const int64_t chunks = chunk_count(max_keys, kCudaKeyChunk);
  TORCH_CHECK(chunks <= 65535, "the CUDA kernels split a row's keys into at most 65,535 chunks of ", kCudaKeyChunk,
              ": ", max_keys, " keys is too many");
}

torch::Tensor partials_for(int64_t rows, int64_t heads, int64_t dim_v, int64_t max_keys, const torch::Tensor& like) {
  return torch::empty({split_partial_floats(rows, heads, dim_v, max_keys)}, like.options().dtype(torch::kFloat));
}

}  // namespace

torch::Tensor cached_step_forward_cuda(const torch::Tensor& q_new, const torch::Tensor& k_new,
                                       const torch::Tensor& v_new, const torch::Tensor& cu_seqlens_new,
                                       torch::Tensor k_cache, torch::Tensor v_cache, const torch::Tensor& cache_seqlens,
                                       int64_t score, double scale, const std::optional<torch::Tensor>& rel_bias,
                                       double silu_norm) {
  TORCH_CHECK(q_new.is_cuda(), "q_new must be a CUDA tensor, got ", q_new.device());
  const c10::cuda::CUDAGuard guard(q_new.device());
  CachedStepProblem p{};
  p.type = element_type(q_new, "q_new");
  TORCH_CHECK(k_cache.scalar_type() == q_new.scalar_type() && v_cache.scalar_type() == q_new.scalar_type() &&
                  k_new.scalar_type() == q_new.scalar_type() && v_new.scalar_type() == q_new.scalar_type(),
              "k_new, v_new, k_cache and v_cache must have q_new's dtype ", q_new.scalar_type());
  p.q = rows_view(q_new, q_new, "q_new");
  p.k_new = rows_view(k_new, q_new, "k_new");
  p.v_new = rows_view(v_new, q_new, "v_new");
  p.k_cache = cache_view(k_cache, q_new, "k_cache");
  p.v_cache = cache_view(v_cache, q_new, "v_cache");
  check_index_vector(cu_seqlens_new, q_new, "cu_seqlens_new");
  check_index_vector(cache_seqlens, q_new, "cache_seqlens");
  p.batch = cache_seqlens.numel();
  TORCH_CHECK(cu_seqlens_new.numel() == p.batch + 1, "cu_seqlens_new must have batch + 1 entries");
  TORCH_CHECK(p.batch >= 1 || q_new.size(0) == 0, "new rows need cache_seqlens of at least one user");
  p.total_new = q_new.size(0);
  p.heads = q_new.size(1);
  p.dim = q_new.size(2);
  p.dim_v = v_new.size(2);
  p.capacity = k_cache.size(1);
  TORCH_CHECK(k_new.size(0) == p.total_new && v_new.size(0) == p.total_new && k_new.size(1) == p.heads &&
                  v_new.size(1) == p.heads && k_new.size(2) == p.dim,
              "q_new, k_new and v_new must agree in tokens, heads and head_dim");
  TORCH_CHECK(k_cache.size(0) == p.batch && v_cache.size(0) == p.batch && k_cache.size(2) == p.heads &&
                  v_cache.size(2) == p.heads && k_cache.size(3) == p.dim && v_cache.size(3) == p.dim_v &&
                  v_cache.size(1) == p.capacity,
              "k_cache / v_cache must be (batch, capacity, heads, head_dim) matching the new rows");
  TORCH_CHECK(p.dim <= kCudaMaxHeadDim && p.dim_v <= kCudaMaxHeadDim, "the CUDA kernels take head dims up to ",
              kCudaMaxHeadDim);
  check_grid(p.total_new, p.heads, p.capacity);
  torch::Tensor table;
  p.options = score_options(score, scale, rel_bias, silu_norm, p.heads, q_new, table);
  p.cu_new = cu_seqlens_new.data_ptr<int64_t>();
  p.cache_seqlens = cache_seqlens.data_ptr<int64_t>();
  auto out = torch::empty({p.total_new, p.heads, p.dim_v}, q_new.options());
  auto partials = partials_for(p.total_new, p.heads, p.dim_v, p.capacity, q_new);
  p.out = out.data_ptr();
  p.partials = partials.numel() ? partials.data_ptr<float>() : nullptr;
  const cudaError_t err = launch_cached_step(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "the CUDA cached step failed: ", cudaGetErrorString(err));
  return out;
}

torch::Tensor segment_attention_forward_cuda(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                             const torch::Tensor& cu_seqlens, int64_t max_seqlen, int64_t pattern,
                                             int64_t segment_len, int64_t num_memory_tokens, int64_t score,
                                             double scale, const std::optional<torch::Tensor>& rel_bias,
                                             double silu_norm) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  SegmentBlockProblem p{};
  p.type = element_type(q, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "k and v must have q's dtype ",
              q.scalar_type());
  p.q = rows_view(q, q, "q");
  p.k = rows_view(k, q, "k");
  p.v = rows_view(v, q, "v");
  check_index_vector(cu_seqlens, q, "cu_seqlens");
  TORCH_CHECK(cu_seqlens.numel() >= 1, "cu_seqlens must hold batch + 1 >= 1 offsets");
  p.batch = cu_seqlens.numel() - 1;
  p.tokens = q.size(0);
  p.heads = q.size(1);
  p.dim = q.size(2);
  p.dim_v = v.size(2);
  TORCH_CHECK(k.size(0) == p.tokens && v.size(0) == p.tokens && k.size(1) == p.heads && v.size(1) == p.heads &&
                  k.size(2) == p.dim,
              "q, k and v must agree in tokens, heads and head_dim");
  TORCH_CHECK(p.dim <= kCudaMaxHeadDim && p.dim_v <= kCudaMaxHeadDim, "the CUDA kernels take head dims up to ",
              kCudaMaxHeadDim);
  check_pattern_codes(pattern, score, segment_len, num_memory_tokens);
  TORCH_CHECK(max_seqlen >= 0, "max_seqlen must be >= 0, got ", max_seqlen);
  p.max_seqlen = max_seqlen < p.tokens ? max_seqlen : p.tokens;
  check_grid(p.tokens, p.heads, p.max_seqlen);
  p.pattern = static_cast<Pattern>(pattern);
  p.segment_len = segment_len;
  p.memory_tokens = num_memory_tokens;
  torch::Tensor table;
  p.options = score_options(score, scale, rel_bias, silu_norm, p.heads, q, table);
  p.cu = cu_seqlens.data_ptr<int64_t>();
  auto out = torch::empty({p.tokens, p.heads, p.dim_v}, q.options());
  auto partials = partials_for(p.tokens, p.heads, p.dim_v, p.max_seqlen, q);
  p.out = out.data_ptr();
  p.partials = partials.numel() ? partials.data_ptr<float>() : nullptr;
  const cudaError_t err = launch_segment_block(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "the CUDA segment attention failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace rec2pm
