// Attention over a row's keys split into chunks (split-K, as flash-decoding does): each
// chunk gives a partial result, and partials merge in chunk order.
//
// A partial holds the chunk's largest score m (softmax), the sum of its weights
// exp(z - m) and acc = sum of weight * value.  SiLU weights need no maximum (m stays 0) and
// partials simply add.  The CPU cached step (long caches at small batches) and the CUDA
// kernels both merge with these functions, so the rule is tested on the CPU.  Chunks have
// a fixed number of keys, never one that depends on the thread count, so results do not
// depend on it either.
#pragma once

#include <cmath>
#include <cstdint>

#include "rec2pm/attention_math.h"

namespace rec2pm {

// Chunks of `chunk` keys that cover `keys` keys (at least one, so a row always has a result).
REC2PM_HD int64_t chunk_count(int64_t keys, int64_t chunk) { return keys <= chunk ? 1 : (keys + chunk - 1) / chunk; }

// Chunk c of `keys` keys split into chunk_count(keys, chunk) chunks of equal length (the
// last may be shorter): [*begin, *end).  Even chunks keep the tasks of one row balanced.
REC2PM_HD void even_chunk(int64_t keys, int64_t chunk, int64_t c, int64_t* begin, int64_t* end) {
  const int64_t chunks = chunk_count(keys, chunk);
  const int64_t length = (keys + chunks - 1) / chunks;
  *begin = c * length < keys ? c * length : keys;
  *end = *begin + length < keys ? *begin + length : keys;
}

REC2PM_HD float exp_of(float x) { return expf(x); }
REC2PM_HD double exp_of(double x) { return exp(x); }

// What the first of two partials (the running one) and the second are multiplied by
// before they add, and the merged maximum.
template <typename T>
struct MergeScales {
  T first, second, max;
};

// Softmax: both are rescaled to the larger maximum; a partial with no keys has max -inf
// and sum 0 and gets weight 0 (never exp(-inf + inf)).  SiLU: plain addition.
template <typename T>
REC2PM_HD MergeScales<T> merge_scales(Score score, T running_max, T chunk_max) {
  if (score == Score::kSilu) return {T(1), T(1), T(0)};
  const T top = running_max > chunk_max ? running_max : chunk_max;
  if (top == -INFINITY) return {T(0), T(0), top};
  return {exp_of(running_max - top), exp_of(chunk_max - top), top};
}

// The factor the merged acc is multiplied by: 1 / sum for softmax (0 for a row without
// keys), 1 for SiLU, whose weights already carry 1 / silu_norm.
template <typename T>
REC2PM_HD T finish_scale(Score score, T sum) {
  if (score == Score::kSilu) return T(1);
  return sum > T(0) ? T(1) / sum : T(0);
}

}  // namespace rec2pm
