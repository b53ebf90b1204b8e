// Vector-friendly math shared by the CPU kernels (attention, the fused decoder step):
// reductions in a fixed order that the compiler can still vectorise, a vectorisable exp,
// and the per-instruction-set clones the hot loops are compiled as.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

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

// exp for fp32 without a library call, so that loops over keys vectorise (a call to expf
// per score cost more than the dot products): x = k ln 2 + r with |r| <= ln 2 / 2, then
// 2^k * p(r) with the Cephes polynomial, about 1 ulp.  Arguments below -87 give 0.
__attribute__((always_inline)) inline float vector_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float k = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x <= -87.0f ? 0.0f : p * scale;
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

}  // namespace rec2pm
