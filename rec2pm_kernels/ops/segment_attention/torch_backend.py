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
4. Autograd keeps every chunk's probabilities for backward when the scores are SiLU or
   the bias table needs a gradient (SDPA's fused CPU path keeps only row statistics).  When
   those would exceed ``max_chunk_elements`` in all, each chunk is checkpointed instead, so
   backward holds one chunk's scores at a time (16k tokens stay within a few hundred MB).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ...patterns import PatternSpec, bias_bucket
from ..torch_math import masked_attention

# Entries of one chunk's score tensor (G * H * rows * keys): 2**24 fp32 scores = 64 MiB.
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 24
# Work-driven chunking: about this many chunks per sequence, none shorter than MIN_CHUNK_ROWS.
CHUNKS_PER_SEQUENCE = 8
MIN_CHUNK_ROWS = 256


def row_chunks(pattern: PatternSpec, length: int, per_row: int, max_chunk_elements: int) -> list[tuple[int, int, int]]:
    """``(r0, r1, k0)`` for each chunk of rows ``[r0, r1)`` and its first key ``k0``.

    ``per_row``: score entries of one row over all ``length`` keys (``G * H * length``).
    """
    by_memory = max(1, max_chunk_elements // per_row)
    if pattern.name == "kv_memory_overwrite":
        unit = pattern.segment_len + pattern.num_memory_tokens
        by_work = unit * max(1, MIN_CHUNK_ROWS // unit)  # whole units: keys start one write block back
    else:
        by_work = max(MIN_CHUNK_ROWS, -(-length // CHUNKS_PER_SEQUENCE))
    rows = min(by_memory, by_work)
    return [(r0, min(r0 + rows, length), pattern.first_visible_column(r0)) for r0 in range(0, length, rows)]


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


def _attend_chunk(qc, kc, vc, rows, cols, rel_bias, pattern: PatternSpec, score, scale, silu_norm):
    """One chunk: ``qc (G, H, R, D)`` against ``kc (G, H, K, D)``, ``vc (G, H, K, Dv)``."""
    mask = pattern.visible(rows[:, None], cols[None, :])
    bias = None
    if rel_bias is not None:
        lam_r = pattern.bias_positions(rows)
        lam_c = pattern.bias_positions(cols)
        bias = rel_bias.to(qc.dtype)[:, bias_bucket(lam_r[:, None], lam_c[None, :], rel_bias.shape[1])]
    return masked_attention(qc, kc, vc, mask, bias, score=score, scale=scale, silu_norm=silu_norm)


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
    silu_norm: float | None,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Arguments as ``rec2pm_kernels.segment_attention`` after validation (``scale`` filled in,
    the pattern as a ``PatternSpec``)."""
    total, heads, _ = q.shape
    dv = v.shape[-1]
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    groups = group_by_length(lengths)
    if not groups:
        # No tokens: an empty output that still carries (zero) gradients to every input.
        anchor = q.sum() + k.sum() + v.sum() + (0 if rel_bias is None else rel_bias.sum())
        return v.new_zeros((total, heads, dv)) + 0 * anchor.to(v.dtype)

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, rel_bias))
    device = q.device
    starts_all = torch.tensor(bounds[:-1], device=device)
    pieces, token_order = [], []
    for group in groups:
        longest = lengths[group[0]]
        idx = torch.tensor(group, device=device)
        offsets = torch.arange(longest, device=device)
        lens = torch.tensor([lengths[i] for i in group], device=device)
        valid = offsets[None, :] < lens[:, None]
        # Padded slots read token 0 of the sequence: finite values that causality hides.
        tok = starts_all[idx][:, None] + torch.where(valid, offsets[None, :], 0)
        qg, kg, vg = (x[tok].transpose(1, 2) for x in (q, k, v))  # (G, H, L, D)
        chunks = row_chunks(pattern, longest, len(group) * heads * longest, max_chunk_elements)
        saved = len(group) * heads * sum((r1 - r0) * (r1 - k0) for r0, r1, k0 in chunks)
        keeps_scores = score == "silu" or (rel_bias is not None and rel_bias.requires_grad)
        use_checkpoint = needs_grad and keeps_scores and len(chunks) > 1 and saved > max_chunk_elements
        outs = []
        for r0, r1, k0 in chunks:
            rows = torch.arange(r0, r1, device=device)
            cols = torch.arange(k0, r1, device=device)
            args = (
                qg[:, :, r0:r1],
                kg[:, :, k0:r1],
                vg[:, :, k0:r1],
                rows,
                cols,
                rel_bias,
                pattern,
                score,
                scale,
                silu_norm,
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
