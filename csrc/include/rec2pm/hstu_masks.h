// HSTU's masks (candidates, a contextual prefix, a local window with a full-attention tail,
// causal or bidirectional) as the visible keys of a row, shared by CPU and CUDA code.
//
// Mirrors rec2pm_kernels/hstu_masks.py (tests/test_hstu_options.py compares them on every
// small layout): with X contextual tokens, T candidates at the end of a sequence of n, window W
// and tail F, rank(p) is 0 for the prefix, p - max(X - 1, 0) after it, and the candidates'
// common rank m = n - max(X - 1, 0) - T.  A row sees itself and the columns of smaller rank
// (of any other rank when bidirectional), at most W ranks away unless it is in the tail
// (rank >= m - F) or W = 0; the prefix also sees every non-candidate column.
//
// Ranks never decrease along the sequence, so the columns whose ranks lie in an interval are
// one span: each rule above is a span, and a row's visible keys are their union.
#pragma once

#include <cstdint>

#include "rec2pm/patterns.h"

namespace rec2pm {

struct HstuMask {
  int64_t contextual_seq_len;
  int64_t max_attn_len;
  int64_t min_full_attn_seq_len;
  bool causal;
};

constexpr int64_t kMaxHstuSpans = 3;

// First position whose rank is at least `rank` (`length` when none): positions [0, X) have
// rank 0, the history counts on from 1 at position X, the candidates all have rank m.
REC2PM_HD int64_t hstu_first_of_rank(int64_t rank, int64_t shift, int64_t candidate_rank, int64_t length) {
  if (rank > candidate_rank) return length;
  return rank <= 0 ? 0 : rank + shift;
}

// The visible keys of `row` as at most kMaxHstuSpans spans [begin, end), increasing and
// disjoint; returns their count.  `length` tokens, the last `num_targets` of them candidates
// (a non-empty sequence holds at least X + T tokens).
REC2PM_HD int64_t hstu_key_spans(const HstuMask& mask, int64_t row, int64_t length, int64_t num_targets,
                                 int64_t* begin, int64_t* end) {
  const int64_t X = mask.contextual_seq_len, W = mask.max_attn_len, F = mask.min_full_attn_seq_len;
  const int64_t shift = X > 0 ? X - 1 : 0;
  const int64_t first_candidate = length - num_targets;
  const int64_t m = first_candidate - shift;  // the candidates' rank
  const int64_t rank = row >= first_candidate ? m : (row > shift ? row - shift : 0);
  const bool full = W == 0 || (F > 0 && rank >= m - F);
  // Candidate spans in increasing order of begin: the prefix rule (from 0), the smaller ranks
  // within reach (ending at or before the row), the row, the larger ranks (after the row).
  int64_t from[4], to[4];
  int64_t n = 0;
  if (row < X) {
    from[n] = 0;
    to[n++] = first_candidate;
  }
  from[n] = hstu_first_of_rank(full ? 0 : rank - W, shift, m, length);
  to[n++] = hstu_first_of_rank(rank, shift, m, length);
  from[n] = row;
  to[n++] = row + 1;
  if (!mask.causal) {
    from[n] = hstu_first_of_rank(rank + 1, shift, m, length);
    to[n++] = full ? length : hstu_first_of_rank(rank + W + 1, shift, m, length);
  }
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (from[i] >= to[i]) continue;
    if (count > 0 && from[i] <= end[count - 1]) {  // overlaps or touches the last span
      if (to[i] > end[count - 1]) end[count - 1] = to[i];
    } else {
      begin[count] = from[i];
      end[count++] = to[i];
    }
  }
  return count;
}

}  // namespace rec2pm
