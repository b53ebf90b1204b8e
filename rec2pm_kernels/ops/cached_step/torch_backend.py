"""PyTorch backend of ``cached_step_attention``: one padded batched call, no Python loop.

The new K/V are first appended into the cache in place; then every user's new rows attend
to the cache prefix ``[0, cache_seqlens[b] + t]``.  Slots past a user's last written slot
are zeroed in the key/value views the scores use, so stale or uninitialised cache memory
(possibly NaN) can never leak into a row through a zero probability.
"""

from __future__ import annotations

import torch

from ...patterns import bias_bucket
from ...varlen import prepare_sequence_and_position_ids
from ..torch_math import masked_attention


def append_to_cache(k_new, v_new, cu_seqlens_new, k_cache, v_cache, cache_seqlens):
    """Write user b's new K/V into slots ``[cache_seqlens[b], cache_seqlens[b] + n_b)``.

    Returns ``(user, t)`` of every new token: its user and its index among that user's rows.
    """
    user, t = prepare_sequence_and_position_ids(cu_seqlens_new.to(k_new.device), k_new.shape[0])
    slot = cache_seqlens.long()[user] + t
    k_cache[user, slot] = k_new
    v_cache[user, slot] = v_new
    return user, t


def cached_step_torch(
    q_new,
    k_new,
    v_new,
    cu_seqlens_new,
    max_new,
    k_cache,
    v_cache,
    cache_seqlens,
    *,
    score: str,
    scale: float,
    rel_bias: torch.Tensor | None,
    silu_norm: float | None,
) -> torch.Tensor:
    """Arguments as ``rec2pm_kernels.cached_step_attention`` after validation."""
    total, heads, dv = v_new.shape
    user, t = append_to_cache(k_new, v_new, cu_seqlens_new, k_cache, v_cache, cache_seqlens)
    if total == 0:
        return v_new.new_zeros((0, heads, dv))
    device = q_new.device
    batch = cache_seqlens.numel()
    cached = cache_seqlens.long()
    counts = (cu_seqlens_new[1:] - cu_seqlens_new[:-1]).long()
    # Host-side sizes of the padded batch from the actual counts (one sync); max_new is only
    # an upper bound, and sizing by it could allocate far more than the rows need.
    n_max = int(counts.max())
    ends = cached + counts  # one past each user's last written slot
    k_min, k_max = (int(x) for x in torch.aminmax(ends))

    q_pad = q_new.new_zeros((batch, n_max, heads, q_new.shape[-1]))
    q_pad[user, t] = q_new
    slots = torch.arange(k_max, device=device)
    keys, values = k_cache[:, :k_max], v_cache[:, :k_max]
    if k_min < k_max:  # ragged: zero the unwritten tails (a copy), so stale NaN cannot leak
        unwritten = (slots[None, :] >= ends[:, None])[:, :, None, None]  # (B, K, 1, 1)
        keys, values = keys.masked_fill(unwritten, 0), values.masked_fill(unwritten, 0)

    row_pos = cached[:, None] + torch.arange(n_max, device=device)[None, :]  # λ(new row t), (B, N)
    # One new row per user over equal prefixes (the usual serving step): every slot is
    # visible, and SDPA runs without a mask.
    mask = None if n_max == 1 and k_min == k_max else (slots[None, None, :] <= row_pos[:, :, None])[:, None]
    qh, kh, vh = q_pad.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
    bias = None
    if rel_bias is not None:
        bucket = bias_bucket(row_pos[:, :, None], slots[None, None, :], rel_bias.shape[1])
        bias = rel_bias.to(q_new.dtype)[:, bucket].transpose(0, 1)  # (B, H, N, K)
    out = masked_attention(qh, kh, vh, mask, bias, score=score, scale=scale, silu_norm=silu_norm)
    return out.transpose(1, 2)[user, t].to(v_new.dtype)
