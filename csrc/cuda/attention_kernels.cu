// CUDA kernels of the cached step and of segment attention over short blocks (see
// attention_kernels.h).  Free of torch headers so that it compiles standalone with nvcc
// (tests/kernels/test_build.py); the key spans, the bias buckets and the chunk merge are the
// __host__ __device__ functions the CPU kernels use and test.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention_kernels.h"
#include "rec2pm/patterns.h"
#include "rec2pm/split_keys.h"

namespace rec2pm {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = kCudaThreads / kWarp;
constexpr int kValuesPerThread = static_cast<int>(kCudaMaxHeadDim / kCudaThreads);
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Block-wide max / sum: a butterfly within each warp, then the warps' results in warp
// order, so every thread gets the same value, computed in a fixed order.
template <bool kMax>
__device__ float block_reduce(float value, float* scratch) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(kFullMask, value, offset);
    value = kMax ? fmaxf(value, other) : value + other;
  }
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = value;
  __syncthreads();
  float total = scratch[0];
  for (int w = 1; w < kWarps; ++w) total = kMax ? fmaxf(total, scratch[w]) : total + scratch[w];
  __syncthreads();  // scratch is reused by the next reduction
  return total;
}

// The index i of a sorted (count + 1,) offsets array with offsets[i] <= t < offsets[i + 1].
__device__ int64_t owner_of(const int64_t* offsets, int64_t count, int64_t t) {
  int64_t lo = 0, hi = count;  // offsets[lo] <= t < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The keys one program attends: ranges of key positions, each contiguous, laid end to end
// in score order.  CacheRanges is one range of a user's cache; SpanRanges a row's pattern
// spans (attention_math.h), both clipped to the program's chunk.
struct CacheRanges {
  int64_t position, first, last;  // the row's λ and its chunk of slots [first, last)
  __device__ int64_t count() const { return 1; }
  __device__ void get(int64_t, int64_t* begin, int64_t* end, int64_t* offset) const {
    *begin = first;
    *end = last;
    *offset = 0;
  }
  __device__ int64_t bucket(int64_t slot, int64_t buckets) const { return bias_bucket(position, slot, buckets); }
};

struct SpanRanges {
  Pattern pattern;
  int64_t row, S, C, first, last;  // the chunk [first, last) in visible-key order
  __device__ int64_t count() const { return key_span_count(pattern, row, S, C); }
  // Span i clipped to the chunk (empty when they do not meet), and where its scores start.
  __device__ void get(int64_t i, int64_t* begin, int64_t* end, int64_t* offset) const {
    int64_t seen = 0, b = 0, e = 0;
    for (int64_t s = 0; s <= i; ++s) {
      key_span(pattern, row, s, S, C, &b, &e);
      if (s < i) seen += e - b;
    }
    const int64_t lo = first > seen ? first - seen : 0;
    const int64_t hi = last - seen < e - b ? last - seen : e - b;
    *begin = b + lo;
    *end = hi > lo ? b + hi : b + lo;
    *offset = seen + lo - first;
  }
  __device__ int64_t bucket(int64_t key, int64_t buckets) const {
    return bias_bucket(bias_position(pattern, row, S, C), bias_position(pattern, key, S, C), buckets);
  }
};

// Where a program reads its row's keys and values: key position p at keys + p * stride.
template <typename T>
struct KeyValues {
  const T* keys;
  const T* values;
  int64_t key_stride, value_stride;
};

// One program: the query row (in shared memory, fp32) over one chunk of its visible keys.
// Leaves the chunk's unnormalised weighted values in acc (kValuesPerThread per thread:
// values lane, lane + lanes, ...; valid in threads of group 0) and returns its maximum and
// weight sum (SiLU: 0 and unused).
template <typename T, typename Ranges>
__device__ void attend_chunk(const float* query, const KeyValues<T>& kv, const Ranges& ranges, int64_t n,
                             int64_t head, int64_t dim, int64_t dim_v, const ScoreOptions& options, float* scores,
                             float* values_scratch, float* reduce_scratch, float* acc, float* max, float* sum) {
  const float* bias_row = options.bias != nullptr ? options.bias + head * options.buckets : nullptr;
  float local_max = -INFINITY;
  for (int64_t r = 0; r < ranges.count(); ++r) {
    int64_t begin, end, offset;
    ranges.get(r, &begin, &end, &offset);
    for (int64_t p = begin + threadIdx.x; p < end; p += kCudaThreads) {
      const T* key = kv.keys + p * kv.key_stride;
      float z = 0.0f;
      for (int64_t d = 0; d < dim; ++d) z += query[d] * to_float(key[d]);
      z *= options.scale;
      if (bias_row != nullptr) z += bias_row[ranges.bucket(p, options.buckets)];
      scores[offset + p - begin] = z;
      local_max = fmaxf(local_max, z);
    }
  }
  __syncthreads();
  const bool softmax = options.score == Score::kSoftmax;
  const float top = softmax ? block_reduce<true>(local_max, reduce_scratch) : 0.0f;
  const float inv_norm = 1.0f / options.silu_norm;
  float local_sum = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kCudaThreads) {
    const float z = scores[i];
    const float w = softmax ? expf(z - top) : silu(z) * inv_norm;
    scores[i] = w;
    local_sum += w;
  }
  __syncthreads();
  *sum = softmax ? block_reduce<false>(local_sum, reduce_scratch) : 0.0f;
  *max = top;
  // Weighted values: thread (group, lane) adds the keys group, group + groups, ... of each
  // range for values lane, lane + lanes, ...; then group 0 adds the groups in order.
  const int64_t lanes = dim_v < kCudaThreads ? dim_v : kCudaThreads;
  const int64_t groups = kCudaThreads / lanes;
  const int64_t group = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  float local[kValuesPerThread];
  for (int k = 0; k < kValuesPerThread; ++k) local[k] = 0.0f;
  if (group < groups) {
    for (int64_t r = 0; r < ranges.count(); ++r) {
      int64_t begin, end, offset;
      ranges.get(r, &begin, &end, &offset);
      for (int64_t p = begin + group; p < end; p += groups) {
        const float w = scores[offset + p - begin];
        const T* value = kv.values + p * kv.value_stride;
        for (int k = 0; k < kValuesPerThread; ++k) {
          const int64_t e = lane + k * lanes;
          if (e < dim_v) local[k] += w * to_float(value[e]);
        }
      }
    }
    for (int k = 0; k < kValuesPerThread; ++k) {
      const int64_t e = lane + k * lanes;
      if (e < dim_v) values_scratch[group * dim_v + e] = local[k];
    }
  }
  __syncthreads();
  if (group == 0) {
    for (int k = 0; k < kValuesPerThread; ++k) {
      const int64_t e = lane + k * lanes;
      float total = 0.0f;
      if (e < dim_v) {
        for (int64_t g = 0; g < groups; ++g) total += values_scratch[g * dim_v + e];
      }
      acc[k] = total;
    }
  }
}

// Shared memory of one program.
struct ProgramScratch {
  float query[kCudaMaxHeadDim];
  float scores[kCudaKeyChunk];
  float values[2 * kCudaThreads];  // groups * dim_v <= max(kCudaThreads, dim_v) <= 2 * kCudaThreads
  float reduce[kWarps];
};

// The chunk's result: the output row when the row has one chunk, else its partial.
template <typename T>
__device__ void write_chunk(Score score, const float* acc, float max, float sum, int64_t dim_v, int64_t chunks,
                            int64_t chunk, T* out_row, float* partial) {
  const int64_t lanes = dim_v < kCudaThreads ? dim_v : kCudaThreads;
  if (threadIdx.x >= lanes) return;
  const float normaliser = finish_scale(score, sum);
  for (int k = 0; k < kValuesPerThread; ++k) {
    const int64_t e = threadIdx.x + k * lanes;
    if (e >= dim_v) continue;
    if (chunks == 1) {
      out_row[e] = from_float<T>(acc[k] * normaliser);
    } else {
      partial[chunk * (dim_v + 2) + e] = acc[k];
    }
  }
  if (chunks > 1 && threadIdx.x == 0) {
    partial[chunk * (dim_v + 2) + dim_v] = max;
    partial[chunk * (dim_v + 2) + dim_v + 1] = sum;
  }
}

// A row whose keys run past what the launch was sized for (a max_seqlen below its
// sequence's length, a cache filled past its capacity: checked on CUDA only with
// validate=True, which costs a device sync) gets NaN, never a write outside its buffers.
template <typename T>
__device__ void mark_unsized_row(T* out_row, int64_t dim_v) {
  for (int64_t e = threadIdx.x; e < dim_v; e += kCudaThreads) out_row[e] = from_float<T>(__int_as_float(0x7fc00000));
}

// A row's chunks, merged in order (split_keys.h) into its output.
template <typename T>
__device__ void merge_row(Score score, const float* partial, int64_t chunks, int64_t dim_v, T* out_row) {
  for (int64_t e = threadIdx.x; e < dim_v; e += kCudaThreads) {
    float acc = partial[e], max = partial[dim_v], sum = partial[dim_v + 1];
    for (int64_t c = 1; c < chunks; ++c) {
      const float* chunk = partial + c * (dim_v + 2);
      const MergeScales<float> s = merge_scales(score, max, chunk[dim_v]);
      acc = acc * s.first + chunk[e] * s.second;
      sum = sum * s.first + chunk[dim_v + 1] * s.second;
      max = s.max;
    }
    out_row[e] = from_float<T>(acc * finish_scale(score, sum));
  }
}

// Loads the query row of `head` into shared memory as fp32.
template <typename T>
__device__ void load_query(const RowsView& q, int64_t token, int64_t head, int64_t dim, float* query) {
  const T* row = static_cast<const T*>(q.data) + token * q.token_stride + head * q.head_stride;
  for (int64_t d = threadIdx.x; d < dim; d += kCudaThreads) query[d] = to_float(row[d]);
  __syncthreads();
}

// Where a row's result goes: the output row, and its chunk partials when rows are split.
struct RowResults {
  void* out;
  float* partials;
  int64_t heads, dim_v, most_chunks;  // most_chunks: the chunks of the longest row the grid covers
  template <typename T>
  __device__ T* out_row(int64_t t, int64_t head) const {
    return static_cast<T*>(out) + (t * heads + head) * dim_v;
  }
  __device__ float* partial(int64_t t, int64_t head) const {
    return most_chunks > 1 ? partials + (t * heads + head) * most_chunks * (dim_v + 2) : nullptr;
  }
};

// One program: query row t (head `head`) over chunk `chunk` of the n keys `ranges` lists,
// of a row with `row_chunks` chunks; writes the output row or the chunk's partial.
template <typename T, typename Ranges>
__device__ void attend_program(const RowsView& q, int64_t t, int64_t head, const KeyValues<T>& kv,
                               const Ranges& ranges, int64_t n, int64_t chunk, int64_t row_chunks, int64_t dim,
                               const ScoreOptions& options, const RowResults& results) {
  __shared__ ProgramScratch scratch;
  load_query<T>(q, t, head, dim, scratch.query);
  float acc[kValuesPerThread], max, sum;
  attend_chunk<T>(scratch.query, kv, ranges, n, head, dim, results.dim_v, options, scratch.scores, scratch.values,
                  scratch.reduce, acc, &max, &sum);
  write_chunk<T>(options.score, acc, max, sum, results.dim_v, row_chunks, chunk, results.out_row<T>(t, head),
                 results.partial(t, head));
}

// ---- the cached step ----------------------------------------------------------------------

// grid (total_new, heads): new row t of user b into slot cache_seqlens[b] + t - cu_new[b].
template <typename T>
__global__ void cached_step_append_kernel(CachedStepProblem p) {
  const int64_t t = blockIdx.x, head = blockIdx.y;
  const int64_t b = owner_of(p.cu_new, p.batch, t);
  const int64_t slot = p.cache_seqlens[b] + t - p.cu_new[b];
  if (slot < 0 || slot >= p.capacity) return;  // past the cache: the chunk kernel marks the row
  const T* k_row = static_cast<const T*>(p.k_new.data) + t * p.k_new.token_stride + head * p.k_new.head_stride;
  const T* v_row = static_cast<const T*>(p.v_new.data) + t * p.v_new.token_stride + head * p.v_new.head_stride;
  T* key = static_cast<T*>(p.k_cache.data) + b * p.k_cache.batch_stride + slot * p.k_cache.slot_stride +
           head * p.k_cache.head_stride;
  T* value = static_cast<T*>(p.v_cache.data) + b * p.v_cache.batch_stride + slot * p.v_cache.slot_stride +
             head * p.v_cache.head_stride;
  for (int64_t d = threadIdx.x; d < p.dim; d += kCudaThreads) key[d] = k_row[d];
  for (int64_t e = threadIdx.x; e < p.dim_v; e += kCudaThreads) value[e] = v_row[e];
}

struct CachedRow {
  int64_t user, position, chunks;
};

__device__ CachedRow cached_row(const CachedStepProblem& p, int64_t t) {
  const int64_t b = owner_of(p.cu_new, p.batch, t);
  const int64_t position = p.cache_seqlens[b] + t - p.cu_new[b];  // λ of the row; it sees slots 0..position
  return {b, position, chunk_count(position + 1, kCudaKeyChunk)};
}

__device__ RowResults cached_results(const CachedStepProblem& p) {
  return {p.out, p.partials, p.heads, p.dim_v, chunk_count(p.capacity, kCudaKeyChunk)};
}

// grid (total_new, heads, chunks of the capacity): one chunk of one new row.
template <typename T>
__global__ void __launch_bounds__(kCudaThreads) cached_step_chunk_kernel(CachedStepProblem p) {
  const int64_t t = blockIdx.x, head = blockIdx.y, chunk = blockIdx.z;
  const CachedRow row = cached_row(p, t);
  const RowResults results = cached_results(p);
  if (row.position < 0 || row.position >= p.capacity) {
    if (chunk == 0) mark_unsized_row(results.out_row<T>(t, head), p.dim_v);
    return;
  }
  if (chunk >= row.chunks) return;
  const int64_t first = chunk * kCudaKeyChunk;
  const int64_t last = first + kCudaKeyChunk < row.position + 1 ? first + kCudaKeyChunk : row.position + 1;
  const KeyValues<T> kv{
      static_cast<const T*>(p.k_cache.data) + row.user * p.k_cache.batch_stride + head * p.k_cache.head_stride,
      static_cast<const T*>(p.v_cache.data) + row.user * p.v_cache.batch_stride + head * p.v_cache.head_stride,
      p.k_cache.slot_stride, p.v_cache.slot_stride};
  attend_program<T>(p.q, t, head, kv, CacheRanges{row.position, first, last}, last - first, chunk, row.chunks, p.dim,
                    p.options, results);
}

// grid (total_new, heads): merges the rows that were split.
template <typename T>
__global__ void cached_step_merge_kernel(CachedStepProblem p) {
  const int64_t t = blockIdx.x, head = blockIdx.y;
  const CachedRow row = cached_row(p, t);
  const RowResults results = cached_results(p);
  if (row.chunks > 1 && row.position < p.capacity) merge_row<T>(p.options.score, results.partial(t, head), row.chunks, p.dim_v, results.out_row<T>(t, head));
}

// ---- segment attention over short blocks --------------------------------------------------

struct BlockRow {
  int64_t token0, row, visible, chunks;
};

__device__ BlockRow block_row(const SegmentBlockProblem& p, int64_t t) {
  const int64_t b = owner_of(p.cu, p.batch, t);
  const int64_t row = t - p.cu[b];
  int64_t visible = 0;
  for (int64_t s = 0; s < key_span_count(p.pattern, row, p.segment_len, p.memory_tokens); ++s) {
    int64_t begin, end;
    key_span(p.pattern, row, s, p.segment_len, p.memory_tokens, &begin, &end);
    visible += end - begin;
  }
  return {p.cu[b], row, visible, chunk_count(visible, kCudaKeyChunk)};
}

__device__ RowResults block_results(const SegmentBlockProblem& p) {
  return {p.out, p.partials, p.heads, p.dim_v, chunk_count(p.max_seqlen, kCudaKeyChunk)};
}

// grid (tokens, heads, chunks of max_seqlen): one chunk of one row's visible keys.
template <typename T>
__global__ void __launch_bounds__(kCudaThreads) segment_block_chunk_kernel(SegmentBlockProblem p) {
  const int64_t t = blockIdx.x, head = blockIdx.y, chunk = blockIdx.z;
  const BlockRow row = block_row(p, t);
  const RowResults results = block_results(p);
  if (row.chunks > results.most_chunks) {  // partial() would be null or too short
    if (chunk == 0) mark_unsized_row(results.out_row<T>(t, head), p.dim_v);
    return;
  }
  if (chunk >= row.chunks) return;
  const int64_t first = chunk * kCudaKeyChunk;
  const int64_t last = first + kCudaKeyChunk < row.visible ? first + kCudaKeyChunk : row.visible;
  const KeyValues<T> kv{
      static_cast<const T*>(p.k.data) + row.token0 * p.k.token_stride + head * p.k.head_stride,
      static_cast<const T*>(p.v.data) + row.token0 * p.v.token_stride + head * p.v.head_stride, p.k.token_stride,
      p.v.token_stride};
  const SpanRanges ranges{p.pattern, row.row, p.segment_len, p.memory_tokens, first, last};
  attend_program<T>(p.q, t, head, kv, ranges, last - first, chunk, row.chunks, p.dim, p.options, results);
}

template <typename T>
__global__ void segment_block_merge_kernel(SegmentBlockProblem p) {
  const int64_t t = blockIdx.x, head = blockIdx.y;
  const BlockRow row = block_row(p, t);
  const RowResults results = block_results(p);
  if (row.chunks > 1 && row.chunks <= results.most_chunks) merge_row<T>(p.options.score, results.partial(t, head), row.chunks, p.dim_v, results.out_row<T>(t, head));
}

// ---- launchers ------------------------------------------------------------------------------

bool valid_head_dims(int64_t dim, int64_t dim_v) {
  return dim >= 1 && dim <= kCudaMaxHeadDim && dim_v >= 1 && dim_v <= kCudaMaxHeadDim;
}

template <typename T>
cudaError_t run_cached_step(const CachedStepProblem& p, cudaStream_t stream) {
  const dim3 rows(static_cast<unsigned>(p.total_new), static_cast<unsigned>(p.heads));
  cached_step_append_kernel<T><<<rows, kCudaThreads, 0, stream>>>(p);
  const int64_t chunks = chunk_count(p.capacity, kCudaKeyChunk);
  const dim3 programs(rows.x, rows.y, static_cast<unsigned>(chunks));
  cached_step_chunk_kernel<T><<<programs, kCudaThreads, 0, stream>>>(p);
  if (chunks > 1) cached_step_merge_kernel<T><<<rows, kCudaThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_segment_block(const SegmentBlockProblem& p, cudaStream_t stream) {
  const dim3 rows(static_cast<unsigned>(p.tokens), static_cast<unsigned>(p.heads));
  const int64_t chunks = chunk_count(p.max_seqlen, kCudaKeyChunk);
  const dim3 programs(rows.x, rows.y, static_cast<unsigned>(chunks));
  segment_block_chunk_kernel<T><<<programs, kCudaThreads, 0, stream>>>(p);
  if (chunks > 1) segment_block_merge_kernel<T><<<rows, kCudaThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_cached_step(const CachedStepProblem& p, cudaStream_t stream) {
  if (p.total_new == 0 || p.heads == 0) return cudaSuccess;
  if (!valid_head_dims(p.dim, p.dim_v)) return cudaErrorInvalidValue;
  switch (p.type) {
    case ElementType::kFloat32: return run_cached_step<float>(p, stream);
    case ElementType::kFloat16: return run_cached_step<__half>(p, stream);
    case ElementType::kBFloat16: return run_cached_step<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_segment_block(const SegmentBlockProblem& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.heads == 0) return cudaSuccess;
  if (!valid_head_dims(p.dim, p.dim_v)) return cudaErrorInvalidValue;
  switch (p.type) {
    case ElementType::kFloat32: return run_segment_block<float>(p, stream);
    case ElementType::kFloat16: return run_segment_block<__half>(p, stream);
    case ElementType::kBFloat16: return run_segment_block<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rec2pm
