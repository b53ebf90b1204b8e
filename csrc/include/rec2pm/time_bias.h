// HSTU's timestamp bias bucket, shared by CPU and CUDA code.
//
// Mirrors rec2pm_kernels/time_bias.py: bucket(Δ) = min(floor(log(max(|Δ|, 1)) / 0.301), B),
// the logarithm natural and taken in float32 on the gap converted to float32, as HSTU does.
#pragma once

#include <cmath>
#include <cstdint>

#include "rec2pm/patterns.h"

namespace rec2pm {

REC2PM_HD int64_t time_bucket(int64_t query_time, int64_t key_time, int64_t num_buckets) {
  // |Δ| in unsigned arithmetic: the signed difference of two far-apart int64 times overflows
  // (undefined behaviour), their unsigned difference is exact.
  uint64_t gap = query_time >= key_time ? static_cast<uint64_t>(query_time) - static_cast<uint64_t>(key_time)
                                        : static_cast<uint64_t>(key_time) - static_cast<uint64_t>(query_time);
  if (gap < 1) gap = 1;
  const int64_t bucket = static_cast<int64_t>(logf(static_cast<float>(gap)) / 0.301f);
  return bucket > num_buckets ? num_buckets : (bucket < 0 ? 0 : bucket);
}

}  // namespace rec2pm
