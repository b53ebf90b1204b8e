#pragma once

#include <torch/extension.h>

namespace rec2pm {

// (n, n) bool mask of one sequence: mask[row][col] = visible(pattern, row, col, S, C).
torch::Tensor visibility_mask_cpu(int64_t pattern, int64_t n, int64_t S, int64_t C);

// (n,) int64 positions λ(p) used by the relative-position bias.
torch::Tensor bias_positions_cpu(int64_t pattern, int64_t n, int64_t S, int64_t C);

#ifdef REC2PM_WITH_CUDA
torch::Tensor visibility_mask_cuda(int64_t pattern, int64_t n, int64_t S, int64_t C, int64_t device_index);
#endif

}  // namespace rec2pm
