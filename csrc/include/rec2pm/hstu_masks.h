// HSTU's masks (candidates, a contextual prefix, a local window with a full-attention tail)
// as the visible keys of a row, shared by CPU and CUDA code.
//
// Mirrors rec2pm_kernels/hstu_masks.py (tests/test_hstu_options.py compares them on every
// small layout): with X contextual tokens, T candidates at the end of a sequence of n, window W
// and tail F, rank(p) is 0 for the prefix, p - max(X - 1, 0) after it, and the candidates'
// common rank m = n - max(X - 1, 0) - T.  A row sees itself and the columns of smaller rank,
// at most W ranks back unless it is in the tail (rank >= m - F) or W = 0; the prefix sees
// every non-candidate column.
#pragma once

#include <cstdint>

#include "rec2pm/patterns.h"

namespace rec2pm {

struct HstuMask {
  int64_t contextual_seq_len;
  int64_t max_attn_len;
  int64_t min_full_attn_seq_len;
};

constexpr int64_t kMaxHstuSpans = 3;

// The visible keys of `row` as at most kMaxHstuSpans spans [begin, end), increasing; returns
// their count.  `length` tokens, the last `num_targets` of them candidates.
REC2PM_HD int64_t hstu_key_spans(const HstuMask& mask, int64_t row, int64_t length, int64_t num_targets,
                                 int64_t* begin, int64_t* end) {
  const int64_t X = mask.contextual_seq_len, W = mask.max_attn_len, F = mask.min_full_attn_seq_len;
  const int64_t shift = X > 0 ? X - 1 : 0;
  const int64_t first_candidate = length - num_targets;
  const int64_t candidate_rank = first_candidate - shift;
  if (row < X) {  // the prefix: every non-candidate column
    begin[0] = 0;
    end[0] = first_candidate;
    return 1;
  }
  const bool candidate = row >= first_candidate;
  const int64_t rank = candidate ? candidate_rank : row - shift;
  const bool full = W == 0 || (F > 0 && rank >= candidate_rank - F);
  // Non-candidate columns of smaller rank: the prefix (rank 0), then history up to `last`.
  const int64_t last = candidate ? first_candidate : row;  // one past the history columns
  int64_t count = 0;
  if (full) {
    if (last > 0) {
      begin[count] = 0;
      end[count++] = last;
    }
  } else {
    const int64_t earliest = rank + shift - W;  // history columns at most W ranks back
    const int64_t from = earliest > X ? earliest : X;
    if (X > 0 && rank <= W) {  // the prefix (rank 0) is within the window
      begin[count] = 0;
      end[count++] = X;
    }
    if (from < last) {
      if (count > 0 && end[count - 1] == from) {
        end[count - 1] = last;
      } else {
        begin[count] = from;
        end[count++] = last;
      }
    }
  }
  begin[count] = row;  // itself
  end[count] = row + 1;
  if (count > 0 && end[count - 1] == row) {
    end[count - 1] = row + 1;
    return count;
  }
  return count + 1;
}

}  // namespace rec2pm
