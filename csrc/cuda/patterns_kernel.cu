// CUDA twin of visibility_mask_cpu: the same rule from patterns.h, one thread per entry.
// Free of torch headers so that it compiles standalone with nvcc (tests/test_build.py).
#include <cstdint>

#include "rec2pm/patterns.h"

namespace rec2pm {

__global__ void visibility_mask_kernel(bool* out, int64_t n, int32_t pattern, int64_t S, int64_t C) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * n) return;
  out[i] = visible(static_cast<Pattern>(pattern), i / n, i % n, S, C);
}

cudaError_t launch_visibility_mask(bool* out, int64_t n, int32_t pattern, int64_t S, int64_t C,
                                   cudaStream_t stream) {
  const int64_t entries = n * n;
  if (entries == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned int>((entries + kThreads - 1) / kThreads);
  visibility_mask_kernel<<<blocks, kThreads, 0, stream>>>(out, n, pattern, S, C);
  return cudaGetLastError();
}

}  // namespace rec2pm
