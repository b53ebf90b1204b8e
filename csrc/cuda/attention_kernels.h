// The CUDA kernels' problems and launchers, free of torch headers (attention_kernels.cu
// compiles standalone with nvcc; attention_cuda.cpp binds them to tensors).
//
// Two forward kernels, fp32 / fp16 / bf16 tensors with fp32 math:
//   * the cached step: new rows appended to per-user K/V caches, then attending to them;
//   * segment attention over short packed blocks, such as the memory update [M ; S_h ; w],
//     for every pattern (the rule of attention_math.h's key spans).
// One program attends one (row, head) to one chunk of at most kCudaKeyChunk of its visible
// keys; a row with more is split, and a combine kernel merges the chunks in order with the
// rule of split_keys.h, the one the CPU cached step uses.  Every reduction runs in a fixed
// order, so results are bit-identical from run to run.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "rec2pm/attention_math.h"

namespace rec2pm {

// Element types of the tensors the kernels read and write.
enum class ElementType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int64_t kCudaKeyChunk = 256;  // visible keys per program
constexpr int kCudaThreads = 128;       // threads per program
constexpr int64_t kCudaMaxHeadDim = 256;

// (tokens, heads, dim) rows with unit dim stride: element strides of a token and a head.
struct RowsView {
  const void* data;
  int64_t token_stride, head_stride;
};

// (batch, slots, heads, dim) caches with unit dim stride.
struct CacheView {
  void* data;
  int64_t batch_stride, slot_stride, head_stride;
};

// What turns a query-key dot into a weight: z = dot * scale + bias[head, bucket], then
// softmax or SiLU (divided by silu_norm).  bias: (heads, buckets) fp32, or null.
struct ScoreOptions {
  Score score;
  float scale, silu_norm;
  const float* bias;
  int64_t buckets;
};

struct CachedStepProblem {
  ElementType type;
  RowsView q, k_new, v_new;  // (total_new, heads, dim / dim_v); k_new and v_new of the caches' type
  CacheView k_cache, v_cache;
  const int64_t* cu_new;         // (batch + 1,) offsets of the new rows, on the device
  const int64_t* cache_seqlens;  // (batch,) filled slots before this step, on the device
  int64_t batch, total_new, heads, dim, dim_v, capacity;
  ScoreOptions options;
  void* out;        // (total_new, heads, dim_v), contiguous
  float* partials;  // split_partial_floats(total_new, heads, dim_v, capacity) floats
};

struct SegmentBlockProblem {
  ElementType type;
  RowsView q, k, v;
  const int64_t* cu;  // (batch + 1,) sequence offsets, on the device
  int64_t batch, tokens, heads, dim, dim_v, max_seqlen;
  Pattern pattern;
  int64_t segment_len, memory_tokens;
  ScoreOptions options;
  void* out;        // (tokens, heads, dim_v), contiguous
  float* partials;  // split_partial_floats(tokens, heads, dim_v, max_seqlen) floats
};

// Scratch floats for the chunk partials of `rows` rows with at most `max_keys` visible keys
// (0 when one chunk covers them: nothing is merged).
inline int64_t split_partial_floats(int64_t rows, int64_t heads, int64_t dim_v, int64_t max_keys) {
  const int64_t chunks = max_keys <= kCudaKeyChunk ? 1 : (max_keys + kCudaKeyChunk - 1) / kCudaKeyChunk;
  return chunks == 1 ? 0 : rows * heads * chunks * (dim_v + 2);
}

// Appends the new rows, then attends (both on `stream`, in order).
cudaError_t launch_cached_step(const CachedStepProblem& problem, cudaStream_t stream);

cudaError_t launch_segment_block(const SegmentBlockProblem& problem, cudaStream_t stream);

}  // namespace rec2pm
