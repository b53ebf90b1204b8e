// Causal attention with the query rows in the lanes of a vector: 16 rows of one head
// against one key at a time, for SiLU (HSTU's pointwise attention) and softmax scores.
// The row-at-a-time kernel (attention_cpu.cpp) vectorises across keys, so each of a row's
// keys costs a load of its values and a multiply-add as wide as the head dim (half a
// register at head dim 8); here each key is read once for 16 rows, its dims broadcast into
// full-width multiply-adds, and the weights of 16 scores come at once.  An HSTU forward
// over 1,000 events spent ~80% of its time in the row kernel.
#pragma once

#include <cstdint>

#include "rec2pm/attention_math.h"

namespace rec2pm {

// Query rows per block: one AVX-512 vector of fp32.
constexpr int64_t kRowLanes = 16;

// One head of one sequence.  Row r's query is q + (r - first_query_row) * q_stride (dim
// values; first_query_row is 0 when q holds every row, and a cached step's filled slots when
// it holds only the new rows); keys (length, dim) and values (length, dim) of this head,
// contiguous; row r's output goes to out + (r - first_query_row) * out_stride.  bias_run, when not null, is the head's relative bias
// laid out so that key j of row r reads bias_run[r - j + kRowLanes]: entry x + kRowLanes
// holds table[clamp(x, 0, buckets - 1)] for x in [-kRowLanes, length + kRowLanes).
struct CausalLanesHead {
  const float* q;
  int64_t q_stride;
  const float* keys;
  const float* values;
  const float* bias_run;
  float* out;
  int64_t out_stride;
  int64_t length, dim;
  Score score;
  float scale;
  float inv_norm;  // SiLU's 1 / silu_norm
  int64_t first_query_row = 0;
};

// The head dims the kernel is compiled for (dim == dim_v); others take the row kernel.
bool causal_lanes_support(int64_t dim, int64_t dim_v);

// Rows [first_row, min(first_row + kRowLanes, length)) of the head: row r attends to keys
// 0..r with s_j = q_r . k_j * scale + bias(r - j); SiLU weighs silu(s_j) / silu_norm,
// softmax exp(s_j) normalised over the row (running maximum and sum, chunk by chunk of keys).
void causal_lanes_block_f32(const CausalLanesHead& head, int64_t first_row);

// The kernel has an AVX-512 build, taken where the CPU has it, and a portable one.  Forcing
// the portable build lets tests compare the two on one machine; returns the previous setting.
bool force_portable_causal_lanes(bool portable);
// Whether causal_lanes_block_f32 takes its AVX-512 build now.
bool causal_lanes_use_avx512();

}  // namespace rec2pm
