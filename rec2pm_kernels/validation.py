"""Argument checks for the public functions.

Three levels:

* *structure* checks (types, ranks, shapes, dtypes, devices, option names, value ranges of
  the Python arguments, memory layout of the caches) read no tensor contents and always run;
* *index* checks read the small index tensors (``cu_seqlens`` order, first and last entry,
  ``max_seqlen``, complete write blocks, ``cache_seqlens`` range and cache capacity).  They
  cost O(batch).  When those tensors are on the host (CPU) they always run; on CUDA reading
  them would synchronise the device, so there they run only with ``validate=True`` or
  ``REC2PM_VALIDATE=1``;
* *content* checks scan whole inputs (NaN or Inf in q, k, v, the bias and the filled cache
  slots): on CPU by default, on CUDA only with ``validate=True`` or ``REC2PM_VALIDATE=1``;
  ``validate=False`` skips them everywhere.

Only the first level runs while ``torch.compile`` traces (less the cache layout, whose
storage addresses are unknown then).  What skipping costs is documented with
``validate`` in ``rec2pm_kernels.interface``.  Every error names the argument and says what
was expected.
"""

from __future__ import annotations

import math
import os
import weakref
from numbers import Real

import torch

from .patterns import INTERLEAVED_PATTERNS, PATTERNS, SCORES, PatternSpec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
# Positions inside a sequence are 32-bit in the compiled kernels.
MAX_POSITION = 2**31 - 1


def reads_host_indices(tensor: torch.Tensor) -> bool:
    """Whether the O(batch) index checks on ``tensor`` are free: it is on the host, and no trace runs."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def check_flag(name: str, value, allow_none: bool = False) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        expected = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name} must be {expected}, got {value!r}")


def should_check_values(device: torch.device, validate: bool | None) -> bool:
    """Whether value checks (which read tensor contents) run for this call."""
    check_flag("validate", validate, allow_none=True)
    if torch.compiler.is_compiling():
        return False
    if validate is not None:
        return bool(validate)
    if device.type == "cpu":
        return True
    return os.environ.get("REC2PM_VALIDATE", "0") not in ("", "0")


def check_tensor(name: str, x, *, rank: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], what: str) -> None:
    """All tensors share ``what`` ('dtype' or 'device')."""
    first = getattr(tensors[0], what)
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if getattr(t, what) != first:
            raise (TypeError if what == "dtype" else ValueError)(
                f"{name} must have the same {what} as {names[0]} ({first}), got {getattr(t, what)}"
            )


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if value > MAX_POSITION:
        raise ValueError(f"{name} must be <= {MAX_POSITION} (positions are 32-bit in the kernels), got {value}")
    return value


def check_qkv(names: tuple[str, str, str], q, k, v) -> None:
    """``q, k``: ``(tokens, heads, head_dim)``; ``v``: ``(tokens, heads, head_dim_v)``."""
    for name, x in zip(names, (q, k, v), strict=True):
        check_tensor(name, x, rank=3)
    check_same(names, (q, k, v), "dtype")
    check_same(names, (q, k, v), "device")
    if k.shape != q.shape:
        raise ValueError(f"{names[1]} must have the shape of {names[0]} {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"{names[2]} must have shape ({q.shape[0]}, {q.shape[1]}, head_dim_v) to match {names[0]} "
            f"(tokens, heads), got {tuple(v.shape)}"
        )
    if q.shape[1] < 1 or q.shape[2] < 1 or v.shape[2] < 1:
        raise ValueError(
            f"heads and head dims must be >= 1, got {names[0]} {tuple(q.shape)}, {names[2]} {tuple(v.shape)}"
        )


def check_score_options(score, scale, silu_norm, rel_bias, heads: int, q: torch.Tensor) -> tuple[float, float | None]:
    """Returns ``(scale, silu_norm)`` with the default scale filled in."""
    check_choice("score", score, SCORES)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite number or None, got {scale!r}")
    if score == "silu":
        if silu_norm is None:
            raise ValueError("silu_norm is required for score='silu' (HSTU uses its maximum sequence length)")
        if isinstance(silu_norm, torch.Tensor):
            check_tensor("silu_norm", silu_norm, rank=1)
            if silu_norm.device != q.device:
                raise ValueError(f"silu_norm must be on {q.device}, got {silu_norm.device}")
        elif (
            isinstance(silu_norm, bool)
            or not isinstance(silu_norm, Real)
            or not math.isfinite(silu_norm)
            or silu_norm <= 0
        ):
            raise ValueError(f"silu_norm must be a finite number > 0 or a (batch,) tensor, got {silu_norm!r}")
        else:
            silu_norm = float(silu_norm)
    elif silu_norm is not None:
        raise ValueError(f"silu_norm applies only to score='silu', got silu_norm={silu_norm!r} with score={score!r}")
    check_bias_table("rel_bias", rel_bias, heads, q.device)
    return float(scale), silu_norm


def check_bias_table(name: str, table: torch.Tensor | None, heads: int, device: torch.device) -> None:
    """A bias table ``(heads, buckets)``, or ``(1, buckets)`` shared by every head."""
    if table is None:
        return
    check_tensor(name, table, rank=2)
    if table.shape[0] not in (1, heads) or table.shape[1] < 1:
        raise ValueError(
            f"{name} must have shape (heads={heads}, buckets>=1), or (1, buckets) shared by all heads, "
            f"got {tuple(table.shape)}"
        )
    if table.device != device:
        raise ValueError(f"{name} must be on {device}, got {table.device}")


def check_per_sequence_silu_norm(pattern: PatternSpec, silu_norm, batch: int) -> None:
    """A ``silu_norm`` tensor (after ``check_score_options``) holds one divisor per sequence,
    HSTU's: like its masks it refines ``causal``, and the Triton kernels run it as their
    ``HSTU_CAUSAL`` pattern.  Its shape is checked on every call (no values are read)."""
    if not isinstance(silu_norm, torch.Tensor):
        return
    if silu_norm.shape != (batch,):
        raise ValueError(f"silu_norm must have shape (batch={batch},), got {tuple(silu_norm.shape)}")
    if pattern.interleaved:
        raise ValueError(
            f"a per-sequence silu_norm (a tensor) refines pattern='causal', as HSTU's masks do; "
            f"pattern={pattern.name!r} takes one silu_norm for every sequence (a number)"
        )


def check_silu_norm_values(silu_norm) -> None:
    """A per-sequence ``silu_norm`` (its shape checked by ``check_per_sequence_silu_norm``)
    has a finite entry > 0 for every sequence."""
    if not isinstance(silu_norm, torch.Tensor):
        return
    if silu_norm.numel() and not bool(((silu_norm > 0) & torch.isfinite(silu_norm)).all()):
        raise ValueError("silu_norm must be finite and > 0 for every sequence")


def check_hstu_mask_fields(mask) -> None:
    for name in ("contextual_seq_len", "max_attn_len", "min_full_attn_seq_len"):
        value = getattr(mask, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= value <= MAX_POSITION:
            raise ValueError(f"{name} must be in [0, {MAX_POSITION}], got {value}")
    if not isinstance(mask.causal, bool):
        raise TypeError(f"causal must be a bool, got {type(mask.causal).__name__}")
    if mask.min_full_attn_seq_len and not mask.max_attn_len:
        raise ValueError(
            "min_full_attn_seq_len keeps full attention for the last tokens under a local window; "
            f"it needs max_attn_len > 0, got max_attn_len=0 and min_full_attn_seq_len={mask.min_full_attn_seq_len}"
        )


def check_hstu_options(
    pattern: PatternSpec, mask, num_targets, batch: int, device: torch.device, rel_bias=None
) -> None:
    """Targets, a contextual prefix, a window and ``causal=False`` refine ``causal`` only;
    bidirectional masks take no one-sided ``rel_bias``."""
    if num_targets is not None:
        check_tensor("num_targets", num_targets, rank=1, dtypes=INDEX_DTYPES)
        if num_targets.shape != (batch,):
            raise ValueError(f"num_targets must have shape (batch={batch},), got {tuple(num_targets.shape)}")
        if num_targets.device != device:
            raise ValueError(f"num_targets must be on {device}, got {num_targets.device}")
    if pattern.interleaved and (mask.active or num_targets is not None):
        raise ValueError(
            "num_targets, contextual_seq_len, max_attn_len and causal=False refine pattern='causal'; "
            f"pattern={pattern.name!r} interleaves its own write tokens and takes none of them"
        )
    if not mask.causal and rel_bias is not None:
        raise ValueError(
            "rel_bias holds one weight per distance row - col >= 0, so it cannot bias keys after the row; "
            "causal=False takes ts_bias (symmetric in time) but no rel_bias"
        )


def check_num_targets_values(num_targets: torch.Tensor | None, lengths: torch.Tensor, mask) -> None:
    """Every non-empty sequence holds its contextual prefix, then its candidates after it."""
    if (num_targets is None and not mask.contextual_seq_len) or not lengths.numel():
        return
    short = (lengths > 0) & (lengths < mask.contextual_seq_len)
    if bool(short.any()):
        i = int(torch.nonzero(short)[0, 0])
        raise ValueError(
            f"cu_seqlens: sequence {i} has {int(lengths[i])} tokens, fewer than contextual_seq_len="
            f"{mask.contextual_seq_len}; a non-empty sequence must start with the whole contextual prefix"
        )
    if num_targets is None:
        return
    nt = num_targets.to(lengths.device, torch.int64)
    room = torch.where(lengths > 0, lengths - mask.contextual_seq_len, 0)
    bad = (nt < 0) | (nt > room)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"num_targets[{i}]={int(nt[i])} must be in [0, {int(room[i])}]: sequence {i} has {int(lengths[i])} "
            f"tokens, contextual_seq_len={mask.contextual_seq_len} of them contextual"
        )


def check_time_bias(ts_bias, timestamps, query_timestamps, heads: int, total: int, device: torch.device) -> None:
    """``ts_bias (heads or 1, num_buckets + 1)`` needs ``timestamps``; the query times are optional."""
    check_bias_table("ts_bias", ts_bias, heads, device)
    if ts_bias is None:
        if timestamps is not None or query_timestamps is not None:
            raise ValueError("timestamps and query_timestamps are read only by ts_bias; pass ts_bias too")
        return
    if timestamps is None:
        raise ValueError("ts_bias needs timestamps: one int64 timestamp per token, shape (total_tokens,)")
    for name, t in (("timestamps", timestamps), ("query_timestamps", query_timestamps)):
        if t is None:
            continue
        check_tensor(name, t, rank=1, dtypes=INDEX_DTYPES)
        if t.shape != (total,):
            raise ValueError(f"{name} must have shape (total_tokens={total},), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_dropout(dropout_p, dropout_seed) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if dropout_seed is not None and (isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int)):
        raise TypeError(f"dropout_seed must be an int or None, got {type(dropout_seed).__name__}")
    if dropout_seed is not None and not -(1 << 63) <= dropout_seed < 1 << 63:  # an int64 on every backend
        raise ValueError(f"dropout_seed must fit in int64 ([-2**63, 2**63)), got {dropout_seed}")


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> None:
    check_tensor(name, cu, rank=1, dtypes=INDEX_DTYPES)
    if cu.device != device:
        raise ValueError(f"{name} must be on {device}, got {cu.device}")
    if cu.numel() < 1:
        raise ValueError(f"{name} must have shape (batch + 1,) with at least one entry, got shape (0,)")


# The host cu_seqlens checked last, with a copy of its values, the token count and its
# lengths: a decoder passes one cu_seqlens to every layer, and the check's handful of small
# tensor ops measured about 45 us a call, 0.7 ms of a 16-layer serving request.  A weak
# reference, so that a new tensor at a freed one's address is never taken for it; the values
# are compared, not the version counter, which writes through numpy or ``.data`` do not bump.
_LAST_CHECKED: list = [None]


def check_cu_seqlens_values(name: str, cu: torch.Tensor, total: int, tensor_name: str) -> torch.Tensor:
    """Returns the sequence lengths (on ``cu``'s device)."""
    last = _LAST_CHECKED[0]
    if last is not None and last[0]() is cu and last[2] == total and torch.equal(last[1], cu):
        return last[3]
    lengths = _checked_lengths(name, cu, total, tensor_name)
    if cu.device.type == "cpu":
        _LAST_CHECKED[0] = (weakref.ref(cu), cu.clone(), total, lengths)
    return lengths


def _checked_lengths(name: str, cu: torch.Tensor, total: int, tensor_name: str) -> torch.Tensor:
    if int(cu[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(cu[0])}")
    wide = cu.long()  # int32 differences could wrap around and look non-decreasing
    lengths = wide[1:] - wide[:-1]
    if lengths.numel() and bool((lengths < 0).any()):
        bad = int(torch.nonzero(lengths < 0)[0, 0])
        raise ValueError(f"{name} must be non-decreasing, but {name}[{bad + 1}] < {name}[{bad}]")
    if int(cu[-1]) != total:
        raise ValueError(f"{name}[-1] must equal the number of tokens in {tensor_name} ({total}), got {int(cu[-1])}")
    return lengths


def check_caches(q_new: torch.Tensor, v_new: torch.Tensor, batch: int, k_cache, v_cache, cache_seqlens) -> None:
    """One layer's K/V cache and its filled lengths fit the new rows ``(total_new, heads, dim)``
    of ``batch`` users; every check reads shapes and strides only."""
    heads, dim, dim_v = q_new.shape[1], q_new.shape[2], v_new.shape[2]
    check_tensor("k_cache", k_cache, rank=4)
    check_tensor("v_cache", v_cache, rank=4)
    check_same(("q_new", "k_cache", "v_cache"), (q_new, k_cache, v_cache), "dtype")
    check_same(("q_new", "k_cache", "v_cache"), (q_new, k_cache, v_cache), "device")
    if k_cache.shape[0] != batch or k_cache.shape[2:] != (heads, dim):
        raise ValueError(
            f"k_cache must have shape (batch={batch}, capacity, heads={heads}, head_dim={dim}), "
            f"got {tuple(k_cache.shape)}"
        )
    if v_cache.shape != (batch, k_cache.shape[1], heads, dim_v):
        raise ValueError(
            f"v_cache must have shape ({batch}, {k_cache.shape[1]}, {heads}, {dim_v}) to match "
            f"k_cache and v_new, got {tuple(v_cache.shape)}"
        )
    check_tensor("cache_seqlens", cache_seqlens, rank=1, dtypes=INDEX_DTYPES)
    if cache_seqlens.shape != (batch,) or cache_seqlens.device != q_new.device:
        raise ValueError(
            f"cache_seqlens must have shape ({batch},) on {q_new.device}, "
            f"got {tuple(cache_seqlens.shape)} on {cache_seqlens.device}"
        )
    check_cache_layout(("k_cache", "v_cache"), k_cache, v_cache)


def check_layer_caches(q_new: torch.Tensor, v_new: torch.Tensor, batch: int, caches, cache_seqlens) -> None:
    """``check_caches`` for every layer's ``(k_cache, v_cache)`` (a decoder step), in full for
    the first layer; the others must have its layout (shape, strides, dtype, device: all that
    the per-cache checks read) and each layer's two caches must share no memory."""
    if not caches:
        return
    (k0, v0), *rest = caches
    check_caches(q_new, v_new, batch, k0, v0, cache_seqlens)
    layout = [(c.shape, c.stride(), c.dtype, c.device) for c in (k0, v0)]
    spans = [_byte_span(c) for c in (k0, v0)]  # the same for every layer: computed once
    for layer, (k_cache, v_cache) in enumerate(rest, start=1):
        for name, cache, want in (("k_cache", k_cache, layout[0]), ("v_cache", v_cache, layout[1])):
            if not isinstance(cache, torch.Tensor) or (cache.shape, cache.stride(), cache.dtype, cache.device) != want:
                raise ValueError(
                    f"layer {layer}'s {name} must have layer 0's shape {tuple(want[0])}, strides {want[1]}, "
                    f"dtype {want[2]} and device {want[3]}"
                )
        k_ptr, v_ptr = k_cache.data_ptr(), v_cache.data_ptr()
        apart = k_ptr + spans[0] <= v_ptr or v_ptr + spans[1] <= k_ptr  # disjoint byte ranges: nothing shared
        if not apart and _may_share_elements(k_cache, v_cache):
            raise ValueError(f"layer {layer}'s k_cache and v_cache must not share memory")


def check_cache_layout(names: tuple[str, str], k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Each cache owns every slot it exposes, and the two share none: an append to one slot
    must never change another slot, another user's or the other cache's.  (Skipped while
    ``torch.compile`` traces: storage addresses are not known then.)"""
    if torch.compiler.is_compiling():
        return
    for name, cache in zip(names, (k_cache, v_cache), strict=True):
        if _has_internal_overlap(cache):
            raise ValueError(
                f"{name} must not overlap itself in memory, got shape {tuple(cache.shape)} with strides "
                f"{cache.stride()} (an expanded or as_strided view); pass a tensor that owns each slot, "
                "e.g. .contiguous()"
            )
    if _may_share_elements(k_cache, v_cache):
        raise ValueError(
            f"{names[0]} and {names[1]} must not share memory: appending to one would overwrite the "
            "other; pass separate tensors (or disjoint views of one buffer)"
        )


def _has_internal_overlap(t: torch.Tensor) -> bool:
    """True unless each stride steps past everything the smaller strides reach (a sufficient
    condition for distinct elements; every layout torch creates without as_strided meets it)."""
    reach = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride(), strict=True) if n > 1):
        if stride < reach:
            return True
        reach += (size - 1) * stride
    return False


def _byte_span(t: torch.Tensor) -> int:
    """Bytes from ``t``'s first element to one past its last (``t`` not empty)."""
    return (sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()


def _may_share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    (a0, a1), (b0, b1) = ((t.data_ptr(), t.data_ptr() + _byte_span(t)) for t in (a, b))
    if a1 <= b0 or b1 <= a0:
        return False
    if a.stride() != b.stride() or a.shape != b.shape or a.dtype != b.dtype:
        return True  # interleaved in a way not worth proving disjoint
    # Same layout, shifted: they share an element iff the shift is an index offset, i.e. a
    # mixed-radix number with digits below each size (strides from largest to smallest).
    rest, item = divmod(abs(b0 - a0), a.element_size())
    if item:
        return False
    for stride, size in sorted(((st, n) for n, st in zip(a.shape, a.stride(), strict=True) if n > 1), reverse=True):
        digit = min(rest // stride, size - 1)
        rest -= digit * stride
    return rest == 0


def check_cache_seqlens_values(cache_seqlens: torch.Tensor, counts: torch.Tensor, capacity: int) -> None:
    """Filled lengths are >= 0 and leave room for every user's new rows."""
    if not cache_seqlens.numel():
        return
    if bool((cache_seqlens < 0).any()):
        b = int(torch.nonzero(cache_seqlens < 0)[0, 0])
        raise ValueError(f"cache_seqlens must be >= 0, got cache_seqlens[{b}]={int(cache_seqlens[b])}")
    ends = cache_seqlens.long() + counts.long()
    if bool((ends > capacity).any()):
        b = int(torch.nonzero(ends > capacity)[0, 0])
        raise ValueError(
            f"k_cache capacity {capacity} is too small: user {b} has "
            f"cache_seqlens={int(cache_seqlens[b])} and {int(counts[b])} new rows"
        )


def check_filled_cache_finite(
    names: tuple[str, str], caches: tuple[torch.Tensor, torch.Tensor], cache_seqlens: torch.Tensor
) -> None:
    """No NaN or Inf in the slots ``[0, cache_seqlens[b])`` that the new rows read."""
    if not cache_seqlens.numel():
        return
    filled_max = int(cache_seqlens.max())
    if filled_max == 0:
        return
    filled = torch.arange(filled_max, device=cache_seqlens.device)[None, :] < cache_seqlens[:, None].long()
    for name, cache in zip(names, caches, strict=True):
        if all_finite(cache[:, :filled_max]):  # the usual case, in one pass
            continue
        # Something is not finite: it is an error only inside a user's filled prefix.
        bad = (~torch.isfinite(cache[:, :filled_max])).flatten(2).any(-1) & filled  # (batch, slots)
        if bool(bad.any()):
            b, slot = (int(x) for x in torch.nonzero(bad)[0])
            raise ValueError(
                f"{name} contains NaN or Inf in filled slot {slot} of user {b} "
                f"(cache_seqlens[{b}]={int(cache_seqlens[b])})"
            )


def check_max_seqlen(name: str, max_seqlen, lengths: torch.Tensor | None) -> int:
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{name} must be an int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{name} must be >= 0, got {max_seqlen}")
    if lengths is not None and lengths.numel():
        longest = int(lengths.max())
        if longest > max_seqlen:
            raise ValueError(f"{name}={max_seqlen} is smaller than the longest sequence ({longest})")
    return max_seqlen


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``.  A finite sum proves it in one cheap pass (NaN and Inf make any
    sum non-finite); only a non-finite sum, which overflow can also cause, takes the full test."""
    total = t.sum(dtype=torch.float32 if t.element_size() < 4 else None)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def check_finite(names: tuple[str, ...], tensors: tuple[torch.Tensor | None, ...]) -> None:
    for name, t in zip(names, tensors, strict=True):
        if t is not None and t.numel() and not all_finite(t):
            raise ValueError(f"{name} contains NaN or Inf")


def check_pattern(pattern, segment_len, num_memory_tokens) -> PatternSpec:
    """The ``PatternSpec`` of the keyword form (or ``pattern`` itself, when it is one), checked."""
    return PatternSpec.of(pattern, segment_len, num_memory_tokens)


def check_pattern_fields(pattern, segment_len, num_memory_tokens) -> None:
    check_choice("pattern", pattern, PATTERNS)
    if pattern in INTERLEAVED_PATTERNS:
        if segment_len is None or num_memory_tokens is None:
            raise ValueError(f"pattern={pattern!r} needs segment_len (S) and num_memory_tokens (C)")
        check_positive_int("segment_len", segment_len)
        check_positive_int("num_memory_tokens", num_memory_tokens)
        if segment_len + num_memory_tokens > MAX_POSITION:
            raise ValueError(
                f"segment_len + num_memory_tokens must be <= {MAX_POSITION} (positions are 32-bit in "
                f"the kernels), got {segment_len} + {num_memory_tokens}"
            )
    elif segment_len is not None or num_memory_tokens is not None:
        raise ValueError(
            "segment_len and num_memory_tokens apply only to the interleaved patterns "
            f"{INTERLEAVED_PATTERNS}; pass None with pattern='causal'"
        )


def check_write_blocks(lengths: torch.Tensor, pattern: PatternSpec) -> None:
    bad = pattern.ends_inside_write_block(lengths)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"cu_seqlens: sequence {i} (length {int(lengths[i])}) ends inside a write block "
            f"(segment_len={pattern.segment_len}, num_memory_tokens={pattern.num_memory_tokens}); a sequence "
            "must end on an item or after a complete write block"
        )
