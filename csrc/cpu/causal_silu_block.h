// Causal SiLU attention (HSTU's pointwise attention) with the query rows in the lanes of a
// vector: 16 rows of one head against one key at a time.  The row-at-a-time kernel
// (attention_cpu.cpp) vectorises across keys, so each of a row's keys costs a load of its
// values and a multiply-add half as wide as a register (head dim 8); here each key is
// read once for 16 rows, its dims broadcast into full-width multiply-adds, and SiLU runs
// on 16 scores at once.  An HSTU forward over 1,000 events spent ~80% of its time in the
// row kernel.
#pragma once

#include <cstdint>

namespace rec2pm {

// Query rows per block: one AVX-512 vector of fp32.
constexpr int64_t kRowLanes = 16;

// One head of one sequence.  Row r's query is q + r * q_stride (dim values, already in the
// sequence); keys (length, dim) and values (length, dim_v) of this head, contiguous; row
// r's output goes to out + r * out_stride.  bias_run, when not null, is the head's relative
// bias laid out so that key j of row r reads bias_run[r - j + kRowLanes]: entry
// x + kRowLanes holds table[clamp(x, 0, buckets - 1)] for x in [-kRowLanes, length).
struct CausalSiluHead {
  const float* q;
  int64_t q_stride;
  const float* keys;
  const float* values;
  const float* bias_run;
  float* out;
  int64_t out_stride;
  int64_t length, dim, dim_v;
  float scale, inv_norm;
};

// The head dims the block kernel is compiled for (dim == dim_v); others take the row kernel.
bool causal_silu_block_supports(int64_t dim, int64_t dim_v);

// Rows [first_row, min(first_row + kRowLanes, length)) of the head: each row r gets
// sum_{j <= r} silu(q_r . k_j * scale + bias(r - j)) * inv_norm * v_j.
void causal_silu_block_f32(const CausalSiluHead& head, int64_t first_row);

// The kernel has an AVX-512 build, taken where the CPU has it, and a portable one.  Forcing
// the portable build lets tests compare the two on one machine; returns the previous setting.
bool force_portable_causal_silu(bool portable);
// Whether causal_silu_block_f32 takes its AVX-512 build now.
bool causal_silu_block_uses_avx512();

}  // namespace rec2pm
