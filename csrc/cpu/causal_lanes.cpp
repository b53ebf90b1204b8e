// The kernel of causal_lanes.h, in two builds of one math: AVX-512 intrinsics where the CPU
// has them, and portable vector code (cloned per instruction set) elsewhere.  Per key and
// block: s = bias + sum_d (q_d * scale) k_d over the block's rows; SiLU then adds
// s / (1 + exp(-s)) * v_e key by key, softmax takes the keys a chunk at a time: the chunk's
// maximum rescales the running sum and weighted values once, then exp(s - max) * v_e.
// Each row's sums run key by key, in one fixed order (SiLU's in partial sums of kSumChunk
// keys).  The exp is vector_exp's polynomial (vector_math.h); on AVX-512 its 2^k comes from
// vscalefps, which needs no integer steps: 13 vector operations instead of 24.  16 HSTU
// layers of 1,000 rows (8 heads x 8, SiLU, one thread, a standalone timing loop): AVX-512
// build 31.7 ms; portable build 58 ms with AVX-512 code, 70 ms with AVX2 code.
#include "causal_lanes.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>

#include "vector_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define REC2PM_HAS_AVX512_BUILD 1
#include <immintrin.h>
#endif

namespace rec2pm {
namespace {

constexpr float kMinusInfinity = -std::numeric_limits<float>::infinity();
// Softmax keys per rescale of the running sums: the chunk's scores stay in registers.
constexpr int64_t kKeyChunk = 8;
// SiLU keys per partial sum: each row adds its weighted values in registers for this many
// keys, then into its running total.  One chain of a few hundred fp32 adds per row put the
// output of a 300-key row up to 1.24x past the error budget (2 of 120 random cases), where
// PyTorch's blocked matrix product sums in short chains; chains of at most 64 + n / 64 adds
// stay within it.  The chunks start at key 0, so a row's sums do not depend on its block.
constexpr int64_t kSumChunk = 64;

// The block's transposed queries, pre-scaled: tile[d][i] = q_{r0+i, d} * scale (zero past
// the sequence).
template <int64_t kDim>
__attribute__((always_inline)) inline void load_query_tile(const CausalLanesHead& p, int64_t r0, int64_t rows,
                                                           float (&tile)[kDim][kRowLanes]) {
  for (int64_t d = 0; d < kDim; ++d) std::fill(tile[d], tile[d] + kRowLanes, 0.0f);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t d = 0; d < kDim; ++d) tile[d][i] = p.q[(r0 + i - p.first_query_row) * p.q_stride + d] * p.scale;
  }
}

template <int64_t kDim>
__attribute__((always_inline)) inline void store_rows(const CausalLanesHead& p, int64_t r0, int64_t rows,
                                                      const float (&tile)[kDim][kRowLanes]) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t d = 0; d < kDim; ++d) p.out[(r0 + i - p.first_query_row) * p.out_stride + d] = tile[d][i];
  }
}

// ---- Portable build: GCC vector types of kPortableLanes rows, compiled per instruction set. ----
// Eight lanes, one AVX2 register: vectors of 16 lanes, two registers each, ran 5x slower
// under AVX2 (too few registers for the block's queries and sums, and split compares).
constexpr int64_t kPortableLanes = 8;
typedef float Lanes __attribute__((vector_size(kPortableLanes * sizeof(float))));
typedef int32_t IntLanes __attribute__((vector_size(kPortableLanes * sizeof(int32_t))));

// vector_exp lane by lane (-inf gives 0).
__attribute__((always_inline)) inline void exp_lanes(const Lanes& in, Lanes& out) { exp_of<Lanes, IntLanes>(in, out); }

// Scores of key j for rows r0 + lane: bias, then the dot in order of the dims.
template <int64_t kDim>
__attribute__((always_inline)) inline void key_scores(const CausalLanesHead& p, const Lanes (&qt)[kDim], int64_t r0,
                                                      int64_t j, Lanes& s) {
  s = Lanes{};
  if (p.bias_run != nullptr) std::memcpy(&s, p.bias_run + (r0 - j + kRowLanes), sizeof(s));
  const float* key = p.keys + j * kDim;
#pragma GCC unroll 16
  for (int64_t d = 0; d < kDim; ++d) s += qt[d] * key[d];
}

template <int64_t kDim>
__attribute__((always_inline)) inline void add_values(const CausalLanesHead& p, int64_t j, const Lanes& w,
                                                      Lanes (&acc)[kDim]) {
  const float* value = p.values + j * kDim;
#pragma GCC unroll 16
  for (int64_t d = 0; d < kDim; ++d) acc[d] += w * value[d];
}

// add_values in the lanes that see key j only: the others keep their sums as they are (a
// zero weight times an infinite value would be NaN, and a later key must not touch a row).
template <int64_t kDim>
__attribute__((always_inline)) inline void add_values_seen(const CausalLanesHead& p, int64_t j, const Lanes& w,
                                                           const IntLanes& seen, Lanes (&acc)[kDim]) {
  const float* value = p.values + j * kDim;
#pragma GCC unroll 16
  for (int64_t d = 0; d < kDim; ++d) acc[d] = seen ? acc[d] + w * value[d] : acc[d];
}

// Rows [r0, r0 + rows) (rows <= kPortableLanes), whose queries are the tile's columns from
// `first` on; their outputs replace those columns.
template <int64_t kDim, Score kScore>
__attribute__((always_inline)) inline void attend_lanes_portable(const CausalLanesHead& p, int64_t r0, int64_t first,
                                                                 int64_t rows, float (&tile)[kDim][kRowLanes]) {
  Lanes qt[kDim], acc[kDim], lane;
  for (int64_t d = 0; d < kDim; ++d) {
    std::memcpy(&qt[d], tile[d] + first, sizeof(Lanes));
    acc[d] = Lanes{};
  }
  for (int64_t i = 0; i < kPortableLanes; ++i) lane[i] = static_cast<float>(i);
  // Row r0 + i sees keys 0..r0 + i: keys up to r0 are visible to every row, later ones to
  // the lanes at or after them (lanes past the sequence compute and are not written).
  const int64_t keys = r0 + rows;
  Lanes finish;
  if constexpr (kScore == Score::kSilu) {
    Lanes total[kDim] = {};
    for (int64_t c = 0; c < keys; c += kSumChunk) {
      for (int64_t j = c; j < std::min(keys, c + kSumChunk); ++j) {
        Lanes s, e;
        key_scores<kDim>(p, qt, r0, j, s);
        exp_lanes(-s, e);
        const Lanes w = s / (1.0f + e);
        if (j > r0) {
          add_values_seen<kDim>(p, j, w, lane >= static_cast<float>(j - r0), acc);
        } else {
          add_values<kDim>(p, j, w, acc);
        }
      }
      for (int64_t d = 0; d < kDim; ++d) {
        total[d] += acc[d];
        acc[d] = Lanes{};
      }
    }
    for (int64_t d = 0; d < kDim; ++d) acc[d] = total[d];
    finish = Lanes{} + p.inv_norm;
  } else {
    Lanes top = Lanes{} + kMinusInfinity, sum = Lanes{};
    for (int64_t c = 0; c < keys; c += kKeyChunk) {
      const int64_t n = std::min(kKeyChunk, keys - c);
      Lanes s[kKeyChunk], chunk_top = top;
      for (int64_t i = 0; i < n; ++i) {
        key_scores<kDim>(p, qt, r0, c + i, s[i]);
        if (c + i > r0) s[i] = lane >= static_cast<float>(c + i - r0) ? s[i] : Lanes{} + kMinusInfinity;
        chunk_top = s[i] > chunk_top ? s[i] : chunk_top;
      }
      Lanes rescale;  // exp(-inf) = 0 on the first chunk: key 0 is visible to every row
      exp_lanes(top - chunk_top, rescale);
      top = chunk_top;
      sum *= rescale;
      for (int64_t d = 0; d < kDim; ++d) acc[d] *= rescale;
      for (int64_t i = 0; i < n; ++i) {
        Lanes w;
        exp_lanes(s[i] - top, w);
        sum += w;
        if (c + i > r0) {
          add_values_seen<kDim>(p, c + i, w, lane >= static_cast<float>(c + i - r0), acc);
        } else {
          add_values<kDim>(p, c + i, w, acc);
        }
      }
    }
    finish = 1.0f / sum;
  }
  for (int64_t d = 0; d < kDim; ++d) {
    acc[d] *= finish;
    std::memcpy(tile[d] + first, &acc[d], sizeof(Lanes));
  }
}

template <int64_t kDim, Score kScore>
__attribute__((always_inline)) inline void attend_block_portable(const CausalLanesHead& p, int64_t r0) {
  const int64_t rows = std::min(kRowLanes, p.length - r0);
  float tile[kDim][kRowLanes];
  load_query_tile<kDim>(p, r0, rows, tile);
  for (int64_t first = 0; first < rows; first += kPortableLanes) {
    attend_lanes_portable<kDim, kScore>(p, r0 + first, first, std::min(kPortableLanes, rows - first), tile);
  }
  store_rows<kDim>(p, r0, rows, tile);
}

REC2PM_VECTOR_CLONES void attend_block_portable_f32(const CausalLanesHead& head, int64_t first_row) {
  const bool silu = head.score == Score::kSilu;
  if (head.dim == 8) {
    silu ? attend_block_portable<8, Score::kSilu>(head, first_row)
         : attend_block_portable<8, Score::kSoftmax>(head, first_row);
  } else {
    silu ? attend_block_portable<16, Score::kSilu>(head, first_row)
         : attend_block_portable<16, Score::kSoftmax>(head, first_row);
  }
}

// ---- AVX-512 build: the same steps in intrinsics. ----
#ifdef REC2PM_HAS_AVX512_BUILD
#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12's intrinsics headers start some results from _mm512_undefined_ps(), which it then
// reports as maybe uninitialised.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// 2^k p(r) for r = x - k ln 2 (ln 2 in two parts, the first subtracted by the caller), in
// the lanes of `keep` (0 in the others).
__attribute__((always_inline)) inline __m512 exp_from_512(__m512 k, __m512 r, __mmask16 keep = 0xFFFF) {
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(kExpLn2Low), r);
  __m512 poly = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(kExpPoly[i]));
  poly = _mm512_fmadd_ps(_mm512_mul_ps(poly, r), r, r);
  return _mm512_maskz_scalef_ps(keep, _mm512_add_ps(poly, _mm512_set1_ps(1.0f)), k);
}

__attribute__((always_inline)) inline __m512 round_512(__m512 x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// exp(x) for softmax, 0 below -87 as vector_exp: -inf (a masked key) gives 0, and no
// result is subnormal (raising arguments to -104 instead, where fp32's exp is 0, made the
// weighted sums multiply subnormals and a 1,000-row head 17% slower).  The comparison is
// unordered-true, so a NaN stays NaN.
__attribute__((always_inline)) inline __m512 exp_512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLowest), _CMP_NLT_UQ);
  const __m512 k = round_512(_mm512_mul_ps(x, _mm512_set1_ps(kExpLog2e)));
  return exp_from_512(k, _mm512_fnmadd_ps(k, _mm512_set1_ps(kExpLn2High), x), keep);
}

// exp(-s) for SiLU, the negation folded into the first steps (s is finite: a score of finite
// inputs; vscalefps takes a huge k to 0 or infinity, and s / (1 + e) to s or -0).
__attribute__((always_inline)) inline __m512 exp_negated_512(__m512 s) {
  const __m512 k = round_512(_mm512_mul_ps(s, _mm512_set1_ps(-kExpLog2e)));
  return exp_from_512(k, _mm512_fnmsub_ps(k, _mm512_set1_ps(kExpLn2High), s));  // -s - k ln2_high
}

template <int64_t kDim>
__attribute__((always_inline)) inline __m512 key_scores_512(const CausalLanesHead& p, const __m512 (&qt)[kDim],
                                                            int64_t r0, int64_t j) {
  __m512 s = p.bias_run != nullptr ? _mm512_loadu_ps(p.bias_run + (r0 - j + kRowLanes)) : _mm512_setzero_ps();
  const float* key = p.keys + j * kDim;
#pragma GCC unroll 16
  for (int64_t d = 0; d < kDim; ++d) s = _mm512_fmadd_ps(qt[d], _mm512_set1_ps(key[d]), s);
  return s;
}

template <int64_t kDim>
__attribute__((always_inline)) inline void add_values_512(const CausalLanesHead& p, int64_t j, __m512 w,
                                                          __m512 (&acc)[kDim]) {
  const float* value = p.values + j * kDim;
#pragma GCC unroll 16
  for (int64_t d = 0; d < kDim; ++d) acc[d] = _mm512_fmadd_ps(w, _mm512_set1_ps(value[d]), acc[d]);
}

// add_values_512 in the lanes of `seen` only (the portable build's add_values_seen).
template <int64_t kDim>
__attribute__((always_inline)) inline void add_values_seen_512(const CausalLanesHead& p, int64_t j, __m512 w,
                                                               __mmask16 seen, __m512 (&acc)[kDim]) {
  const float* value = p.values + j * kDim;
#pragma GCC unroll 16
  for (int64_t d = 0; d < kDim; ++d) acc[d] = _mm512_mask3_fmadd_ps(w, _mm512_set1_ps(value[d]), acc[d], seen);
}

// Lanes i of rows r0 + i that see key j > r0.
inline __mmask16 rows_seeing(int64_t r0, int64_t j) { return static_cast<__mmask16>(0xFFFFu << (j - r0)); }

template <int64_t kDim, Score kScore>
__attribute__((always_inline)) inline void attend_block_avx512(const CausalLanesHead& p, int64_t r0) {
  const int64_t rows = std::min(kRowLanes, p.length - r0);
  alignas(64) float tile[kDim][kRowLanes];
  load_query_tile<kDim>(p, r0, rows, tile);
  __m512 qt[kDim], acc[kDim];
  for (int64_t d = 0; d < kDim; ++d) {
    qt[d] = _mm512_load_ps(tile[d]);
    acc[d] = _mm512_setzero_ps();
  }
  const int64_t keys = r0 + rows;
  __m512 finish;
  if constexpr (kScore == Score::kSilu) {
    const __m512 one = _mm512_set1_ps(1.0f);
    // The running totals live in the tile (its queries are in registers by now).
    for (int64_t d = 0; d < kDim; ++d) _mm512_store_ps(tile[d], _mm512_setzero_ps());
    for (int64_t c = 0; c < keys; c += kSumChunk) {
      for (int64_t j = c; j < std::min(keys, c + kSumChunk); ++j) {
        const __m512 s = key_scores_512<kDim>(p, qt, r0, j);
        const __m512 e = exp_negated_512(s);
        const __m512 w = _mm512_div_ps(s, _mm512_add_ps(one, e));
        if (j > r0) {
          add_values_seen_512<kDim>(p, j, w, rows_seeing(r0, j), acc);
        } else {
          add_values_512<kDim>(p, j, w, acc);
        }
      }
      for (int64_t d = 0; d < kDim; ++d) {
        _mm512_store_ps(tile[d], _mm512_add_ps(_mm512_load_ps(tile[d]), acc[d]));
        acc[d] = _mm512_setzero_ps();
      }
    }
    for (int64_t d = 0; d < kDim; ++d) acc[d] = _mm512_load_ps(tile[d]);
    finish = _mm512_set1_ps(p.inv_norm);
  } else {
    const __m512 minus_infinity = _mm512_set1_ps(kMinusInfinity);
    __m512 top = minus_infinity, sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < keys; c += kKeyChunk) {
      const int64_t n = std::min(kKeyChunk, keys - c);
      __m512 s[kKeyChunk], chunk_top = top;
#pragma GCC unroll 8
      for (int64_t i = 0; i < kKeyChunk; ++i) {
        if (i < n) {
          s[i] = key_scores_512<kDim>(p, qt, r0, c + i);
          if (c + i > r0) s[i] = _mm512_mask_mov_ps(minus_infinity, rows_seeing(r0, c + i), s[i]);
          chunk_top = _mm512_max_ps(chunk_top, s[i]);
        }
      }
      const __m512 rescale = exp_512(_mm512_sub_ps(top, chunk_top));  // 0 on the first chunk
      top = chunk_top;
      sum = _mm512_mul_ps(sum, rescale);
      for (int64_t d = 0; d < kDim; ++d) acc[d] = _mm512_mul_ps(acc[d], rescale);
#pragma GCC unroll 8
      for (int64_t i = 0; i < kKeyChunk; ++i) {
        if (i < n) {
          const __m512 w = exp_512(_mm512_sub_ps(s[i], top));
          sum = _mm512_add_ps(sum, w);
          if (c + i > r0) {
            add_values_seen_512<kDim>(p, c + i, w, rows_seeing(r0, c + i), acc);
          } else {
            add_values_512<kDim>(p, c + i, w, acc);
          }
        }
      }
    }
    finish = _mm512_div_ps(_mm512_set1_ps(1.0f), sum);
  }
  for (int64_t d = 0; d < kDim; ++d) _mm512_store_ps(tile[d], _mm512_mul_ps(acc[d], finish));
  store_rows<kDim>(p, r0, rows, tile);
}

void attend_block_avx512_f32(const CausalLanesHead& head, int64_t first_row) {
  const bool silu = head.score == Score::kSilu;
  if (head.dim == 8) {
    silu ? attend_block_avx512<8, Score::kSilu>(head, first_row)
         : attend_block_avx512<8, Score::kSoftmax>(head, first_row);
  } else {
    silu ? attend_block_avx512<16, Score::kSilu>(head, first_row)
         : attend_block_avx512<16, Score::kSoftmax>(head, first_row);
  }
}

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

std::atomic<bool> portable_forced{false};

}  // namespace

bool causal_lanes_support(int64_t dim, int64_t dim_v) { return dim == dim_v && (dim == 8 || dim == 16); }

bool force_portable_causal_lanes(bool portable) { return portable_forced.exchange(portable); }

bool causal_lanes_use_avx512() {
#ifdef REC2PM_HAS_AVX512_BUILD
  static const bool has = __builtin_cpu_supports("avx512f");
  return has && !portable_forced.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

void causal_lanes_block_f32(const CausalLanesHead& head, int64_t first_row) {
#ifdef REC2PM_HAS_AVX512_BUILD
  if (causal_lanes_use_avx512()) return attend_block_avx512_f32(head, first_row);
#endif
  attend_block_portable_f32(head, first_row);
}

}  // namespace rec2pm
