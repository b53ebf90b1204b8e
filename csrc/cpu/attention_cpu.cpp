// Forward kernels of segment_attention and cached_step_attention on the CPU.
//
// Head dims in the reference models (8 for HSTU, 16 for SASRec) are shorter than one vector
// register, so the score loop vectorises across keys, not along the head dim: keys of each
// head are first transposed to (dim, tokens), and a tile of 16 keys accumulates its scores
// in registers over the head dim.  The weighted sum adds w * v key by key, a vector along
// the value dim, over values grouped per head.  The visible keys of a row come as spans in
// which every key is visible (attention_math.h), so masked keys are never computed: causal
// and global rows cost about their visible keys, kv_memory_overwrite rows at most two units.
//
// Plain causal attention in fp32 at head dims 8 and 16 (the decoders' forward and serving
// prefill) runs 16 rows per vector instead (causal_lanes.h).
//
// Work is split over (sequence, head, block of rows) with at::parallel_for.  Each output
// row is computed by one thread in a fixed order, so results are bit-identical from run to
// run and for any number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_ops.h"
#include "causal_lanes.h"
#include "input_checks.h"
#include "rec2pm/attention_math.h"
#include "vector_math.h"
#include "rec2pm/hstu_masks.h"
#include "rec2pm/split_keys.h"
#include "rec2pm/time_bias.h"

namespace rec2pm {
namespace {

constexpr int64_t kRowBlock = 16;  // rows per task: enough work to amortise scheduling
constexpr int64_t kKeyTile = 16;  // keys whose scores accumulate together (one AVX-512 vector of fp32)
// Multiply-adds a thread should get before work is split: a serving step is a few thousand
// per layer, and waking threads for it costs more than it saves (and much more when the
// cores are shared).
constexpr int64_t kMinWorkPerThread = 1 << 16;

int64_t grain_size(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, work_per_task));
}

// x (tokens, heads, dim) -> out (heads, dim, tokens).
template <typename T>
void transpose_heads(const T* x, int64_t tokens, int64_t heads, int64_t dim, T* out) {
  at::parallel_for(0, heads * dim, grain_size(tokens), [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t h = i / dim, d = i % dim;
      T* row = out + i * tokens;
      for (int64_t t = 0; t < tokens; ++t) row[t] = x[(t * heads + h) * dim + d];
    }
  });
}

// x (tokens, heads, dim) -> out (heads, tokens, dim).  A row's weighted sum then reads its
// head's values as one contiguous run: in the (tokens, heads) layout each key's few values
// sat on a line of their own, and a 1,000-token HSTU forward spent 30% more time.
template <typename T>
void group_by_head(const T* x, int64_t tokens, int64_t heads, int64_t dim, T* out) {
  at::parallel_for(0, heads, grain_size(tokens * dim), [&](int64_t first, int64_t last) {
    for (int64_t h = first; h < last; ++h) {
      for (int64_t t = 0; t < tokens; ++t) {
        std::memcpy(out + (h * tokens + t) * dim, x + (t * heads + h) * dim, dim * sizeof(T));
      }
    }
  });
}

// acc[0..dim_v) += sum_j w[j] * value[j * stride + e]: values in their own layout, one key
// adding a vector along the value dim.  For the usual widths the accumulator has a
// compile-time size and stays in registers; a runtime-sized one would round-trip through
// memory on every key, a store-to-load chain that cost more than all the arithmetic.
//
// Rows of at most one vector register (8 or 16 fp32) spread the keys over four accumulators:
// with one, every key's add waits for the previous key's (a chain of one add latency per
// key, a third of an HSTU serving block's attention time at width 8).  They are vector
// types because arrays indexed in the loop did not stay in registers.
template <typename T, int64_t kWidth>
__attribute__((always_inline)) inline void add_weighted_values_fixed(const T* w, const T* value, int64_t stride,
                                                                     int64_t count, T* acc) {
  if constexpr (kWidth * sizeof(T) <= 64) {
    typedef T Vector __attribute__((vector_size(kWidth * sizeof(T))));
    // Loads into a reference: a vector returned by value changes its ABI with the
    // instruction set of each clone (-Wpsabi).
    const auto load = [](const T* from, Vector& v) { std::memcpy(&v, from, sizeof(Vector)); };
    Vector a0, a1 = {}, a2 = {}, a3 = {}, v0, v1, v2, v3;
    load(acc, a0);
    int64_t j = 0;
    for (; j + 4 <= count; j += 4, value += 4 * stride) {
      load(value, v0);
      load(value + stride, v1);
      load(value + 2 * stride, v2);
      load(value + 3 * stride, v3);
      a0 += w[j] * v0;
      a1 += w[j + 1] * v1;
      a2 += w[j + 2] * v2;
      a3 += w[j + 3] * v3;
    }
    for (; j < count; ++j, value += stride) {
      load(value, v0);
      a0 += w[j] * v0;
    }
    a0 = (a0 + a1) + (a2 + a3);
    std::memcpy(acc, &a0, sizeof(Vector));
  } else {
    T local[kWidth];
    for (int64_t e = 0; e < kWidth; ++e) local[e] = acc[e];
    for (int64_t j = 0; j < count; ++j, value += stride) {
      const T wj = w[j];
      for (int64_t e = 0; e < kWidth; ++e) local[e] += wj * value[e];
    }
    for (int64_t e = 0; e < kWidth; ++e) acc[e] = local[e];
  }
}

template <typename T>
__attribute__((always_inline)) inline void add_weighted_values(const T* w, const T* value, int64_t stride,
                                                               int64_t count, int64_t dim_v, T* acc) {
  switch (dim_v) {
    case 8: return add_weighted_values_fixed<T, 8>(w, value, stride, count, acc);
    case 16: return add_weighted_values_fixed<T, 16>(w, value, stride, count, acc);
    case 32: return add_weighted_values_fixed<T, 32>(w, value, stride, count, acc);
    case 64: return add_weighted_values_fixed<T, 64>(w, value, stride, count, acc);
    default:
      for (int64_t j = 0; j < count; ++j, value += stride) {
        for (int64_t e = 0; e < dim_v; ++e) acc[e] += w[j] * value[e];
      }
  }
}

// Softmax or SiLU weights of n scores, in place, with the chunk's maximum and weight sum
// (split_keys.h; SiLU's are 0 and unused).  One function per score, so that a loop over
// heads can branch once outside them: with the branch inside that loop the all-heads step
// measured about 20% slower.
template <typename T>
__attribute__((always_inline)) inline void softmax_weights(T* s, int64_t n, T* max, T* sum) {
  const T top = lane_max(s, n);
  for (int64_t j = 0; j < n; ++j) s[j] = vector_exp(s[j] - top);
  *max = top;
  *sum = lane_sum(s, n);
}

template <typename T>
__attribute__((always_inline)) inline void silu_weights(T* s, int64_t n, T silu_norm, T* max, T* sum) {
  const T inv_norm = T(1) / silu_norm;
  for (int64_t j = 0; j < n; ++j) s[j] = s[j] / (T(1) + vector_exp(-s[j])) * inv_norm;
  *max = *sum = T(0);
}

template <typename T>
__attribute__((always_inline)) inline void chunk_weights(T* s, int64_t n, Score score, T silu_norm, T* max, T* sum) {
  if (score == Score::kSilu) {
    silu_weights(s, n, silu_norm, max, sum);
  } else {
    softmax_weights(s, n, max, sum);
  }
}

// The weights of all of a row's n scores, in place; returns what their weighted sum is
// multiplied by (1 / sum for softmax, 1 for SiLU).
template <typename T>
__attribute__((always_inline)) inline T score_weights(T* s, int64_t n, Score score, T silu_norm) {
  T max, sum;
  chunk_weights(s, n, score, silu_norm, &max, &sum);
  return finish_scale(score, sum);
}

// s[j] += table[clamp(shift - j, 0, buckets - 1)] for j in [0, count), as three runs that
// each vectorise: keys past the last bucket (its constant), keys inside the table (read
// backwards, contiguous) and keys ahead of the row (bucket 0).  A clamped index per key kept
// the loop scalar, a quarter of an HSTU serving block's attention time.
template <typename T>
__attribute__((always_inline)) inline void add_relative_bias(const T* table, int64_t buckets, int64_t shift,
                                                             int64_t count, T* s) {
  const int64_t last = buckets - 1;
  const int64_t far_end = std::clamp<int64_t>(shift - last, 0, count);  // distance > last before it
  const int64_t near_end = std::clamp<int64_t>(shift + 1, far_end, count);  // distance >= 0 before it
  const T far = table[last], ahead = table[0];
  for (int64_t j = 0; j < far_end; ++j) s[j] += far;
  for (int64_t j = far_end; j < near_end; ++j) s[j] += table[shift - j];
  for (int64_t j = near_end; j < count; ++j) s[j] += ahead;
}

struct SegmentProblem {
  int64_t tokens, heads, dim, dim_v, segment_len, memory_tokens, buckets;
  Pattern pattern;
  Score score;
  HstuMask hstu;
  bool uses_hstu;  // candidates, a prefix or a window: spans from hstu_key_spans
  // HSTU's timestamp bias, or null: a (heads, time_buckets + 1) table of the problem's dtype
  // (typed where it is read), and the key and query time of every packed token.
  const void* time_table = nullptr;
  const int64_t* key_times = nullptr;
  const int64_t* query_times = nullptr;
  int64_t time_buckets = 0;
};

// The visible keys of row r: the pattern's spans, or HSTU's (at most kMaxHstuSpans).
struct RowSpans {
  const SegmentProblem& p;
  int64_t row, count;
  int64_t begin[kMaxHstuSpans], end[kMaxHstuSpans];

  RowSpans(const SegmentProblem& problem, int64_t r, int64_t length, int64_t num_targets) : p(problem), row(r) {
    count = p.uses_hstu ? hstu_key_spans(p.hstu, r, length, num_targets, begin, end)
                        : key_span_count(p.pattern, r, p.segment_len, p.memory_tokens);
  }
  void get(int64_t span, int64_t* b, int64_t* e) const {
    if (p.uses_hstu) {
      *b = begin[span];
      *e = end[span];
    } else {
      key_span(p.pattern, row, span, p.segment_len, p.memory_tokens, b, e);
    }
  }
};


// One output row: query row r of the sequence starting at token0, head h.  Keys come
// transposed per head (heads, dim, tokens), values grouped per head (heads, tokens, dim_v).
template <typename T>
__attribute__((always_inline)) inline void attend_row(const SegmentProblem& p, const T* q, const T* keys_t, const T* v, const T* bias, T scale,
                T silu_norm, int64_t token0, int64_t r, int64_t h, const RowSpans& spans, T* scores, T* acc,
                T* out) {
  const int64_t S = p.segment_len, C = p.memory_tokens;
  const T* query = q + ((token0 + r) * p.heads + h) * p.dim;
  const int64_t lambda_row = bias_position(p.pattern, r, S, C);
  int64_t n = 0;
  for (int64_t span = 0; span < spans.count; ++span) {
    int64_t begin, end;
    spans.get(span, &begin, &end);
    T* s = scores + n;
    const int64_t count = end - begin;
    const T* keys = keys_t + h * p.dim * p.tokens + token0 + begin;  // (dim, tokens) of this head
    // Tiles of keys accumulate in registers.  The last tile is whole too: it reads up to
    // kKeyTile - 1 keys past the span (the transposed keys have that much room at the end)
    // and writes their scores past it (the buffer has a tile of room; a later span's scores
    // overwrite them), where one key at a time took a twelfth of the time.
    for (int64_t j = 0; j < count; j += kKeyTile) {
      T tile[kKeyTile] = {};
      for (int64_t d = 0; d < p.dim; ++d) {
        const T qd = query[d];
        const T* key = keys + d * p.tokens + j;
        for (int64_t l = 0; l < kKeyTile; ++l) tile[l] += qd * key[l];
      }
      for (int64_t l = 0; l < kKeyTile; ++l) s[j + l] = tile[l] * scale;
    }
    if (bias != nullptr) {
      // λ moves in step with the position inside a span (a global span never leaves its
      // unit), so the distance λ(row) - λ(key) is `shift - j`: no division per key.
      const int64_t shift = lambda_row - bias_position(p.pattern, begin, S, C);
      add_relative_bias(bias + h * p.buckets, p.buckets, shift, count, s);
    }
    if (p.time_table != nullptr) {
      const T* table = static_cast<const T*>(p.time_table) + h * (p.time_buckets + 1);
      const int64_t query_time = p.query_times[token0 + r];
      const int64_t* key_time = p.key_times + token0 + begin;
      for (int64_t j = 0; j < count; ++j) s[j] += table[time_bucket(query_time, key_time[j], p.time_buckets)];
    }
    n += count;
  }
  // SiLU weighs each score alone, so it runs over whole tiles (the buffer has a tile of room,
  // holding finite values): the last n % kKeyTile scores would otherwise take the scalar exp.
  const int64_t weighed = p.score == Score::kSilu ? (n + kKeyTile - 1) / kKeyTile * kKeyTile : n;
  const T normaliser = score_weights(scores, weighed, p.score, silu_norm);
  std::fill(acc, acc + p.dim_v, T(0));
  n = 0;
  for (int64_t span = 0; span < spans.count; ++span) {
    int64_t begin, end;
    spans.get(span, &begin, &end);
    const T* w = scores + n;
    const int64_t count = end - begin;
    add_weighted_values(w, v + (h * p.tokens + token0 + begin) * p.dim_v, p.dim_v, count, p.dim_v, acc);
    n += count;
  }
  T* row_out = out + ((token0 + r) * p.heads + h) * p.dim_v;
  for (int64_t e = 0; e < p.dim_v; ++e) row_out[e] = acc[e] * normaliser;
}

// The per-row entry points, one per dtype, cloned per instruction set (templates cannot be).
REC2PM_VECTOR_CLONES void attend_row_f32(const SegmentProblem& p, const float* q, const float* keys_t,
                                         const float* v, const float* bias, float scale, float silu_norm,
                                         int64_t token0, int64_t r, int64_t h, const RowSpans& spans, float* scores,
                                         float* acc, float* out) {
  attend_row<float>(p, q, keys_t, v, bias, scale, silu_norm, token0, r, h, spans, scores, acc, out);
}
REC2PM_VECTOR_CLONES void attend_row_f64(const SegmentProblem& p, const double* q, const double* keys_t,
                                         const double* v, const double* bias, double scale, double silu_norm,
                                         int64_t token0, int64_t r, int64_t h, const RowSpans& spans,
                                         double* scores, double* acc, double* out) {
  attend_row<double>(p, q, keys_t, v, bias, scale, silu_norm, token0, r, h, spans, scores, acc, out);
}
inline void attend_row_any(const SegmentProblem& p, const float* q, const float* k, const float* v, const float* b,
                           float scale, float norm, int64_t t0, int64_t r, int64_t h, const RowSpans& spans,
                           float* s, float* acc, float* o) {
  attend_row_f32(p, q, k, v, b, scale, norm, t0, r, h, spans, s, acc, o);
}
inline void attend_row_any(const SegmentProblem& p, const double* q, const double* k, const double* v,
                           const double* b, double scale, double norm, int64_t t0, int64_t r, int64_t h,
                           const RowSpans& spans, double* s, double* acc, double* o) {
  attend_row_f64(p, q, k, v, b, scale, norm, t0, r, h, spans, s, acc, o);
}

// Tasks (sequence, head, block of kRowBlock rows), numbered sequence after sequence and,
// in a sequence, head after head: a thread's run of tasks then reads one head's keys and
// values block after block (with the heads interleaved, a 4,000-row SASRec sequence's
// four heads outgrew the L2 cache and the lane kernel took 25% longer).
struct RowBlockTasks {
  struct Task {
    int64_t sequence, head, block;
  };
  std::vector<int64_t> first_task;
  int64_t heads, longest = 0;
  const int64_t* cu;
  // One block per sequence and head, the one holding its last row (what a decoder's last
  // layer needs when only the last rows are read): a row's block, and so its bits, are those
  // of the full set of tasks.
  bool last_block_only;

  RowBlockTasks(const int64_t* offsets, int64_t batch, int64_t num_heads, bool last_block = false)
      : first_task(batch + 1, 0), heads(num_heads), cu(offsets), last_block_only(last_block) {
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t length = cu[b + 1] - cu[b];
      longest = std::max(longest, length);
      const int64_t blocks = last_block_only ? (length > 0 ? 1 : 0) : (length + kRowBlock - 1) / kRowBlock;
      first_task[b + 1] = first_task[b] + blocks * heads;
    }
  }
  int64_t count() const { return first_task.back(); }
  // at::parallel_for's grain: a task's multiply-adds, at about half the longest sequence's keys.
  int64_t grain(int64_t dim, int64_t dim_v) const { return grain_size(kRowBlock * (longest / 2 + 1) * (dim + dim_v)); }
  Task operator[](int64_t task) const {
    const int64_t b = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
    const int64_t local = task - first_task[b], blocks = (first_task[b + 1] - first_task[b]) / heads;
    if (last_block_only) return {b, local, (cu[b + 1] - cu[b] - 1) / kRowBlock};
    return {b, local / blocks, local % blocks};
  }
};

// Plain causal attention in fp32 (the decoders' forward and serving prefill) runs 16 rows
// at a time with the rows in vector lanes (causal_lanes.h).
static_assert(kRowBlock == kRowLanes, "a task's block of rows is one block of the lane kernel");

// Each head's bias (heads, buckets) as a run of `run` values that a block reads with one
// load per key (causal_lanes.h); empty without a bias.
int64_t bias_run_length(int64_t longest) { return longest + 2 * kRowLanes; }
std::vector<float> lane_bias_runs(const float* bias, int64_t heads, int64_t buckets, int64_t run) {
  std::vector<float> runs;
  if (bias == nullptr) return runs;
  runs.resize(heads * run);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t t = 0; t < run; ++t) {
      runs[h * run + t] = bias[h * buckets + std::clamp<int64_t>(t - kRowLanes, 0, buckets - 1)];
    }
  }
  return runs;
}

// Whether an fp32 problem takes it: plain causal, without HSTU's masks or timestamp bias.
bool takes_row_lanes(const SegmentProblem& p) {
  return p.pattern == Pattern::kCausal && !p.uses_hstu && p.time_table == nullptr &&
         causal_lanes_support(p.dim, p.dim_v);
}

void causal_lanes_forward(const SegmentProblem& p, const float* q, const float* k, const float* v, const int64_t* cu,
                          int64_t batch, const float* bias, float scale, float silu_norm, const float* silu_norms,
                          float* out, bool last_block_only) {
  std::vector<float> keys_by_head(p.tokens * p.heads * p.dim), values_by_head(p.tokens * p.heads * p.dim_v);
  group_by_head(k, p.tokens, p.heads, p.dim, keys_by_head.data());
  group_by_head(v, p.tokens, p.heads, p.dim_v, values_by_head.data());
  const RowBlockTasks tasks(cu, batch, p.heads, last_block_only);
  const int64_t run = bias_run_length(tasks.longest);
  const std::vector<float> bias_runs = lane_bias_runs(bias, p.heads, p.buckets, run);
  at::parallel_for(0, tasks.count(), tasks.grain(p.dim, p.dim_v), [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const auto [b, h, block] = tasks[task];
      const int64_t token0 = cu[b];
      const CausalLanesHead head{q + (token0 * p.heads + h) * p.dim,
                                 p.heads * p.dim,
                                 keys_by_head.data() + (h * p.tokens + token0) * p.dim,
                                 values_by_head.data() + (h * p.tokens + token0) * p.dim_v,
                                 bias != nullptr ? bias_runs.data() + h * run : nullptr,
                                 out + (token0 * p.heads + h) * p.dim_v,
                                 p.heads * p.dim_v,
                                 cu[b + 1] - token0,
                                 p.dim,
                                 p.score,
                                 scale,
                                 1.0f / (silu_norms != nullptr ? silu_norms[b] : silu_norm)};
      causal_lanes_block_f32(head, block * kRowBlock);
    }
  });
}

template <typename T>
void segment_forward(const SegmentProblem& p, const T* q, const T* k, const T* v, const int64_t* cu, int64_t batch,
                     const T* bias, T scale, T silu_norm, const int64_t* num_targets, const T* silu_norms, T* out,
                     bool last_block_only = false) {
  if constexpr (std::is_same_v<T, float>) {
    if (takes_row_lanes(p)) {
      return causal_lanes_forward(p, q, k, v, cu, batch, bias, scale, silu_norm, silu_norms, out, last_block_only);
    }
  }
  std::vector<T> keys_t(p.tokens * p.heads * p.dim + kKeyTile);  // a tile of room: see attend_row
  transpose_heads(k, p.tokens, p.heads, p.dim, keys_t.data());
  std::vector<T> values_by_head(p.tokens * p.heads * p.dim_v);
  group_by_head(v, p.tokens, p.heads, p.dim_v, values_by_head.data());
  const RowBlockTasks tasks(cu, batch, p.heads, last_block_only);
  at::parallel_for(0, tasks.count(), tasks.grain(p.dim, p.dim_v), [&](int64_t first, int64_t last) {
    std::vector<T> scores(tasks.longest + kKeyTile), acc(p.dim_v);  // a tile of room: see attend_row
    for (int64_t task = first; task < last; ++task) {
      const auto [b, h, block] = tasks[task];
      const int64_t token0 = cu[b], length = cu[b + 1] - cu[b];
      const int64_t r_end = std::min(length, (block + 1) * kRowBlock);
      const int64_t targets = num_targets != nullptr ? num_targets[b] : 0;
      const T norm = silu_norms != nullptr ? silu_norms[b] : silu_norm;
      for (int64_t r = block * kRowBlock; r < r_end; ++r) {
        const RowSpans spans(p, r, length, targets);
        attend_row_any(p, q, keys_t.data(), values_by_head.data(), bias, scale, norm, token0, r, h, spans,
                       scores.data(), acc.data(), out);
      }
    }
  });
}

// A row of the cached step attends to slots [0, position] of its user's cache.  A row with
// more than kCacheChunk slots is split into even chunks of at most that many (split_keys.h),
// each its own task, so one user's long cache spreads over the threads at small batches;
// the chunk partials then merge in order.  The chunks depend only on the row's length, so
// results do not depend on the thread count.
constexpr int64_t kCacheChunk = 4096;
// How far ahead of the slot it scores the all-heads pass requests keys from memory: at
// about 60 ns a slot (HSTU, 64 users) this covers a memory latency or two.
constexpr int64_t kKeyPrefetchSlots = 8;

// The scores of slots [first, first + n) of one head: dots * scale, plus the head's bias
// (slot first + j is position - first - j events back), in that order for the per-head and
// the all-heads passes alike, and as the segment kernel adds it.
template <typename T>
__attribute__((always_inline)) inline void scale_and_bias(T* scores, int64_t n, T scale, const T* bias_row,
                                                          int64_t position, int64_t first, int64_t buckets) {
  for (int64_t j = 0; j < n; ++j) scores[j] *= scale;
  if (bias_row != nullptr) add_relative_bias(bias_row, buckets, position - first, n, scores);
}

// A chunk's partial result: dim_v weighted values, then the largest score and the weight sum.
template <typename T>
struct PartialRows {
  std::vector<T> data;
  int64_t dim_v = 0, chunks = 0, heads = 0;
  T* at(int64_t t, int64_t h, int64_t c) { return data.data() + ((t * heads + h) * chunks + c) * (dim_v + 2); }
};

// One new row (keys and values already offset to the user and head), slots [first, last):
// writes the chunk's unnormalised weighted values to acc and its maximum and sum.
template <typename T>
__attribute__((always_inline)) inline void attend_cached_chunk(const T* query, const T* keys, CacheLayout ks,
                                                               const T* values, CacheLayout vs, int64_t dim,
                                                               int64_t dim_v, int64_t position, int64_t first,
                                                               int64_t last, Score score, T scale, const T* bias_row,
                                                               int64_t buckets, T silu_norm, T* scores, T* acc,
                                                               T* max, T* sum) {
  const int64_t n = last - first;
  for (int64_t j = 0; j < n; ++j) scores[j] = head_dot(query, keys + (first + j) * ks.slot, ks.dim, dim);
  scale_and_bias(scores, n, scale, bias_row, position, first, buckets);
  chunk_weights(scores, n, score, silu_norm, max, sum);
  std::fill(acc, acc + dim_v, T(0));
  const T* chunk_values = values + first * vs.slot;
  if (vs.dim == 1) {
    add_weighted_values(scores, chunk_values, vs.slot, n, dim_v, acc);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t e = 0; e < dim_v; ++e) acc[e] += scores[j] * chunk_values[j * vs.slot + e * vs.dim];
    }
  }
}

REC2PM_VECTOR_CLONES void attend_cached_chunk_f32(const float* query, const float* keys, CacheLayout ks,
                                                  const float* values, CacheLayout vs, int64_t dim, int64_t dim_v,
                                                  int64_t position, int64_t first, int64_t last, Score score,
                                                  float scale, const float* bias_row, int64_t buckets,
                                                  float silu_norm, float* scores, float* acc, float* max,
                                                  float* sum) {
  attend_cached_chunk<float>(query, keys, ks, values, vs, dim, dim_v, position, first, last, score, scale, bias_row,
                             buckets, silu_norm, scores, acc, max, sum);
}
REC2PM_VECTOR_CLONES void attend_cached_chunk_f64(const double* query, const double* keys, CacheLayout ks,
                                                  const double* values, CacheLayout vs, int64_t dim, int64_t dim_v,
                                                  int64_t position, int64_t first, int64_t last, Score score,
                                                  double scale, const double* bias_row, int64_t buckets,
                                                  double silu_norm, double* scores, double* acc, double* max,
                                                  double* sum) {
  attend_cached_chunk<double>(query, keys, ks, values, vs, dim, dim_v, position, first, last, score, scale, bias_row,
                              buckets, silu_norm, scores, acc, max, sum);
}
inline void attend_cached_chunk_any(const float* q, const float* k, CacheLayout ks, const float* v, CacheLayout vs,
                                    int64_t dim, int64_t dim_v, int64_t position, int64_t first, int64_t last,
                                    Score score, float scale, const float* b, int64_t buckets, float norm, float* s,
                                    float* acc, float* max, float* sum) {
  attend_cached_chunk_f32(q, k, ks, v, vs, dim, dim_v, position, first, last, score, scale, b, buckets, norm, s, acc,
                          max, sum);
}
inline void attend_cached_chunk_any(const double* q, const double* k, CacheLayout ks, const double* v,
                                    CacheLayout vs, int64_t dim, int64_t dim_v, int64_t position, int64_t first,
                                    int64_t last, Score score, double scale, const double* b, int64_t buckets,
                                    double norm, double* s, double* acc, double* max, double* sum) {
  attend_cached_chunk_f64(q, k, ks, v, vs, dim, dim_v, position, first, last, score, scale, b, buckets, norm, s, acc,
                          max, sum);
}

// One new row, every head at once, slots [first, last) of its user's cache, when a slot's
// heads lie contiguous (head stride = dim, dim stride = 1: the usual (batch, slot, heads,
// dim) cache).  Both passes then read the cache slot by slot as one stream, rather than once
// per head with a stride of heads * dim: at a batch of users the caches come from memory,
// and the per-head walk left most of each line it fetched for a later pass.  The numbers
// equal attend_cached_chunk's head by head.  scores: heads * (last - first) values; acc,
// max and sum: heads * dim_v, heads and heads values.
template <typename T>
__attribute__((always_inline)) inline void attend_cached_chunk_all_heads(
    const T* query, const T* keys, int64_t key_slot, const T* values, int64_t value_slot, int64_t heads, int64_t dim,
    int64_t dim_v, int64_t position, int64_t first, int64_t last, Score score, T scale, const T* bias,
    int64_t buckets, T silu_norm, T* scores, T* acc, T* max, T* sum) {
  const int64_t n = last - first;
  constexpr int64_t kLineElements = 64 / sizeof(T);
  for (int64_t j = 0; j < n; ++j) {
    // At a batch of users the caches come from memory, and the loads of the keys stalled
    // on every line: the keys kKeyPrefetchSlots ahead are requested now.  The values'
    // passes below walk the slots once per head, a stride the hardware prefetchers follow
    // poorly; fetching each slot's values beside its keys leaves them in cache for those.
    if (j + kKeyPrefetchSlots < n) {
      const T* ahead = keys + (first + j + kKeyPrefetchSlots) * key_slot;
      for (int64_t e = 0; e < heads * dim; e += kLineElements) __builtin_prefetch(ahead + e);
    }
    const T* value_row = values + (first + j) * value_slot;
    for (int64_t e = 0; e < heads * dim_v; e += kLineElements) __builtin_prefetch(value_row + e);
    head_dots(query, keys + (first + j) * key_slot, heads, dim, scores + j, n);
  }
  for (int64_t h = 0; h < heads; ++h) {
    scale_and_bias(scores + h * n, n, scale, bias != nullptr ? bias + h * buckets : nullptr, position, first, buckets);
  }
  for (int64_t h = 0; h < heads; ++h) {
    if (score == Score::kSilu) {
      silu_weights(scores + h * n, n, silu_norm, max + h, sum + h);
    } else {
      softmax_weights(scores + h * n, n, max + h, sum + h);
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    T* head_acc = acc + h * dim_v;
    std::fill(head_acc, head_acc + dim_v, T(0));
    add_weighted_values(scores + h * n, values + first * value_slot + h * dim_v, value_slot, n, dim_v, head_acc);
  }
}

REC2PM_VECTOR_CLONES void attend_cached_chunk_all_heads_f32(const float* q, const float* k, int64_t ks,
                                                            const float* v, int64_t vs, int64_t heads, int64_t dim,
                                                            int64_t dim_v, int64_t position, int64_t first,
                                                            int64_t last, Score score, float scale, const float* b,
                                                            int64_t buckets, float norm, float* s, float* acc,
                                                            float* max, float* sum) {
  attend_cached_chunk_all_heads<float>(q, k, ks, v, vs, heads, dim, dim_v, position, first, last, score, scale, b,
                                       buckets, norm, s, acc, max, sum);
}
REC2PM_VECTOR_CLONES void attend_cached_chunk_all_heads_f64(const double* q, const double* k, int64_t ks,
                                                            const double* v, int64_t vs, int64_t heads, int64_t dim,
                                                            int64_t dim_v, int64_t position, int64_t first,
                                                            int64_t last, Score score, double scale, const double* b,
                                                            int64_t buckets, double norm, double* s, double* acc,
                                                            double* max, double* sum) {
  attend_cached_chunk_all_heads<double>(q, k, ks, v, vs, heads, dim, dim_v, position, first, last, score, scale, b,
                                        buckets, norm, s, acc, max, sum);
}
inline void attend_cached_chunk_all_heads_any(const float* q, const float* k, int64_t ks, const float* v, int64_t vs,
                                              int64_t heads, int64_t dim, int64_t dim_v, int64_t position,
                                              int64_t first, int64_t last, Score score, float scale, const float* b,
                                              int64_t buckets, float norm, float* s, float* acc, float* max,
                                              float* sum) {
  attend_cached_chunk_all_heads_f32(q, k, ks, v, vs, heads, dim, dim_v, position, first, last, score, scale, b,
                                    buckets, norm, s, acc, max, sum);
}
inline void attend_cached_chunk_all_heads_any(const double* q, const double* k, int64_t ks, const double* v,
                                              int64_t vs, int64_t heads, int64_t dim, int64_t dim_v,
                                              int64_t position, int64_t first, int64_t last, Score score,
                                              double scale, const double* b, int64_t buckets, double norm, double* s,
                                              double* acc, double* max, double* sum) {
  attend_cached_chunk_all_heads_f64(q, k, ks, v, vs, heads, dim, dim_v, position, first, last, score, scale, b,
                                    buckets, norm, s, acc, max, sum);
}

// out = acc * finish_scale(sum), dim_v values.
template <typename T>
inline void finish_row(Score score, const T* acc, T sum, int64_t dim_v, T* out) {
  const T normaliser = finish_scale(score, sum);
  for (int64_t e = 0; e < dim_v; ++e) out[e] = acc[e] * normaliser;
}

// Merges a row's chunk partials in chunk order (split_keys.h) into its output.
template <typename T>
void merge_chunks(PartialRows<T>& partials, int64_t t, int64_t h, int64_t chunks, Score score, T* out) {
  const int64_t dim_v = partials.dim_v;
  std::vector<T> acc(partials.at(t, h, 0), partials.at(t, h, 0) + dim_v);
  T max = partials.at(t, h, 0)[dim_v], sum = partials.at(t, h, 0)[dim_v + 1];
  for (int64_t c = 1; c < chunks; ++c) {
    const T* chunk = partials.at(t, h, c);
    const MergeScales<T> s = merge_scales(score, max, chunk[dim_v]);
    for (int64_t e = 0; e < dim_v; ++e) acc[e] = acc[e] * s.first + chunk[e] * s.second;
    sum = sum * s.first + chunk[dim_v + 1] * s.second;
    max = s.max;
  }
  finish_row(score, acc.data(), sum, dim_v, out);
}

// Writes each user's new rows (tokens, heads, dim) into its cache slots cached[b], ... .
template <typename T>
void append_rows(const T* k_new, const T* v_new, const int64_t* cu, const int64_t* cached, int64_t batch,
                 int64_t heads, int64_t dim, int64_t dim_v, T* k_cache, CacheLayout ks, T* v_cache, CacheLayout vs) {
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = cu[b]; t < cu[b + 1]; ++t) {
      const int64_t slot = cached[b] + t - cu[b];
      if (ks.dim == 1 && ks.head == dim && vs.dim == 1 && vs.head == dim_v) {  // a slot's heads lie contiguous
        std::memcpy(user_cache(k_cache, ks, b) + slot * ks.slot, k_new + t * heads * dim, heads * dim * sizeof(T));
        std::memcpy(user_cache(v_cache, vs, b) + slot * vs.slot, v_new + t * heads * dim_v, heads * dim_v * sizeof(T));
        continue;
      }
      for (int64_t h = 0; h < heads; ++h) {
        T* key = user_cache(k_cache, ks, b) + slot * ks.slot + h * ks.head;
        T* value = user_cache(v_cache, vs, b) + slot * vs.slot + h * vs.head;
        for (int64_t d = 0; d < dim; ++d) key[d * ks.dim] = k_new[(t * heads + h) * dim + d];
        for (int64_t e = 0; e < dim_v; ++e) value[e * vs.dim] = v_new[(t * heads + h) * dim_v + e];
      }
    }
  }
}

// A cached step of many new rows per user (KV-Mask's serving prefill and archive over its
// memory's K/V, a user's run of events) in fp32: user b's new rows are rows [cached[b],
// cached[b] + n_b) of the causal pass over its slots, so once appended they run as blocks of
// the lane kernel over those slots, gathered head by head.  The row-at-a-time step below
// rescans each row's prefix at about half the lane kernel's speed; with few rows per user
// (a serving step of one event) a block's lanes would mostly idle and the gather cost more.
// New rows per user with any, on average.  One user over 200 filled slots, one thread, SiLU
// (cached_step_attention per call, row step / lanes): 8 x 8 heads 109 / 113 us at 4 rows,
// 120 / 113 at 6, 128 / 110 at 8, 165 / 106 at 16; 4 x 16 about the same.
constexpr int64_t kMinCachedLaneRows = kRowLanes / 2;

bool takes_cached_lanes(const int64_t* cu, int64_t batch, int64_t dim, int64_t dim_v) {
  if (!causal_lanes_support(dim, dim_v)) return false;
  int64_t users = 0;
  for (int64_t b = 0; b < batch; ++b) users += cu[b + 1] > cu[b];
  return users > 0 && cu[batch] - cu[0] >= kMinCachedLaneRows * users;
}

void cached_lanes_step(const float* q, const int64_t* cu, const int64_t* cached, int64_t batch, int64_t heads,
                       int64_t dim, const float* k_cache, CacheLayout ks, const float* v_cache, CacheLayout vs,
                       Score score, float scale, const float* bias, int64_t buckets, float silu_norm, float* out) {
  // Sequence b is its slots [0, cached[b] + n_b), stored head after head from slot first_slot[b] * heads.
  std::vector<int64_t> first_slot(batch + 1, 0);
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = cached[b] + cu[b + 1] - cu[b];
    first_slot[b + 1] = first_slot[b] + length;
    longest = std::max(longest, length);
  }
  const auto length_of = [&](int64_t b) { return first_slot[b + 1] - first_slot[b]; };
  std::vector<float> keys(first_slot[batch] * heads * dim), values(first_slot[batch] * heads * dim);
  at::parallel_for(0, batch * heads, grain_size(longest * 2 * dim), [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / heads, h = task % heads, length = length_of(b);
      if (cu[b + 1] == cu[b]) continue;  // no rows of this user read its slots
      float* key_rows = keys.data() + (first_slot[b] * heads + h * length) * dim;
      float* value_rows = values.data() + (first_slot[b] * heads + h * length) * dim;
      for (int64_t slot = 0; slot < length; ++slot) {
        const float* key = user_cache(k_cache, ks, b) + slot * ks.slot + h * ks.head;
        const float* value = user_cache(v_cache, vs, b) + slot * vs.slot + h * vs.head;
        for (int64_t d = 0; d < dim; ++d) {
          key_rows[slot * dim + d] = key[d * ks.dim];
          value_rows[slot * dim + d] = value[d * vs.dim];
        }
      }
    }
  });
  const int64_t run = bias_run_length(longest);
  const std::vector<float> bias_runs = lane_bias_runs(bias, heads, buckets, run);
  const RowBlockTasks tasks(cu, batch, heads);  // blocks of each user's new rows
  const int64_t grain = grain_size(kRowBlock * (longest / 2 + 1) * 2 * dim);  // a block's keys: about half its slots
  at::parallel_for(0, tasks.count(), grain, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const auto [b, h, block] = tasks[task];
      const int64_t length = length_of(b);
      CausalLanesHead head{q + (cu[b] * heads + h) * dim,
                           heads * dim,
                           keys.data() + (first_slot[b] * heads + h * length) * dim,
                           values.data() + (first_slot[b] * heads + h * length) * dim,
                           bias != nullptr ? bias_runs.data() + h * run : nullptr,
                           out + (cu[b] * heads + h) * dim,
                           heads * dim,
                           length,
                           dim,
                           score,
                           scale,
                           1.0f / silu_norm};
      head.first_query_row = cached[b];  // q and out hold the new rows only
      causal_lanes_block_f32(head, cached[b] + block * kRowBlock);
    }
  });
}

template <typename T>
void cached_step(const T* q, const T* k_new, const T* v_new, const int64_t* cu, const int64_t* cached, int64_t batch,
                 int64_t heads, int64_t dim, int64_t dim_v, T* k_cache, CacheLayout ks, T* v_cache, CacheLayout vs,
                 bool append, Score score, T scale, const T* bias, int64_t buckets, T silu_norm, T* out) {
  if (append) {  // first: a new row sees the new rows before it
    append_rows(k_new, v_new, cu, cached, batch, heads, dim, dim_v, k_cache, ks, v_cache, vs);
  }
  if constexpr (std::is_same_v<T, float>) {
    if (takes_cached_lanes(cu, batch, dim, dim_v)) {
      return cached_lanes_step(q, cu, cached, batch, heads, dim, k_cache, ks, v_cache, vs, score, scale, bias, buckets,
                               silu_norm, out);
    }
  }
  // Tasks are (user, chunk) with every head, or (user, head, chunk); a user's chunks cover
  // its last new row's slots.  Without a split (the usual serving step) task b is user b.
  int64_t new_rows = 0, longest = 1;
  for (int64_t b = 0; b < batch; ++b) {
    new_rows = std::max(new_rows, cu[b + 1] - cu[b]);
    longest = std::max(longest, cached[b] + cu[b + 1] - cu[b]);
  }
  const int64_t most_chunks = chunk_count(longest, kCacheChunk);
  std::vector<int64_t> first_chunk;
  PartialRows<T> partials;
  if (most_chunks > 1) {
    first_chunk.assign(batch + 1, 0);
    for (int64_t b = 0; b < batch; ++b) {
      first_chunk[b + 1] = first_chunk[b] + chunk_count(cached[b] + cu[b + 1] - cu[b], kCacheChunk);
    }
    partials = {std::vector<T>(cu[batch] * heads * most_chunks * (dim_v + 2)), dim_v, most_chunks, heads};
  }
  const int64_t chunk_tasks = most_chunks > 1 ? first_chunk[batch] : batch;
  const auto user_of = [&](int64_t chunk_task) -> int64_t {
    if (most_chunks == 1) return chunk_task;
    return std::upper_bound(first_chunk.begin(), first_chunk.end(), chunk_task) - first_chunk.begin() - 1;
  };
  const auto chunk_of = [&](int64_t chunk_task, int64_t b) { return most_chunks > 1 ? chunk_task - first_chunk[b] : 0; };
  const int64_t chunk_slots = std::min(longest, kCacheChunk);
  const int64_t work_per_chunk = std::max<int64_t>(new_rows, 1) * chunk_slots * (dim + dim_v);
  // A row with one chunk is written out at once; a longer one leaves partials to merge.
  const auto split = [](int64_t position) { return chunk_count(position + 1, kCacheChunk) > 1; };
  // All heads per task when a slot's heads are contiguous and the users alone occupy the
  // threads; otherwise one task per head too, so one user's cache still splits (a user's
  // chunks need not be even: the last may hold one slot).
  const bool slot_major = ks.dim == 1 && ks.head == dim && vs.dim == 1 && vs.head == dim_v;
  if (slot_major && batch >= at::get_num_threads()) {
    at::parallel_for(0, chunk_tasks, grain_size(work_per_chunk * heads), [&](int64_t first, int64_t last) {
      std::vector<T> scores(heads * chunk_slots), acc(heads * dim_v), max(heads), sum(heads);
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = user_of(task), c = chunk_of(task, b);
        for (int64_t t = cu[b]; t < cu[b + 1]; ++t) {
          const int64_t position = cached[b] + t - cu[b];
          int64_t begin, end;
          even_chunk(position + 1, kCacheChunk, c, &begin, &end);
          if (begin >= end) continue;
          // An unsplit row accumulates in its output, then is normalised there.
          T* row_acc = split(position) ? acc.data() : out + t * heads * dim_v;
          attend_cached_chunk_all_heads_any(q + t * heads * dim, user_cache(k_cache, ks, b), ks.slot,
                                            user_cache(v_cache, vs, b), vs.slot, heads, dim, dim_v, position, begin, end,
                                            score, scale, bias, buckets, silu_norm, scores.data(), row_acc,
                                            max.data(), sum.data());
          for (int64_t h = 0; h < heads; ++h) {
            T* head_acc = row_acc + h * dim_v;
            if (split(position)) {
              T* partial = partials.at(t, h, c);
              std::copy(head_acc, head_acc + dim_v, partial);
              partial[dim_v] = max[h];
              partial[dim_v + 1] = sum[h];
            } else {
              finish_row(score, head_acc, sum[h], dim_v, head_acc);
            }
          }
        }
      }
    });
  } else {
    at::parallel_for(0, chunk_tasks * heads, grain_size(work_per_chunk), [&](int64_t first, int64_t last) {
      std::vector<T> scores(chunk_slots), scratch(dim_v + 2);
      for (int64_t task = first; task < last; ++task) {
        // Heads outermost: the threads' contiguous ranges then hold whole heads, each with
        // all of its chunks, rather than every head's first chunk on one thread.
        const int64_t h = task / chunk_tasks, b = user_of(task % chunk_tasks), c = chunk_of(task % chunk_tasks, b);
        const T* keys = user_cache(k_cache, ks, b) + h * ks.head;
        const T* values = user_cache(v_cache, vs, b) + h * vs.head;
        const T* bias_row = bias != nullptr ? bias + h * buckets : nullptr;
        for (int64_t t = cu[b]; t < cu[b + 1]; ++t) {
          const int64_t position = cached[b] + t - cu[b];  // λ of the new row; it sees slots 0..position
          int64_t begin, end;
          even_chunk(position + 1, kCacheChunk, c, &begin, &end);
          if (begin >= end) continue;
          T* acc = split(position) ? partials.at(t, h, c) : scratch.data();
          attend_cached_chunk_any(q + (t * heads + h) * dim, keys, ks, values, vs, dim, dim_v, position, begin, end,
                                  score, scale, bias_row, buckets, silu_norm, scores.data(), acc, acc + dim_v,
                                  acc + dim_v + 1);
          if (!split(position)) finish_row(score, acc, acc[dim_v + 1], dim_v, out + (t * heads + h) * dim_v);
        }
      }
    });
  }
  if (most_chunks == 1) return;
  // A merge is a few vectors per row: on the calling thread unless there are many.
  at::parallel_for(0, cu[batch] * heads, grain_size(most_chunks * (dim_v + 2)), [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int64_t t = row / heads, h = row % heads;
      const int64_t b = std::upper_bound(cu, cu + batch + 1, t) - cu - 1;
      const int64_t row_chunks = chunk_count(cached[b] + t - cu[b] + 1, kCacheChunk);
      if (row_chunks > 1) merge_chunks(partials, t, h, row_chunks, score, out + row * dim_v);
    }
  });
}

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// The causal pattern with one key per unit (segment_len 1, no memory tokens): plain causal attention.
SegmentProblem causal_problem(int64_t tokens, int64_t heads, int64_t dim, int64_t dim_v, Score score, int64_t buckets) {
  return {tokens, heads, dim, dim_v, 1, 0, buckets, Pattern::kCausal, score, HstuMask{0, 0, 0, true}, false};
}

}  // namespace

void append_cache_rows(const float* k_new, const float* v_new, const int64_t* cu, const int64_t* cached,
                       int64_t batch, int64_t heads, int64_t dim, int64_t dim_v, float* k_cache, CacheLayout ks,
                       float* v_cache, CacheLayout vs) {
  append_rows<float>(k_new, v_new, cu, cached, batch, heads, dim, dim_v, k_cache, ks, v_cache, vs);
}
void append_cache_rows(const double* k_new, const double* v_new, const int64_t* cu, const int64_t* cached,
                       int64_t batch, int64_t heads, int64_t dim, int64_t dim_v, double* k_cache, CacheLayout ks,
                       double* v_cache, CacheLayout vs) {
  append_rows<double>(k_new, v_new, cu, cached, batch, heads, dim, dim_v, k_cache, ks, v_cache, vs);
}

void causal_attention_rows(const float* q, const float* k, const float* v, const int64_t* cu, int64_t batch,
                           int64_t tokens, int64_t heads, int64_t dim, int64_t dim_v, Score score, float scale,
                           const float* bias, int64_t buckets, float silu_norm, float* out, bool last_block_only) {
  if (tokens == 0) return;
  segment_forward<float>(causal_problem(tokens, heads, dim, dim_v, score, buckets), q, k, v, cu, batch, bias, scale,
                         silu_norm, nullptr, nullptr, out, last_block_only);
}
void causal_attention_rows(const double* q, const double* k, const double* v, const int64_t* cu, int64_t batch,
                           int64_t tokens, int64_t heads, int64_t dim, int64_t dim_v, Score score, double scale,
                           const double* bias, int64_t buckets, double silu_norm, double* out, bool last_block_only) {
  if (tokens == 0) return;
  segment_forward<double>(causal_problem(tokens, heads, dim, dim_v, score, buckets), q, k, v, cu, batch, bias, scale,
                          silu_norm, nullptr, nullptr, out, last_block_only);
}

void cached_step_rows(const float* q, const float* k_new, const float* v_new, const int64_t* cu, const int64_t* cached,
                      int64_t batch, int64_t heads, int64_t dim, int64_t dim_v, float* k_cache, CacheLayout ks,
                      float* v_cache, CacheLayout vs, Score score, float scale, const float* bias, int64_t buckets,
                      float silu_norm, float* out) {
  cached_step<float>(q, k_new, v_new, cu, cached, batch, heads, dim, dim_v, k_cache, ks, v_cache, vs, true, score,
                     scale, bias, buckets, silu_norm, out);
}

void cached_step_rows(const double* q, const double* k_new, const double* v_new, const int64_t* cu,
                      const int64_t* cached, int64_t batch, int64_t heads, int64_t dim, int64_t dim_v, double* k_cache,
                      CacheLayout ks, double* v_cache, CacheLayout vs, Score score, double scale, const double* bias,
                      int64_t buckets, double silu_norm, double* out) {
  cached_step<double>(q, k_new, v_new, cu, cached, batch, heads, dim, dim_v, k_cache, ks, v_cache, vs, true, score,
                      scale, bias, buckets, silu_norm, out);
}

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
                                            const std::optional<torch::Tensor>& query_timestamps) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    check_cpu(*t, name);
    TORCH_CHECK(t->is_contiguous() && t->dim() == 3 && t->scalar_type() == q.scalar_type(), name,
                " must be a contiguous (tokens, heads, dim) tensor of q's dtype");
  }
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1), "v must have q's tokens and heads (",
              q.size(0), ", ", q.size(1), ", dim_v), got ", v.sizes());
  for (const auto& [t, name] : {std::pair{&rel_bias, "rel_bias"}, {&num_targets, "num_targets"},
                                {&silu_norms, "silu_norms"}, {&ts_bias, "ts_bias"}, {&timestamps, "timestamps"},
                                {&query_timestamps, "query_timestamps"}}) {
    if (t->has_value()) check_cpu(**t, name);
  }
  check_cpu(cu_seqlens, "cu_seqlens");
  TORCH_CHECK(cu_seqlens.scalar_type() == torch::kLong && cu_seqlens.is_contiguous() && cu_seqlens.dim() == 1 &&
                  cu_seqlens.numel() >= 1,
              "cu_seqlens must be a contiguous int64 (batch + 1,) tensor");
  check_pattern_codes(pattern, score, segment_len, num_memory_tokens);
  check_bias_table(rel_bias, q.size(1), "rel_bias");
  const int64_t batch = cu_seqlens.numel() - 1;
  check_offsets(cu_seqlens.data_ptr<int64_t>(), batch, q.size(0), "cu_seqlens");
  auto out = torch::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  if (q.size(0) == 0) return out;
  TORCH_CHECK(!num_targets || (num_targets->scalar_type() == torch::kLong && num_targets->is_contiguous() &&
                               num_targets->numel() == batch),
              "num_targets must be a contiguous int64 (batch,) tensor");
  TORCH_CHECK(contextual_seq_len >= 0 && max_attn_len >= 0 && min_full_attn_seq_len >= 0,
              "contextual_seq_len, max_attn_len and min_full_attn_seq_len must be >= 0");
  if (num_targets || contextual_seq_len > 0) {  // HSTU's spans trust them (hstu_masks.h)
    const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
    const int64_t* targets = num_targets ? num_targets->data_ptr<int64_t>() : nullptr;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t length = cu[b + 1] - cu[b];
      TORCH_CHECK(length == 0 || length >= contextual_seq_len, "sequence ", b, " has ", length,
                  " tokens, fewer than contextual_seq_len=", contextual_seq_len);
      const int64_t room = length > 0 ? length - contextual_seq_len : 0;
      TORCH_CHECK(targets == nullptr || (targets[b] >= 0 && targets[b] <= room), "num_targets[", b, "]=",
                  targets == nullptr ? 0 : targets[b], " must be in [0, ", room, "]");
    }
  }
  TORCH_CHECK(!silu_norms || (silu_norms->dim() == 1 && silu_norms->numel() == batch),
              "silu_norms must be a (batch,) tensor");
  const bool uses_hstu = num_targets.has_value() || contextual_seq_len > 0 || max_attn_len > 0 || !causal;
  TORCH_CHECK(!uses_hstu || static_cast<Pattern>(pattern) == Pattern::kCausal,
              "num_targets, contextual_seq_len, max_attn_len and causal=false refine the causal pattern only");
  TORCH_CHECK(!ts_bias || (timestamps && query_timestamps && ts_bias->dim() == 2 && ts_bias->size(0) == q.size(1) &&
                           timestamps->scalar_type() == torch::kLong && query_timestamps->scalar_type() == torch::kLong &&
                           timestamps->is_contiguous() && query_timestamps->is_contiguous() &&
                           timestamps->numel() == q.size(0) && query_timestamps->numel() == q.size(0)),
              "ts_bias must be (heads, buckets + 1) with contiguous int64 timestamps and query_timestamps, one per token");
  check_bias_table(ts_bias, q.size(1), "ts_bias");
  SegmentProblem problem{q.size(0),
                               q.size(1),
                               q.size(2),
                               v.size(2),
                               segment_len,
                               num_memory_tokens,
                               rel_bias ? rel_bias->size(1) : 1,
                               static_cast<Pattern>(pattern),
                               static_cast<Score>(score),
                               HstuMask{contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal},
                               uses_hstu};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "segment_attention_forward_cpu", [&] {
    const scalar_t* bias = nullptr;
    torch::Tensor bias_table;
    if (rel_bias) {
      bias_table = rel_bias->to(q.scalar_type()).contiguous();
      bias = bias_table.data_ptr<scalar_t>();
    }
    torch::Tensor norms, time_table;
    if (silu_norms) norms = silu_norms->to(q.scalar_type()).contiguous();
    if (ts_bias) {
      time_table = ts_bias->to(q.scalar_type()).contiguous();
      problem.time_table = time_table.data_ptr<scalar_t>();
      problem.key_times = timestamps->data_ptr<int64_t>();
      problem.query_times = query_timestamps->data_ptr<int64_t>();
      problem.time_buckets = ts_bias->size(1) - 1;
    }
    segment_forward<scalar_t>(problem, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              cu_seqlens.data_ptr<int64_t>(), batch, bias, static_cast<scalar_t>(scale),
                              static_cast<scalar_t>(silu_norm),
                              num_targets ? num_targets->data_ptr<int64_t>() : nullptr,
                              silu_norms ? norms.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>());
  });
  return out;
}

torch::Tensor cached_step_forward_cpu(const torch::Tensor& q_new, const torch::Tensor& k_new,
                                      const torch::Tensor& v_new, const torch::Tensor& cu_seqlens_new,
                                      torch::Tensor k_cache, torch::Tensor v_cache, const torch::Tensor& cache_seqlens,
                                      bool append, int64_t score, double scale,
                                      const std::optional<torch::Tensor>& rel_bias, double silu_norm) {
  for (const auto& [t, name] : {std::pair{&q_new, "q_new"}, {&k_new, "k_new"}, {&v_new, "v_new"}}) {
    check_cpu(*t, name);
    TORCH_CHECK(t->is_contiguous() && t->dim() == 3 && t->scalar_type() == q_new.scalar_type(), name,
                " must be a contiguous (tokens, heads, dim) tensor of q_new's dtype");
  }
  TORCH_CHECK(k_new.sizes() == q_new.sizes(), "k_new must have q_new's shape ", q_new.sizes(), ", got ",
              k_new.sizes());
  TORCH_CHECK(v_new.size(0) == q_new.size(0) && v_new.size(1) == q_new.size(1), "v_new must have q_new's tokens ",
              "and heads (", q_new.size(0), ", ", q_new.size(1), ", dim_v), got ", v_new.sizes());
  for (const auto& [t, name] : {std::pair<const torch::Tensor*, const char*>{&k_cache, "k_cache"},
                                {&v_cache, "v_cache"},
                                {&cu_seqlens_new, "cu_seqlens_new"},
                                {&cache_seqlens, "cache_seqlens"}}) {
    check_cpu(*t, name);
  }
  if (rel_bias) check_cpu(*rel_bias, "rel_bias");
  check_score_code(score);
  check_bias_table(rel_bias, q_new.size(1), "rel_bias");
  TORCH_CHECK(k_cache.scalar_type() == q_new.scalar_type() && v_cache.scalar_type() == q_new.scalar_type(),
              "k_cache and v_cache must have q_new's dtype");
  TORCH_CHECK(cu_seqlens_new.scalar_type() == torch::kLong && cache_seqlens.scalar_type() == torch::kLong &&
                  cu_seqlens_new.is_contiguous() && cache_seqlens.is_contiguous(),
              "cu_seqlens_new and cache_seqlens must be contiguous int64");
  // The appends write in place: never past the caches this call was given.
  const int64_t batch = cache_seqlens.numel();
  TORCH_CHECK(cu_seqlens_new.numel() == batch + 1, "cu_seqlens_new must have batch + 1 entries");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.size(0) == batch && v_cache.size(0) == batch &&
                  k_cache.size(2) == q_new.size(1) && k_cache.size(3) == q_new.size(2) &&
                  v_cache.size(2) == v_new.size(1) && v_cache.size(3) == v_new.size(2) &&
                  v_cache.size(1) == k_cache.size(1),
              "k_cache / v_cache must be (batch, capacity, heads, head_dim) matching the new rows");
  const int64_t* cu_ptr = cu_seqlens_new.data_ptr<int64_t>();
  const int64_t* filled_ptr = cache_seqlens.data_ptr<int64_t>();
  check_offsets(cu_ptr, batch, q_new.size(0), "cu_seqlens_new");  // no users: no new rows either
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(filled_ptr[b] >= 0 && filled_ptr[b] + cu_ptr[b + 1] - cu_ptr[b] <= k_cache.size(1),
                "user ", b, ": cache_seqlens plus new rows must fit the cache capacity ", k_cache.size(1));
  }
  auto out = torch::empty({q_new.size(0), q_new.size(1), v_new.size(2)}, q_new.options());
  const CacheLayout ks = layout_of(k_cache), vs = layout_of(v_cache);
  AT_DISPATCH_FLOATING_TYPES(q_new.scalar_type(), "cached_step_forward_cpu", [&] {
    const scalar_t* bias = nullptr;
    torch::Tensor bias_table;
    if (rel_bias) {
      bias_table = rel_bias->to(q_new.scalar_type()).contiguous();
      bias = bias_table.data_ptr<scalar_t>();
    }
    cached_step<scalar_t>(q_new.data_ptr<scalar_t>(), k_new.data_ptr<scalar_t>(), v_new.data_ptr<scalar_t>(),
                          cu_seqlens_new.data_ptr<int64_t>(), cache_seqlens.data_ptr<int64_t>(),
                          cache_seqlens.numel(), q_new.size(1), q_new.size(2), v_new.size(2),
                          k_cache.data_ptr<scalar_t>(), ks, v_cache.data_ptr<scalar_t>(), vs, append,
                          static_cast<Score>(score), static_cast<scalar_t>(scale), bias,
                          rel_bias ? rel_bias->size(1) : 1, static_cast<scalar_t>(silu_norm),
                          out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace rec2pm
