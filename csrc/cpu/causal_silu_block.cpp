// The block kernel of causal_silu_block.h, in two builds of one math: AVX-512 intrinsics
// where the CPU has them, and portable vector code (cloned per instruction set) elsewhere.
// Per key and block: s = bias + sum_d (q_d * scale) k_d over the block's rows, e = exp(-s)
// by vector_exp's polynomial (vector_math.h), w = s / (1 + e), then acc_e += w v_e; each
// row's sum runs key by key.  On AVX-512, 2^k comes from vscalefps, which needs no clamps
// or integer steps: the exp costs 13 vector operations instead of 24.  16 HSTU layers of
// 1,000 rows (8 heads x 8, one thread, a standalone timing loop): AVX-512 build 31.7 ms;
// portable build 58 ms with AVX-512 code, 70 ms with AVX2 code.
#include "causal_silu_block.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#include "vector_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define REC2PM_HAS_AVX512_BUILD 1
#include <immintrin.h>
#endif

namespace rec2pm {
namespace {

// The constants of vector_exp: ln 2 in two parts, and its polynomial from the highest term.
constexpr float kLog2e = 1.44269504088896341f, kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// Row r0 + i of the block's transposed queries, pre-scaled: tile[d][i] = q_{r0+i, d} * scale
// (zero past the sequence).
template <int64_t kDim>
__attribute__((always_inline)) inline void load_query_tile(const CausalSiluHead& p, int64_t r0, int64_t rows,
                                                           float (&tile)[kDim][kRowLanes]) {
  for (int64_t d = 0; d < kDim; ++d) std::fill(tile[d], tile[d] + kRowLanes, 0.0f);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t d = 0; d < kDim; ++d) tile[d][i] = p.q[(r0 + i) * p.q_stride + d] * p.scale;
  }
}

template <int64_t kDim>
__attribute__((always_inline)) inline void store_rows(const CausalSiluHead& p, int64_t r0, int64_t rows,
                                                      const float (&tile)[kDim][kRowLanes]) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t d = 0; d < kDim; ++d) p.out[(r0 + i) * p.out_stride + d] = tile[d][i];
  }
}

// ---- Portable build: GCC vector types of kPortableLanes rows, compiled per instruction set. ----
// Eight lanes, one AVX2 register: vectors of 16 lanes, two registers each, ran 5x slower
// under AVX2 (too few registers for the block's queries and sums, and split compares).
constexpr int64_t kPortableLanes = 8;
typedef float Lanes __attribute__((vector_size(kPortableLanes * sizeof(float))));
typedef int32_t IntLanes __attribute__((vector_size(kPortableLanes * sizeof(int32_t))));

// vector_exp lane by lane: the same clamps, steps and constants.
__attribute__((always_inline)) inline void exp_lanes(const Lanes& in, Lanes& out) {
  const Lanes low = Lanes{} - 87.0f, high = Lanes{} + 88.0f;
  Lanes x = in < low ? low : in;
  x = x > high ? high : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const Lanes k = (x * kLog2e + shifter) - shifter;
  const Lanes r = (x - k * kLn2High) - k * kLn2Low;
  Lanes p = Lanes{} + kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpPoly[i];
  p = p * r * r + r + 1.0f;
  const IntLanes bits = (__builtin_convertvector(k, IntLanes) + 127) << 23;
  Lanes scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  out = x <= low ? Lanes{} : p * scale;
}

// Rows [r0, r0 + rows) of the block's query tile, from its row `first` on (rows <= 8).
template <int64_t kDim>
__attribute__((always_inline)) inline void attend_lanes_portable(const CausalSiluHead& p, int64_t r0, int64_t first,
                                                                 int64_t rows, float (&tile)[kDim][kRowLanes]) {
  Lanes qt[kDim], acc[kDim], lane;
  for (int64_t d = 0; d < kDim; ++d) {
    std::memcpy(&qt[d], tile[d] + first, sizeof(Lanes));
    acc[d] = Lanes{};
  }
  for (int64_t i = 0; i < kPortableLanes; ++i) lane[i] = static_cast<float>(i);
  // Row r0 + i sees keys 0..r0 + i: keys up to r0 are visible to every row, later ones to
  // the lanes at or after them (lanes past the sequence compute and are not written).
  for (int64_t j = 0; j < r0 + rows; ++j) {
    Lanes s = Lanes{};
    if (p.bias_run != nullptr) std::memcpy(&s, p.bias_run + (r0 - j + kRowLanes), sizeof(s));
    const float* key = p.keys + j * kDim;
#pragma GCC unroll 16
    for (int64_t d = 0; d < kDim; ++d) s += qt[d] * key[d];
    Lanes e;
    exp_lanes(-s, e);
    Lanes w = s / (1.0f + e);
    if (j > r0) w = lane >= static_cast<float>(j - r0) ? w : Lanes{};
    const float* value = p.values + j * kDim;
#pragma GCC unroll 16
    for (int64_t d = 0; d < kDim; ++d) acc[d] += w * value[d];
  }
  for (int64_t d = 0; d < kDim; ++d) {
    acc[d] *= p.inv_norm;
    std::memcpy(tile[d] + first, &acc[d], sizeof(Lanes));
  }
}

template <int64_t kDim>
__attribute__((always_inline)) inline void attend_block_portable(const CausalSiluHead& p, int64_t r0) {
  const int64_t rows = std::min(kRowLanes, p.length - r0);
  float tile[kDim][kRowLanes];
  load_query_tile<kDim>(p, r0, rows, tile);
  for (int64_t first = 0; first < rows; first += kPortableLanes) {
    attend_lanes_portable<kDim>(p, r0 + first, first, std::min(kPortableLanes, rows - first), tile);
  }
  store_rows<kDim>(p, r0, rows, tile);
}

REC2PM_VECTOR_CLONES void attend_block_portable_f32(const CausalSiluHead& head, int64_t first_row) {
  if (head.dim == 8) {
    attend_block_portable<8>(head, first_row);
  } else {
    attend_block_portable<16>(head, first_row);
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

template <int64_t kDim>
__attribute__((always_inline)) inline void attend_block_avx512(const CausalSiluHead& p, int64_t r0) {
  const int64_t rows = std::min(kRowLanes, p.length - r0);
  alignas(64) float tile[kDim][kRowLanes];
  load_query_tile<kDim>(p, r0, rows, tile);
  __m512 qt[kDim], acc[kDim];
  for (int64_t d = 0; d < kDim; ++d) {
    qt[d] = _mm512_load_ps(tile[d]);
    acc[d] = _mm512_setzero_ps();
  }
  const __m512 minus_log2e = _mm512_set1_ps(-kLog2e), ln2_high = _mm512_set1_ps(kLn2High),
               ln2_low = _mm512_set1_ps(kLn2Low), one = _mm512_set1_ps(1.0f);
  __m512 poly_terms[6];
  for (int i = 0; i < 6; ++i) poly_terms[i] = _mm512_set1_ps(kExpPoly[i]);
  for (int64_t j = 0; j < r0 + rows; ++j) {
    __m512 s = p.bias_run != nullptr ? _mm512_loadu_ps(p.bias_run + (r0 - j + kRowLanes)) : _mm512_setzero_ps();
    const float* key = p.keys + j * kDim;
#pragma GCC unroll 16
    for (int64_t d = 0; d < kDim; ++d) s = _mm512_fmadd_ps(qt[d], _mm512_set1_ps(key[d]), s);
    // e = exp(-s) = 2^k p(r), -s = k ln 2 + r.
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(s, minus_log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmsub_ps(k, ln2_high, s);  // -s - k ln2_high
    r = _mm512_fnmadd_ps(k, ln2_low, r);
    __m512 poly = poly_terms[0];
    for (int i = 1; i < 6; ++i) poly = _mm512_fmadd_ps(poly, r, poly_terms[i]);
    poly = _mm512_fmadd_ps(_mm512_mul_ps(poly, r), r, r);
    const __m512 e = _mm512_scalef_ps(_mm512_add_ps(poly, one), k);
    __m512 w = _mm512_div_ps(s, _mm512_add_ps(one, e));
    if (j > r0) w = _mm512_maskz_mov_ps(static_cast<__mmask16>(0xFFFFu << (j - r0)), w);
    const float* value = p.values + j * kDim;
#pragma GCC unroll 16
    for (int64_t d = 0; d < kDim; ++d) acc[d] = _mm512_fmadd_ps(w, _mm512_set1_ps(value[d]), acc[d]);
  }
  const __m512 inv_norm = _mm512_set1_ps(p.inv_norm);
  for (int64_t d = 0; d < kDim; ++d) _mm512_store_ps(tile[d], _mm512_mul_ps(acc[d], inv_norm));
  store_rows<kDim>(p, r0, rows, tile);
}

void attend_block_avx512_f32(const CausalSiluHead& head, int64_t first_row) {
  if (head.dim == 8) {
    attend_block_avx512<8>(head, first_row);
  } else {
    attend_block_avx512<16>(head, first_row);
  }
}

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

}  // namespace

bool causal_silu_block_supports(int64_t dim, int64_t dim_v) { return dim == dim_v && (dim == 8 || dim == 16); }

namespace {
std::atomic<bool> portable_forced{false};
}  // namespace

bool force_portable_causal_silu(bool portable) { return portable_forced.exchange(portable); }

bool causal_silu_block_uses_avx512() {
#ifdef REC2PM_HAS_AVX512_BUILD
  static const bool has = __builtin_cpu_supports("avx512f");
  return has && !portable_forced.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

void causal_silu_block_f32(const CausalSiluHead& head, int64_t first_row) {
#ifdef REC2PM_HAS_AVX512_BUILD
  if (causal_silu_block_uses_avx512()) return attend_block_avx512_f32(head, first_row);
#endif
  attend_block_portable_f32(head, first_row);
}

}  // namespace rec2pm
