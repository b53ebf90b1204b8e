// Attention math shared by the CPU kernels and the CUDA ones: the visible keys of a row as
// contiguous spans, and the two score functions.  Pure functions on integers and floats,
// compiled for the host in every build, so their numbers are tested on the CPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "rec2pm/patterns.h"

namespace rec2pm {

// Score functions, in the order of rec2pm_kernels.patterns.SCORES.
enum class Score : int32_t { kSoftmax = 0, kSilu = 1 };

// The visible keys of `row` are key_span_count(...) contiguous spans [begin, end), in
// increasing order, every key inside a span visible (so no per-key mask is needed):
//   causal:              [0, row]
//   global:              the items of each earlier unit, then the row's own unit up to it
//   kv_memory_overwrite: the previous unit's write block and the own unit, one span
//   kv_memory_append:    the write block of each earlier unit, then the own unit
REC2PM_HD int64_t key_span_count(Pattern pattern, int64_t row, int64_t S, int64_t C) {
  if (pattern == Pattern::kGlobal || pattern == Pattern::kKvMemoryAppend) return unit_of(row, S, C) + 1;
  return 1;
}

REC2PM_HD void key_span(Pattern pattern, int64_t row, int64_t span, int64_t S, int64_t C, int64_t* begin,
                        int64_t* end) {
  const int64_t unit = S + C;
  const int64_t own = unit_of(row, S, C) * unit;
  if (pattern == Pattern::kCausal) {
    *begin = 0;
  } else if (pattern == Pattern::kKvMemoryOverwrite) {
    *begin = own >= C ? own - C : 0;
  } else if (span < unit_of(row, S, C)) {  // an earlier unit: its items (global) or write block (append)
    *begin = span * unit + (pattern == Pattern::kGlobal ? 0 : S);
    *end = pattern == Pattern::kGlobal ? span * unit + S : (span + 1) * unit;
    return;
  } else {
    *begin = own;
  }
  *end = row + 1;
}

REC2PM_HD float silu(float z) { return z / (1.0f + expf(-z)); }
REC2PM_HD double silu(double z) { return z / (1.0 + exp(-z)); }

}  // namespace rec2pm
