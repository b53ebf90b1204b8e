// Dense pattern masks and bias positions on the CPU, from the shared rule in patterns.h.
// Small utility ops: they prove the build pipeline and let tests check the C++ rule
// against the Python one that the oracle uses.
#include "patterns_ops.h"

#include "input_checks.h"

#include "rec2pm/patterns.h"

namespace rec2pm {

torch::Tensor visibility_mask_cpu(int64_t pattern, int64_t n, int64_t S, int64_t C) {
  check_pattern_codes(pattern, 0, S, C);
  TORCH_CHECK(n >= 0, "n must be >= 0, got ", n);
  auto mask = torch::empty({n, n}, torch::dtype(torch::kBool));
  bool* out = mask.data_ptr<bool>();
  const auto pat = static_cast<Pattern>(pattern);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n; ++row) {
    for (int64_t col = 0; col < n; ++col) out[row * n + col] = visible(pat, row, col, S, C);
  }
  return mask;
}

torch::Tensor bias_positions_cpu(int64_t pattern, int64_t n, int64_t S, int64_t C) {
  check_pattern_codes(pattern, 0, S, C);
  TORCH_CHECK(n >= 0, "n must be >= 0, got ", n);
  auto lam = torch::empty({n}, torch::dtype(torch::kLong));
  int64_t* out = lam.data_ptr<int64_t>();
  const auto pat = static_cast<Pattern>(pattern);
  for (int64_t p = 0; p < n; ++p) out[p] = bias_position(pat, p, S, C);
  return lam;
}

}  // namespace rec2pm
