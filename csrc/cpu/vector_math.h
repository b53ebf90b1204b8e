// Vector-friendly math shared by the CPU kernels (attention, the fused decoder step):
// reductions in a fixed order that the compiler can still vectorise, a vectorisable exp,
// and the per-instruction-set clones the hot loops are compiled as.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace rec2pm {

// Compiled once per instruction set, chosen at load time by the CPU's features: the loops
// over keys then use the widest vectors the machine has (results are bit-identical on one
// machine; across machines the instruction set, and so the rounding of fused multiply-adds,
// may differ).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define REC2PM_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define REC2PM_VECTOR_CLONES
#endif

// vector_exp's constants: ln 2 in two parts (r = x - k ln2_high + k ln2_low), the Cephes
// polynomial from its highest term, and the range outside which arguments are clamped.
// causal_lanes.cpp's AVX-512 build uses them too.
constexpr float kExpLog2e = 1.44269504088896341f, kExpLn2High = 0.693359375f, kExpLn2Low = 2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr float kExpLowest = -87.0f, kExpHighest = 88.0f;

// exp for fp32 without a library call, so that loops over keys vectorise (a call to expf
// per score cost more than the dot products): x = k ln 2 + r with |r| <= ln 2 / 2, then
// 2^k * p(r) with the Cephes polynomial, about 1 ulp.  Arguments below -87 give 0.  V is
// float or a GCC vector of floats (IntV: float's or the vector's int32 counterpart); the
// result goes to `out`, as a vector returned by value would change its ABI with each clone.
template <typename V, typename IntV>
__attribute__((always_inline)) inline void exp_of(const V& in, V& out) {
  const V low = V{} + kExpLowest, high = V{} + kExpHighest;
  const V x = in < low ? low : (in > high ? high : in);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const V k = (x * kExpLog2e + shifter) - shifter;
  const V r = (x - k * kExpLn2High) + k * kExpLn2Low;
  V p = V{} + kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpPoly[i];
  p = p * r * r + r + 1.0f;
  IntV bits;
  if constexpr (std::is_same_v<V, float>) {
    bits = (static_cast<int32_t>(k) + 127) << 23;
  } else {
    bits = (__builtin_convertvector(k, IntV) + 127) << 23;
  }
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  out = x <= low ? V{} : p * scale;
}

__attribute__((always_inline)) inline float vector_exp(float x) {
  float out;
  exp_of<float, int32_t>(x, out);
  return out;
}
inline double vector_exp(double x) { return std::exp(x); }

// Reductions with kLanes independent partial results: a fixed summation order (so results
// do not depend on the machine or the thread count) that the compiler can still vectorise,
// which a single running sum forbids without -ffast-math.
constexpr int64_t kLanes = 8;

template <typename T>
__attribute__((always_inline)) inline T lane_sum(const T* a, int64_t n) {
  T lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l];
  }
  for (; j < n; ++j) lanes[0] += a[j];
  T total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename T>
__attribute__((always_inline)) inline T lane_max(const T* a, int64_t n) {
  T lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = a[j + l] > lanes[l] ? a[j + l] : lanes[l];
  }
  for (; j < n; ++j) lanes[0] = a[j] > lanes[0] ? a[j] : lanes[0];
  T top = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) top = lanes[l] > top ? lanes[l] : top;
  return top;
}

// sum_j a[j] * b[j] with kLanes partial sums, like lane_sum.
template <typename T>
__attribute__((always_inline)) inline T lane_dot(const T* a, const T* b, int64_t n) {
  T lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * b[j + l];
  }
  for (; j < n; ++j) lanes[0] += a[j] * b[j];
  T total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// The score of one head, sum_d q[d] * k[d * k_stride], in one fixed order whether it is
// computed head by head or for several heads at once (head_dots), so that the cached
// step's two passes give the same bits.  A head dim that is a multiple of kDotLanes sums in
// a vector of that many lanes (lane l adds q[8c + l] * k[8c + l] over the chunks c in
// order), whose lanes then add as the tree ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7));
// other dims keep one running sum.  Both functions take their lane sums from one function
// (lane_products), so the compiler fuses each multiply and add into one rounding (or not)
// alike: a scalar loop against a vector one could differ in that, and so in the last bit.
constexpr int64_t kDotLanes = 8;

// sum = the lane products of one head: lane l adds q[8c + l] * k[(8c + l) * k_stride] over
// the chunks c in order.  head_dot and head_dots both reduce these, so their bits match by
// construction.  The vector is passed by reference: returned by value, its ABI would change
// with the instruction set of each clone (-Wpsabi).
template <typename T, typename Lanes>
__attribute__((always_inline)) inline void lane_products(const T* q, const T* k, int64_t k_stride, int64_t dim,
                                                         Lanes& sum) {
  sum = Lanes{};
  for (int64_t c = 0; c < dim; c += kDotLanes) {
    Lanes a, b;
    std::memcpy(&a, q + c, sizeof(Lanes));
    if (k_stride == 1) {
      std::memcpy(&b, k + c, sizeof(Lanes));
    } else {
      for (int64_t i = 0; i < kDotLanes; ++i) b[i] = k[(c + i) * k_stride];
    }
    sum += a * b;
  }
}

template <typename T>
__attribute__((always_inline)) inline T head_dot(const T* q, const T* k, int64_t k_stride, int64_t dim) {
  if (dim % kDotLanes != 0) {
    T z = 0;
    for (int64_t d = 0; d < dim; ++d) z += q[d] * k[d * k_stride];
    return z;
  }
  typedef T Lanes __attribute__((vector_size(kDotLanes * sizeof(T))));
  Lanes sum;
  lane_products(q, k, k_stride, dim, sum);
  return ((sum[0] + sum[1]) + (sum[2] + sum[3])) + ((sum[4] + sum[5]) + (sum[6] + sum[7]));
}

// head_dot for every head of one query row against one key slot, both (heads, dim) and
// contiguous, written to out[h * out_stride].  Four heads at a time, when dim is a multiple
// of kDotLanes, go through two rounds of pairwise lane sums across heads (the shuffles of
// a horizontal add), which add head_dot's tree exactly: a head's lanes added one by one
// were a chain of dependent scalar adds that took most of a serving step's attention time.
template <typename T>
__attribute__((always_inline)) inline void head_dots(const T* q, const T* k, int64_t heads, int64_t dim, T* out,
                                                     int64_t out_stride) {
  int64_t h = 0;
  if (dim % kDotLanes == 0) {
    typedef T Lanes __attribute__((vector_size(kDotLanes * sizeof(T))));
    // out = [a0 + a1, a2 + a3, b0 + b1, b2 + b3, a4 + a5, a6 + a7, b4 + b5, b6 + b7]
    const auto pair_sums = [](const Lanes& a, const Lanes& b, Lanes& out) {
      out = __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
            __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
    };
    Lanes head0, head1, head2, head3, low, high, halves;
    for (; h + 4 <= heads; h += 4) {
      lane_products(q + h * dim, k + h * dim, 1, dim, head0);
      lane_products(q + (h + 1) * dim, k + (h + 1) * dim, 1, dim, head1);
      lane_products(q + (h + 2) * dim, k + (h + 2) * dim, 1, dim, head2);
      lane_products(q + (h + 3) * dim, k + (h + 3) * dim, 1, dim, head3);
      pair_sums(head0, head1, low);
      pair_sums(head2, head3, high);
      // Element i < 4: head h + i's (l0 + l1) + (l2 + l3); element i + 4: its (l4 + l5) + (l6 + l7).
      pair_sums(low, high, halves);
      const Lanes sums = halves + __builtin_shufflevector(halves, halves, 4, 5, 6, 7, 0, 1, 2, 3);
      for (int64_t i = 0; i < 4; ++i) out[(h + i) * out_stride] = sums[i];
    }
  }
  for (; h < heads; ++h) out[h * out_stride] = head_dot(q + h * dim, k + h * dim, 1, dim);
}

}  // namespace rec2pm
