"""The public attention functions of rec2pm_kernels.

Both take *packed varlen* tensors: the tokens of all sequences back to back, with
``cu_seqlens`` (``(batch + 1,)``, int32 or int64, starting at 0) marking where each one
starts.  Patterns, scores and the relative-position bias are defined in
``rec2pm_kernels.patterns`` and in ``docs/patterns.md``.
"""

from __future__ import annotations

import torch

from . import validation as check
from .backends import cpp_preferred, cpp_row_lanes, resolve_backend
from .hstu_masks import HSTUMask
from .ops.cached_step.cpp_backend import cached_step_cpp
from .ops.cached_step.cuda_backend import cached_step_cuda
from .ops.cached_step.torch_backend import cached_step_torch
from .ops.segment_attention.cpp_backend import segment_attention_cpp
from .ops.segment_attention.cuda_backend import segment_attention_cuda
from .ops.segment_attention.torch_backend import segment_attention_torch
from .patterns import PatternSpec
from .time_bias import next_timestamps


def _segment_attention_triton(q, k, v, cu_seqlens, max_seqlen, **options):
    # Imported on first use: Triton is optional, and TRITON_INTERPRET is read when kernels are defined.
    from .ops.segment_attention.triton_backend import segment_attention_triton

    return segment_attention_triton(q, k, v, cu_seqlens, max_seqlen, **options)


def _segment_attention_cpp(q, k, v, cu_seqlens, max_seqlen, *, allow_tf32, deterministic, **options):
    # Forward only, exact fp32 (or fp64) math, deterministic for any thread count.
    return segment_attention_cpp(q, k, v, cu_seqlens, **options)


def _segment_attention_cuda(q, k, v, cu_seqlens, max_seqlen, *, allow_tf32, deterministic, **options):
    # Forward only, fp32 math in a fixed order: deterministic, no TF32.
    return segment_attention_cuda(q, k, v, cu_seqlens, max_seqlen, **options)


def _cached_step_cuda(*args, allow_tf32, **options):
    return cached_step_cuda(*args, **options)


def _cached_step_torch(*args, allow_tf32, **options):
    return cached_step_torch(*args, **options)


def _cached_step_cpp(*args, allow_tf32, **options):
    return cached_step_cpp(*args, **options)


def _cached_step_triton(*args, **options):
    from .ops.cached_step.triton_backend import cached_step_triton

    return cached_step_triton(*args, **options)


def _segment_attention_torch(q, k, v, cu_seqlens, max_seqlen, *, allow_tf32, deterministic, **options):
    # CPU math is exact fp32 and deterministic already; max_seqlen is not needed.
    return segment_attention_torch(q, k, v, cu_seqlens, **options)


# Launchers by backend name; resolve_backend only returns names that have an entry here.
SEGMENT_ATTENTION_IMPLS = {
    "torch": _segment_attention_torch,
    "triton": _segment_attention_triton,
    "cpp": _segment_attention_cpp,
    "cuda": _segment_attention_cuda,
}
CACHED_STEP_IMPLS = {
    "torch": _cached_step_torch,
    "triton": _cached_step_triton,
    "cpp": _cached_step_cpp,
    "cuda": _cached_step_cuda,
}


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    pattern: str | PatternSpec = "causal",
    segment_len: int | None = None,
    num_memory_tokens: int | None = None,
    score: str = "softmax",
    scale: float | None = None,
    rel_bias: torch.Tensor | None = None,
    silu_norm: float | torch.Tensor | None = None,
    num_targets: torch.Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    causal: bool = True,
    ts_bias: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    backend: str = "auto",
    validate: bool | None = None,
    allow_tf32: bool = False,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Attention over packed variable-length sequences under a Rec2PM pattern.

    Args:
        q, k: ``(total_tokens, heads, head_dim)``, fp16, bf16, fp32 or fp64, same dtype and device.
        v: ``(total_tokens, heads, head_dim_v)``; ``head_dim_v`` may differ from ``head_dim``.
        cu_seqlens: ``(batch + 1,)`` int32 or int64 offsets; sequence ``b`` is
            ``[cu_seqlens[b], cu_seqlens[b + 1])``.  Empty sequences are allowed.
        max_seqlen: an int at least the longest sequence's length, an upper bound that sizes
            the kernels' grids (values above the token count are treated as the token count).
        pattern: which keys each query sees (every pattern is causal; ``causal=False`` below):

            * ``"causal"``: every earlier token.
            * ``"global"`` (Stage 1): every earlier item, and the write tokens of its own unit.
            * ``"kv_memory_overwrite"``: its own unit, and the write block of the previous unit.
            * ``"kv_memory_append"``: its own unit, and the write blocks of all earlier units.

            A ``rec2pm_kernels.PatternSpec`` (the pattern with its ``S`` and ``C``) may be
            passed instead, without ``segment_len`` / ``num_memory_tokens`` beside it.
            For the last three, token ``p`` of a sequence is a write token iff
            ``p % (segment_len + num_memory_tokens) >= segment_len``; a sequence may not end
            inside a write block.
        segment_len, num_memory_tokens: ``S`` and ``C``; required by the interleaved
            patterns, rejected by ``"causal"``.
        score: ``"softmax"``: ``softmax(scale * q.k + bias)`` over visible keys;
            ``"silu"``: ``silu(scale * q.k + bias) / silu_norm`` on visible keys, 0 elsewhere.
        scale: defaults to ``head_dim ** -0.5``.
        rel_bias: optional ``(heads, num_buckets)`` table, or ``(1, num_buckets)`` shared by
            every head; the bias of (row, col) is
            ``rel_bias[h, min(max(λ(row) - λ(col), 0), num_buckets - 1)]`` with λ(p) = p,
            except for ``"global"`` where λ(p) = p - C * (p // (S + C)) (items carry their
            history index, so ``global`` item rows equal ``causal`` over the items alone).
            It receives a gradient.
            A table as long as the longest sequence gives one weight per distance.
        silu_norm: the divisor of ``"silu"``: a number for every sequence (HSTU: its maximum
            sequence length, which production HSTU takes per batch), or a ``(batch,)`` float
            tensor, one per sequence (with ``"causal"`` only, as HSTU's masks); required for
            ``"silu"``, rejected for ``"softmax"``.
        num_targets, contextual_seq_len, max_attn_len, min_full_attn_seq_len: HSTU's masks,
            refinements of ``"causal"`` defined in ``rec2pm_kernels.hstu_masks``:
            ``num_targets`` (``(batch,)`` int) candidates at the end of each sequence see the
            history and themselves, not each other; the first ``contextual_seq_len`` tokens
            see every non-candidate token and are seen by all; ``max_attn_len > 0`` limits
            rows to keys at most that far back, except the last ``min_full_attn_seq_len``
            history rows and the candidates.  Each sequence must be empty or hold at least
            ``contextual_seq_len + num_targets[b]`` tokens.
        causal: HSTU's ``causal`` flag.  ``False`` makes those masks bidirectional (distances
            ``|rank(row) - rank(col)|``): every row sees the keys of other ranks within the
            window on both sides, e.g. all of its sequence without other options (candidates
            still not each other).  Only with ``pattern="causal"`` and without ``rel_bias``
            (a table of distances ``row - col >= 0``); ``ts_bias`` is symmetric and works.
        ts_bias: optional ``(heads or 1, num_time_buckets + 1)`` table of HSTU's timestamp
            bias (``rec2pm_kernels.time_bias``): ``ts_bias[h, bucket(query_time(row) -
            timestamp(col))]`` is added to the score.  Receives a gradient.
        timestamps: ``(total_tokens,)`` int64 time of each token, required with ``ts_bias``.
        query_timestamps: ``(total_tokens,)`` int64 query time of each row; default: the
            next token's timestamp in the same sequence (the last token's own).
        dropout_p: attention dropout on the probabilities (softmax) or SiLU weights, applied
            whenever it is > 0 (pass 0 in evaluation), scaled by ``1 / (1 - dropout_p)``.
        dropout_seed: which weights are dropped is a hash of (seed, packed row index, key
            position, head): equal seeds give equal masks, forward and backward, on the
            ``torch`` and ``triton`` backends alike; ``None`` takes a seed from torch's default
            generator (reproducible under ``torch.manual_seed``).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"`` or ``"cuda"``.  ``"auto"`` runs
            ``triton`` on CUDA tensors; on the CPU ``cpp`` when no gradient is needed and the
            extension is built (except softmax with ``causal`` or ``global`` over sequences
            longer than 512 tokens at head dims up to 16, 384 at wider heads, where ``torch``'s
            fused SDPA is faster: ``backends.cpp_preferred``), else ``torch``.  ``"cpp"``
            (CPU) and ``"cuda"`` (the compiled CUDA kernels, for short blocks such as the
            memory update; ``auto`` does not pick it) are forward only.
            ``rec2pm_kernels.backends()`` says which are available here and why not.
            The HSTU masks, ``ts_bias`` and a per-sequence ``silu_norm`` run on every backend
            but ``cuda``, dropout on ``torch`` and ``triton`` (the same draws for one seed;
            ``auto`` does not pick ``cpp`` for it).
        validate: which checks read tensor contents.  Always, whatever ``validate`` says:
            shapes, dtypes, devices, options and ranges of the Python arguments, the shape
            of a per-sequence ``silu_norm``; and, for CPU inputs (``cu_seqlens`` lives on
            ``q``'s device), its first and last entry, its order, ``max_seqlen`` and complete
            write blocks (O(batch), no device sync).
            ``validate=True``: also those index checks for CUDA tensors (one device sync) and
            a scan for NaN or Inf in ``q``, ``k``, ``v``, ``rel_bias``.  Default ``None``:
            the NaN scan on CPU only, everything on CUDA when ``REC2PM_VALIDATE=1``.
            What skipping costs, on CUDA with ``validate=False``: a ``cu_seqlens`` that does
            not start at 0, decreases or does not end at the token count, or a ``max_seqlen``
            below the longest sequence, leaves rows unwritten (uninitialised memory) or reads
            out of bounds; a sequence ending inside a write block gets an ill-defined pattern;
            NaN or Inf inputs give NaN rows (anywhere).
        allow_tf32: let the ``triton`` backend multiply fp32 inputs in TF32 (faster on
            sm_80+, ~1e-3 relative error).  Default: exact fp32 products.
        deterministic: bit-identical gradients from run to run.  Only the ``triton``
            backend's bias gradient depends on it (float64 atomics by default; per-program
            partial sums and a fixed-order reduction when deterministic); everything else
            is deterministic anyway.  Default ``None``: follow
            ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        ``(total_tokens, heads, head_dim_v)`` in ``v``'s dtype.  Differentiable in ``q``,
        ``k``, ``v``, ``rel_bias`` and ``ts_bias``.
    """
    check.check_qkv(("q", "k", "v"), q, k, v)
    check.check_cu_seqlens("cu_seqlens", cu_seqlens, q.shape[0], q.device)
    batch = cu_seqlens.numel() - 1
    spec = check.check_pattern(pattern, segment_len, num_memory_tokens)
    hstu_mask = HSTUMask(contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal)
    check.check_hstu_options(spec, hstu_mask, num_targets, batch, q.device, rel_bias=rel_bias)
    scale, silu_norm = check.check_score_options(score, scale, silu_norm, rel_bias, q.shape[1], q)
    check.check_per_sequence_silu_norm(spec, silu_norm, batch)
    check.check_time_bias(ts_bias, timestamps, query_timestamps, q.shape[1], q.shape[0], q.device)
    check.check_dropout(dropout_p, dropout_seed)
    differentiable = (q, k, v, rel_bias, ts_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)
    check.check_flag("allow_tf32", allow_tf32)
    check.check_flag("deterministic", deterministic, allow_none=True)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    check_contents = check.should_check_values(q.device, validate)
    lengths = None
    if check.reads_host_indices(cu_seqlens) or check_contents:
        lengths = check.check_cu_seqlens_values("cu_seqlens", cu_seqlens, q.shape[0], "q")
        if spec.interleaved:
            check.check_write_blocks(lengths, spec)
        check.check_num_targets_values(num_targets, lengths, hstu_mask)
        check.check_silu_norm_values(silu_norm)
    check.check_max_seqlen("max_seqlen", max_seqlen, lengths)
    if check_contents:
        check.check_finite(("q", "k", "v", "rel_bias", "ts_bias"), (q, k, v, rel_bias, ts_bias))
    # An upper bound that sizes work: no sequence is longer than all the tokens.
    max_seqlen = min(max_seqlen, q.shape[0])
    longest = int(lengths.max()) if lengths is not None and lengths.numel() else max_seqlen
    if dropout_p > 0 and backend in ("cpp", "cuda"):
        raise ValueError(f"backend={backend!r} is forward only and has no dropout_p; use backend='torch' or 'triton'")
    plain = not hstu_mask.active and num_targets is None and ts_bias is None
    row_lanes = cpp_row_lanes(spec.name, q.shape[2], v.shape[2], q.dtype, plain)
    chosen = resolve_backend(
        backend,
        "segment_attention",
        q.device,
        needs_grad,
        q.dtype,
        prefer_cpp=cpp_preferred(score, spec.name, longest, max(q.shape[2], v.shape[2]), row_lanes=row_lanes)
        and dropout_p == 0,
    )
    extras = dict(hstu_mask=hstu_mask, num_targets=num_targets)
    if dropout_p > 0:  # torch and triton draw the same weights for one seed
        if dropout_seed is None:
            dropout_seed = int(torch.randint(0, 2**62, ()))
        extras.update(dropout_p=float(dropout_p), dropout_seed=dropout_seed)
    if ts_bias is not None:
        if query_timestamps is None:
            query_timestamps = next_timestamps(timestamps, cu_seqlens)
        extras.update(ts_bias=ts_bias, timestamps=timestamps, query_timestamps=query_timestamps)
    if chosen != "torch":
        rel_bias = per_head_table(rel_bias, q.shape[1])
        if ts_bias is not None:
            extras["ts_bias"] = per_head_table(ts_bias, q.shape[1])
    return SEGMENT_ATTENTION_IMPLS[chosen](
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        pattern=spec,
        score=score,
        scale=scale,
        rel_bias=rel_bias,
        silu_norm=silu_norm,
        allow_tf32=allow_tf32,
        deterministic=bool(deterministic),
        **extras,
    )


def per_head_table(table: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """A head-shared ``(1, buckets)`` table as the ``(heads, buckets)`` one the compiled
    kernels index (a differentiable copy: its gradient sums over the heads)."""
    if table is None or table.shape[0] == heads:
        return table
    return table.expand(heads, -1).contiguous()


def cached_step_attention(
    q_new: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens_new: torch.Tensor,
    max_new: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    score: str = "softmax",
    scale: float | None = None,
    rel_bias: torch.Tensor | None = None,
    silu_norm: float | None = None,
    backend: str = "auto",
    validate: bool | None = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """New rows of each user over that user's K/V cache (serving; forward only).

    Args:
        q_new, k_new: ``(total_new, heads, head_dim)`` packed new rows of all users.
        v_new: ``(total_new, heads, head_dim_v)``.
        cu_seqlens_new: ``(batch + 1,)`` int32 or int64 offsets of the new rows; a user may
            have 0 new rows.
        max_new: an int at least the largest number of new rows of one user; an upper bound
            (buffers are sized by the actual counts, grids by ``min(max_new, total_new)``).
        k_cache: ``(batch, capacity, heads, head_dim)``, one layer's keys; slots
            ``[0, cache_seqlens[b])`` hold ``[M ; earlier items of the current block]``.
            Any strides, as long as no two slots share memory (an expanded view is refused);
            the ``triton`` and ``cuda`` backends also need the head dim contiguous (stride 1).
        v_cache: ``(batch, capacity, heads, head_dim_v)``, sharing no memory with ``k_cache``.
        cache_seqlens: ``(batch,)`` int32 (or int64) filled lengths; read, never modified
            (the caller advances it by the number of new rows).
        score, scale, rel_bias, silu_norm, backend, allow_tf32: as in ``segment_attention``;
            for the bias λ(new row t) = ``cache_seqlens[b] + t`` and λ(slot j) = j.
        validate: as in ``segment_attention``; the index checks also cover ``cache_seqlens``
            (>= 0, and room for the new rows within ``capacity``), and the NaN scan also
            covers the filled cache slots ``[0, cache_seqlens[b])``.  Skipped on CUDA, a
            ``cache_seqlens`` past the capacity writes out of bounds.

    Effects:
        Writes the new K/V of user ``b`` into slots ``[cache_seqlens[b], cache_seqlens[b] + n_b)``
        of ``k_cache`` / ``v_cache`` (in place; ``ValueError`` if that passes ``capacity``).

    Returns:
        ``(total_new, heads, head_dim_v)`` in ``v_new``'s dtype: new row ``t`` of user ``b``
        attends to slots ``[0, cache_seqlens[b])`` and new rows ``0..t``.

    Raises ``ValueError`` if gradients are enabled and any input requires grad: call it
    under ``torch.no_grad()`` or ``torch.inference_mode()``.
    """
    check.check_qkv(("q_new", "k_new", "v_new"), q_new, k_new, v_new)
    heads = q_new.shape[1]
    check.check_cu_seqlens("cu_seqlens_new", cu_seqlens_new, q_new.shape[0], q_new.device)
    batch = cu_seqlens_new.numel() - 1
    check.check_caches(q_new, v_new, batch, k_cache, v_cache, cache_seqlens)
    scale, silu_norm = check.check_score_options(score, scale, silu_norm, rel_bias, heads, q_new)
    if isinstance(silu_norm, torch.Tensor):
        raise TypeError("cached_step_attention takes silu_norm as a number, got a tensor")
    if torch.is_grad_enabled():
        for name, t in (
            ("q_new", q_new),
            ("k_new", k_new),
            ("v_new", v_new),
            ("k_cache", k_cache),
            ("v_cache", v_cache),
            ("rel_bias", rel_bias),
        ):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"cached_step_attention is forward only, but {name} requires grad; "
                    "call it under torch.no_grad() or torch.inference_mode()"
                )
    chosen = resolve_backend(backend, "cached_step_attention", q_new.device, needs_grad=False, dtype=q_new.dtype)
    check.check_flag("allow_tf32", allow_tf32)
    check_contents = check.should_check_values(q_new.device, validate)
    counts = None
    if check.reads_host_indices(cu_seqlens_new) or check_contents:
        counts = check.check_cu_seqlens_values("cu_seqlens_new", cu_seqlens_new, q_new.shape[0], "q_new")
        check.check_cache_seqlens_values(cache_seqlens, counts, k_cache.shape[1])
    check.check_max_seqlen("max_new", max_new, counts)
    if check_contents:
        check.check_finite(("q_new", "k_new", "v_new", "rel_bias"), (q_new, k_new, v_new, rel_bias))
        check.check_filled_cache_finite(("k_cache", "v_cache"), (k_cache, v_cache), cache_seqlens)
    # An upper bound that sizes work: no user has more new rows than there are.
    max_new = min(max_new, q_new.shape[0])
    return CACHED_STEP_IMPLS[chosen](
        q_new,
        k_new,
        v_new,
        cu_seqlens_new,
        max_new,
        k_cache,
        v_cache,
        cache_seqlens,
        score=score,
        scale=scale,
        rel_bias=per_head_table(rel_bias, heads),
        silu_norm=silu_norm,
        allow_tf32=allow_tf32,
    )
