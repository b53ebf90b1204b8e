"""Deterministic per-bucket sums of a tile's score gradient, for the bias tables' gradients.

Both add ``sum of ds over the tile's entries in bucket b`` into ``PARTIAL_ROW[b]`` (float64,
one program's row of the partial buffer) in an order fixed by the tile alone, so the sums
come out bit-identical from run to run, and end with a barrier: the next tile adds to the
same buckets, possibly from other threads of the program.

* ``add_windowed_bucket_sums``: a one-hot reduction over a window of ``WINDOW`` buckets
  starting at the tile's smallest; right when the tile's buckets span at most ``WINDOW``
  (the relative bias where λ(p) = p: a 16 x 16 tile holds at most 31).
* ``add_sorted_bucket_sums``: no bound on the span (the timestamp bias, and the relative
  bias under ``global``, whose λ steps back by C - 1 at each unit boundary).  The (bucket, ds)
  pairs are sorted by bucket (packed into one int64 key, the bucket in the high word),
  summed per run of equal buckets by a segmented scan, and each run's sum is added at its
  last entry, so every bucket is stored once.  It also holds fewer values per thread than
  the one-hot's ``[BM, BN, WINDOW]`` tile, which is why a kernel computing both tables'
  gradients takes it for both.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Sort key of masked entries (ds = 0): above every bucket, so they sort last and are not stored.
_NO_BUCKET = tl.constexpr(2**30)


@triton.jit
def add_windowed_bucket_sums(PARTIAL_ROW, ds, mask, bucket, NUM_BUCKETS, WINDOW: tl.constexpr):
    first = tl.min(tl.where(mask, bucket, NUM_BUCKETS), axis=None)
    window = tl.arange(0, WINDOW)
    hit = (bucket - first)[:, :, None] == window[None, None, :]
    # Over the rows in fp32, then over the keys in fp64 (the cancelling sums of a softmax).
    sums = tl.sum(tl.sum(tl.where(hit, ds[:, :, None], 0.0), axis=0).to(tl.float64), axis=0)
    ptrs = PARTIAL_ROW + first + window
    ok = first + window < NUM_BUCKETS
    tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + sums, mask=ok)
    tl.debug_barrier()


@triton.jit
def _segmented_sum(start_a, sum_a, start_b, sum_b):
    """Combine of a segmented inclusive scan: a segment start resets the running sum."""
    return start_a | start_b, tl.where(start_b, sum_b, sum_a + sum_b)


@triton.jit
def add_sorted_bucket_sums(PARTIAL_ROW, ds, mask, bucket):
    n: tl.constexpr = ds.shape[0] * ds.shape[1]
    bucket = tl.where(mask, bucket, _NO_BUCKET)
    bits = ds.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    key = tl.sort(tl.reshape((bucket.to(tl.int64) << 32) | bits, (n,)))
    sorted_bucket = (key >> 32).to(tl.int32)
    value = (key & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True).to(tl.float64)
    index = tl.arange(0, n)
    before = tl.gather(sorted_bucket, tl.maximum(index - 1, 0), 0)
    after = tl.gather(sorted_bucket, tl.minimum(index + 1, n - 1), 0)
    starts = (index == 0) | (sorted_bucket != before)
    ends = ((index == n - 1) | (sorted_bucket != after)) & (sorted_bucket < _NO_BUCKET)
    _, sums = tl.associative_scan((starts, value), 0, _segmented_sum)
    ptrs = PARTIAL_ROW + sorted_bucket
    tl.store(ptrs, tl.load(ptrs, mask=ends, other=0.0) + sums, mask=ends)
    tl.debug_barrier()
