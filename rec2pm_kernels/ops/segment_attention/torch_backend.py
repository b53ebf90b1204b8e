"""PyTorch backend of ``segment_attention``: differentiable, vectorised, bounded memory.

How it works:

1. Sequences are sorted by length and grouped so that padding wastes at most half of a
   group (a group's shortest sequence is at least half its longest).  A group is gathered
   into a padded ``(G, H, L, D)`` batch.
2. Rows are processed in chunks ``[r0, r1)``; keys run over ``[k0, r1)`` only, since every
   pattern is causal and ``kv_memory_overwrite`` forgets everything before the previous
   write block.  So chunks skip work as well as bound memory: about 8 chunks per sequence
   leave ~56% of the dense work for the causal-like patterns, and unit-aligned chunks make
   ``kv_memory_overwrite`` linear in the length.  No chunk's scores exceed
   ``max_chunk_elements`` entries.
3. The chunk's mask comes from ``rec2pm_kernels.patterns.visible`` on positions, and is
   the same for every sequence of the group: padded columns lie after every real row, so
   causality already hides them.  Softmax runs through ``scaled_dot_product_attention``
   with an additive mask (0 / -inf, plus the bias); SiLU is an einsum.
   HSTU's masks (``rec2pm_kernels.hstu_masks``) depend on each sequence's length and
   candidate count, so with them the mask is built per sequence, ``(G, 1, rows, keys)``;
   contextual and bidirectional rows see ahead, so their chunk's keys run further.
4. Autograd keeps every chunk's probabilities for backward when the scores are SiLU,
   dropout is on or a bias table needs a gradient (SDPA's fused CPU path keeps only row
   statistics).  Dropout draws are a hash of (seed, row, key, head), the same however rows
   are grouped and chunked, so a checkpointed chunk redraws its mask in backward.  When
   those would exceed ``max_chunk_elements`` in all, each chunk is checkpointed instead, so
   backward holds one chunk's scores at a time (16k tokens stay within a few hundred MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ...hstu_masks import HSTUMask, hstu_visible
from ...patterns import PatternSpec, bias_bucket
from ...time_bias import time_bucket
from ..torch_math import dropout_keep, masked_attention

# Entries of one chunk's score tensor (G * H * rows * keys): 2**24 fp32 scores = 64 MiB.
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 24
# Work-driven chunking: about this many chunks per sequence, none shorter than MIN_CHUNK_ROWS.
CHUNKS_PER_SEQUENCE = 8
MIN_CHUNK_ROWS = 256


def row_chunks(
    pattern: PatternSpec, hstu_mask: HSTUMask, has_targets: bool, length: int, per_row: int, max_chunk_elements: int
) -> list[tuple[int, int, int, int]]:
    """``(r0, r1, k0, k1)`` for each chunk of rows ``[r0, r1)`` and its keys ``[k0, k1)``.

    ``per_row``: score entries of one row over all ``length`` keys (``G * H * length``).
    """
    by_memory = max(1, max_chunk_elements // per_row)
    if pattern.name == "kv_memory_overwrite":
        unit = pattern.segment_len + pattern.num_memory_tokens
        by_work = unit * max(1, MIN_CHUNK_ROWS // unit)  # whole units: keys start one write block back
    else:
        by_work = max(MIN_CHUNK_ROWS, -(-length // CHUNKS_PER_SEQUENCE))
    rows = min(by_memory, by_work)
    chunks = []
    for r0 in range(0, length, rows):
        r1 = min(r0 + rows, length)
        k0 = max(pattern.first_visible_column(r0), hstu_mask.first_visible_column(r0, has_targets))
        chunks.append((r0, r1, k0, hstu_mask.column_end(r0, r1, length, has_targets)))
    return chunks


def group_by_length(lengths: list[int]) -> list[list[int]]:
    """Sequence indices grouped for padding: sorted by length, longest first; each group's
    shortest sequence is at least half its longest.  Empty sequences are left out."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and 2 * lengths[i] >= lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@dataclass
class GroupInputs:
    """What one padded group of ``G`` sequences adds to the shared options: per-sequence
    first tokens, lengths, candidate counts and SiLU divisors, and per-token times ``(G, L)``."""

    starts: torch.Tensor
    lengths: torch.Tensor
    num_targets: torch.Tensor | None
    silu_norm: float | torch.Tensor | None
    key_times: torch.Tensor | None
    query_times: torch.Tensor | None
    dropout_seed: int | None


@dataclass(frozen=True)
class AttentionOptions:
    """The options of one call that every group and chunk shares."""

    pattern: PatternSpec
    hstu_mask: HSTUMask
    score: str
    scale: float
    dropout_p: float
    fused_softmax: bool = True


def _chunk_mask(rows, cols, group: GroupInputs, options: AttentionOptions) -> torch.Tensor:
    """``(rows, keys)``, or ``(G, 1, rows, keys)`` when the mask depends on the sequence."""
    if not options.hstu_mask.active and group.num_targets is None:
        return options.pattern.visible(rows[:, None], cols[None, :])
    targets = None if group.num_targets is None else group.num_targets[:, None, None]
    lengths = group.lengths[:, None, None]
    seen = hstu_visible(rows[None, :, None], cols[None, None, :], lengths, targets, options.hstu_mask)
    # Padding rows (discarded) see the first key, so that no softmax row is empty: a NaN
    # there would reach the real gradients through backward.
    padding = (rows[None, :, None] >= lengths) & (cols[None, None, :] == cols[0])
    return (seen | padding)[:, None]


def _chunk_bias(rows, cols, rel_bias, ts_bias, group: GroupInputs, options: AttentionOptions, dtype):
    bias = None
    if rel_bias is not None:
        lam_r = options.pattern.bias_positions(rows)
        lam_c = options.pattern.bias_positions(cols)
        bias = rel_bias.to(dtype)[:, bias_bucket(lam_r[:, None], lam_c[None, :], rel_bias.shape[1])]
    if ts_bias is not None:
        query = group.query_times[:, rows[0] : rows[-1] + 1, None]
        key = group.key_times[:, None, cols[0] : cols[-1] + 1]
        buckets = time_bucket(query, key, ts_bias.shape[1] - 1)  # (G, R, K)
        by_time = ts_bias.to(dtype)[:, buckets].transpose(0, 1)  # (G, heads or 1, R, K)
        bias = by_time if bias is None else bias + by_time
    return bias


def _attend_chunk(qc, kc, vc, rows, cols, rel_bias, ts_bias, group: GroupInputs, options: AttentionOptions):
    """One chunk: ``qc (G, H, R, D)`` against ``kc (G, H, K, D)``, ``vc (G, H, K, Dv)``."""
    mask = _chunk_mask(rows, cols, group, options)
    bias = _chunk_bias(rows, cols, rel_bias, ts_bias, group, options, qc.dtype)
    keep = None
    if options.dropout_p > 0:
        row_tokens = group.starts[:, None] + rows[None, :]
        keep = dropout_keep(group.dropout_seed, row_tokens, cols, qc.shape[1], options.dropout_p)
    silu_norm = group.silu_norm
    if isinstance(silu_norm, torch.Tensor):
        silu_norm = silu_norm.to(qc.dtype)[:, None, None, None]
    return masked_attention(
        qc,
        kc,
        vc,
        mask,
        bias,
        score=options.score,
        scale=options.scale,
        silu_norm=silu_norm,
        keep=keep,
        dropout_p=options.dropout_p,
        fused=options.fused_softmax,
    )


def segment_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    pattern: PatternSpec,
    score: str,
    scale: float,
    rel_bias: torch.Tensor | None,
    silu_norm: float | torch.Tensor | None,
    hstu_mask: HSTUMask | None = None,
    num_targets: torch.Tensor | None = None,
    ts_bias: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Arguments as ``rec2pm_kernels.segment_attention`` after validation (``scale`` filled in,
    the pattern as a ``PatternSpec``, the HSTU sizes as an ``HSTUMask``, ``query_timestamps``
    and ``dropout_seed`` filled in when ``ts_bias`` and dropout are used)."""
    hstu_mask = hstu_mask or HSTUMask()
    total, heads, _ = q.shape
    dv = v.shape[-1]
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    groups = group_by_length(lengths)
    tables = tuple(t for t in (rel_bias, ts_bias) if t is not None)
    if not groups:
        # No tokens: an empty output that still carries (zero) gradients to every input.
        anchor = q.sum() + k.sum() + v.sum() + sum(t.sum() for t in tables)
        return v.new_zeros((total, heads, dv)) + 0 * anchor.to(v.dtype)

    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *tables))
    # SDPA's fused kernel keeps only row statistics and recomputes the probabilities in
    # backward.  In fp32 its gradients measured up to 6x the dense computation's error (dV at
    # 3.4 eps * max|dV| against 0.6 on the kv-memory patterns, AVX-512), past the error budget;
    # so fp32 gradients take the explicit softmax, whose probabilities autograd keeps (the
    # checkpointing below still bounds the memory).  It costs 5% (Amazon-length histories) to
    # 30% (200 tokens) of a SASRec training step on the CPU; forward-only calls stay fused.
    fused_softmax = not (needs_grad and q.dtype == torch.float32)
    options = AttentionOptions(pattern, hstu_mask, score, scale, dropout_p, fused_softmax)
    keeps_scores = score == "silu" or dropout_p > 0 or any(t.requires_grad for t in tables) or not fused_softmax
    device = q.device
    starts_all = torch.tensor(bounds[:-1], device=device)
    has_targets = num_targets is not None
    pieces, token_order = [], []
    for members in groups:
        longest = lengths[members[0]]
        idx = torch.tensor(members, device=device)
        offsets = torch.arange(longest, device=device)
        lens = torch.tensor([lengths[i] for i in members], device=device)
        valid = offsets[None, :] < lens[:, None]
        # Padded slots read token 0 of the sequence: finite values that the mask hides.
        tok = starts_all[idx][:, None] + torch.where(valid, offsets[None, :], 0)
        qg, kg, vg = (x[tok].transpose(1, 2) for x in (q, k, v))  # (G, H, L, D)
        group = GroupInputs(
            starts=starts_all[idx],
            lengths=lens,
            num_targets=num_targets[idx].to(torch.int64) if has_targets else None,
            silu_norm=silu_norm[idx] if isinstance(silu_norm, torch.Tensor) else silu_norm,
            key_times=None if ts_bias is None else timestamps[tok].to(torch.int64),
            query_times=None if ts_bias is None else query_timestamps[tok].to(torch.int64),
            dropout_seed=dropout_seed,
        )
        chunks = row_chunks(
            pattern, hstu_mask, has_targets, longest, len(members) * heads * longest, max_chunk_elements
        )
        saved = len(members) * heads * sum((r1 - r0) * (k1 - k0) for r0, r1, k0, k1 in chunks)
        use_checkpoint = needs_grad and keeps_scores and len(chunks) > 1 and saved > max_chunk_elements
        outs = []
        for r0, r1, k0, k1 in chunks:
            args = (
                qg[:, :, r0:r1],
                kg[:, :, k0:k1],
                vg[:, :, k0:k1],
                torch.arange(r0, r1, device=device),
                torch.arange(k0, k1, device=device),
                rel_bias,
                ts_bias,
                group,
                options,
            )
            if use_checkpoint:
                outs.append(checkpoint(_attend_chunk, *args, use_reentrant=False))
            else:
                outs.append(_attend_chunk(*args))
        out_g = torch.cat(outs, dim=2).transpose(1, 2)  # (G, L, H, Dv)
        pieces.append(out_g[valid])
        token_order.append(tok[valid])
    values = torch.cat(pieces)
    order = torch.cat(token_order)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    return values[inverse].to(v.dtype)
