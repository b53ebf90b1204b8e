// Checks every `_C` entry point makes of its raw inputs before the kernels read and write
// through pointers.  The Python wrappers (rec2pm_kernels/validation.py) check more and with
// friendlier words; these make a direct call from Python or C++ an error, never a write past
// a buffer.  Each is O(batch) or O(weights), nothing per token.
#pragma once

#include <torch/extension.h>

#include <optional>

namespace rec2pm {

// `cu` (batch + 1 offsets) starts at 0, never decreases and ends at `rows`.
inline void check_offsets(const int64_t* cu, int64_t batch, int64_t rows, const char* name) {
  TORCH_CHECK(batch >= 0, name, " must hold batch + 1 >= 1 offsets");
  TORCH_CHECK(cu[0] == 0 && cu[batch] == rows, name, " must start at 0 and end at the ", rows, " rows, got ", cu[0],
              " and ", cu[batch]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], name, " must not decrease, got ", cu[b], " then ", cu[b + 1]);
  }
}

// A relative-bias table as the kernels index it: one row per head, at least one bucket.
inline void check_bias_table(const std::optional<torch::Tensor>& table, int64_t heads, const char* name) {
  if (!table) return;
  TORCH_CHECK(table->dim() == 2 && table->size(0) == heads && table->size(1) >= 1, name, " must be (heads = ", heads,
              ", buckets >= 1), got ", table->sizes());
}

// The codes of rec2pm_kernels.patterns.SCORES (Score).
inline void check_score_code(int64_t score) {
  TORCH_CHECK(score == 0 || score == 1, "score must be 0 (softmax) or 1 (silu), got ", score);
}

// The codes of rec2pm_kernels.patterns (Pattern, Score); an interleaved pattern divides by
// segment_len + num_memory_tokens.
inline void check_pattern_codes(int64_t pattern, int64_t score, int64_t segment_len, int64_t num_memory_tokens) {
  TORCH_CHECK(pattern >= 0 && pattern <= 3, "pattern must be a code 0..3 (causal, global, kv_memory_overwrite, ",
              "kv_memory_append), got ", pattern);
  check_score_code(score);
  TORCH_CHECK(pattern == 0 || (segment_len >= 1 && num_memory_tokens >= 0), "an interleaved pattern needs ",
              "segment_len >= 1 and num_memory_tokens >= 0, got ", segment_len, " and ", num_memory_tokens);
}

// `t` has exactly `shape`.
inline void check_shape(const torch::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

}  // namespace rec2pm
