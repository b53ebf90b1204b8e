// Torch-facing wrapper of the CUDA mask kernel (built only with CUDA).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "../cpu/input_checks.h"
#include "../cpu/patterns_ops.h"

namespace rec2pm {

cudaError_t launch_visibility_mask(bool* out, int64_t n, int32_t pattern, int64_t S, int64_t C,
                                   cudaStream_t stream);

torch::Tensor visibility_mask_cuda(int64_t pattern, int64_t n, int64_t S, int64_t C, int64_t device_index) {
  check_pattern_codes(pattern, 0, S, C);
  TORCH_CHECK(n >= 0, "n must be >= 0, got ", n);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  auto mask = torch::empty({n, n}, torch::dtype(torch::kBool).device(torch::kCUDA, device_index));
  const cudaError_t err = launch_visibility_mask(mask.data_ptr<bool>(), n, static_cast<int32_t>(pattern), S, C,
                                                 c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "visibility_mask_kernel failed: ", cudaGetErrorString(err));
  return mask;
}

}  // namespace rec2pm
