// The Rec2PM attention patterns as position rules, shared by CPU and CUDA code.
//
// Mirrors rec2pm_kernels/patterns.py exactly (tests/test_patterns.py compares them):
// with S = segment_len and C = num_memory_tokens, token p of a sequence is a write token
// iff p % (S + C) >= S, and belongs to unit p / (S + C).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define REC2PM_HD __host__ __device__ __forceinline__
#else
#define REC2PM_HD inline
#endif

namespace rec2pm {

// Codes in the order of rec2pm_kernels.patterns.PATTERNS.
enum class Pattern : int32_t { kCausal = 0, kGlobal = 1, kKvMemoryOverwrite = 2, kKvMemoryAppend = 3 };

REC2PM_HD bool is_write_token(int64_t p, int64_t S, int64_t C) { return p % (S + C) >= S; }

REC2PM_HD int64_t unit_of(int64_t p, int64_t S, int64_t C) { return p / (S + C); }

// May query position `row` see key position `col` of the same sequence?
REC2PM_HD bool visible(Pattern pattern, int64_t row, int64_t col, int64_t S, int64_t C) {
  if (col > row) return false;
  if (pattern == Pattern::kCausal) return true;
  const int64_t row_unit = unit_of(row, S, C);
  const int64_t col_unit = unit_of(col, S, C);
  const bool col_is_write = is_write_token(col, S, C);
  switch (pattern) {
    case Pattern::kGlobal:
      return !col_is_write || col_unit == row_unit;
    case Pattern::kKvMemoryOverwrite:
      return col_unit == row_unit || (col_is_write && col_unit == row_unit - 1);
    case Pattern::kKvMemoryAppend:
      return col_unit == row_unit || (col_is_write && col_unit < row_unit);
    default:
      return false;
  }
}

// λ(p), the position the relative bias compares: p, except under `global`, where items
// carry their history index and write token c of unit h carries (h + 1) * S + c.
REC2PM_HD int64_t bias_position(Pattern pattern, int64_t p, int64_t S, int64_t C) {
  return pattern == Pattern::kGlobal ? p - C * unit_of(p, S, C) : p;
}

// Bucket of the (heads, num_buckets) bias table for λ(row) - λ(col).
REC2PM_HD int64_t bias_bucket(int64_t lambda_row, int64_t lambda_col, int64_t num_buckets) {
  const int64_t d = lambda_row - lambda_col;
  return d < 0 ? 0 : (d > num_buckets - 1 ? num_buckets - 1 : d);
}

}  // namespace rec2pm
