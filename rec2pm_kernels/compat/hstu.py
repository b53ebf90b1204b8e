"""Entry points with the argument names, order and defaults of the generative-recommenders
HSTU attention functions, running on rec2pm's kernels.

``hstu_mha`` replaces ``hstu_mha`` / ``pytorch_hstu_mha`` and ``cached_hstu_mha`` replaces
``pytorch_cached_hstu_mha`` (the delta-query form over jagged K/V); the helpers convert the
weights of HSTU's ``RelativeBucketedTimeAndPositionBasedBias`` and its padded timestamps
into rec2pm's bias tables, and a jagged K/V into a cache for ``cached_step_attention``.
What each HSTU argument means here:

=========================  ==========================================================================
``max_seq_len``            bounds every sequence; the SiLU divisor when ``attn_scale`` is None
``alpha``                  multiplies q.k (``scale``); HSTU's research blocks use 1 (no scaling)
``q, k, v``                ``(L, H, D)``, ``(L, H, D)``, ``(L, H, V)`` jagged
``seq_offsets``            ``(B + 1,)`` int32 or int64: ``cu_seqlens``
``causal``                 False: HSTU's bidirectional masks (``|rank(row) - rank(col)|``); no ``rel_bias``
``dropout_pr, training``   attention dropout, applied when ``training`` (seed: ``dropout_seed``)
``num_targets``            ``(B,)``: candidates at the end of each sequence (``rec2pm_kernels.hstu_masks``)
``attn_scale``             None: divide by ``max_seq_len``; a scalar tensor: multiply by it; one
                           value per token ``(L,)``: multiply each row by its token's value
``max_attn_len``           local window (0: none)
``contextual_seq_len``     contextual prefix (0: none)
``min_full_attn_seq_len``  the last tokens keeping full attention under the window (ignored
                           without one, as in HSTU)
``sort_by_length``         accepted, no effect: a scheduling hint of HSTU's Triton kernel (rec2pm's
                           kernels take ragged batches as they come)
``kernel``                 HSTU's ``HammerKernel`` (or its name): ``PYTORCH`` runs ``backend="torch"``,
                           ``TRITON`` / ``TRITON_CC`` ``"triton"``, ``CUDA`` ``"auto"``; None: ``backend``
``enable_tma``             accepted, no effect (rec2pm's Triton kernels do not use TMA)
=========================  ==========================================================================

``delta_hstu_mha`` is ``cached_hstu_mha`` under the name of HSTU's dispatcher.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import validation as check
from ..hstu_masks import HSTUMask, hstu_visible
from ..interface import cached_step_attention, segment_attention

# HSTU's kernel choices, by name, as rec2pm backends.
HAMMER_KERNEL_BACKENDS = {"PYTORCH": "torch", "TRITON": "triton", "TRITON_CC": "triton", "CUDA": "auto"}


def _backend_of(kernel, backend: str) -> str:
    """``backend``, or the one HSTU's ``kernel`` names (an enum member or its name)."""
    if kernel is None:
        return backend
    name = getattr(kernel, "name", kernel)
    if name not in HAMMER_KERNEL_BACKENDS:
        raise ValueError(f"kernel must be one of HSTU's {tuple(HAMMER_KERNEL_BACKENDS)} (or None), got {kernel!r}")
    if backend != "auto":
        raise ValueError(f"pass kernel={name!r} or backend={backend!r}, not both")
    return HAMMER_KERNEL_BACKENDS[name]


def _silu_norm_and_row_scale(attn_scale, max_seq_len: int, total: int):
    """``(silu_norm, per-row factor or None)`` of HSTU's ``attn_scale``."""
    if attn_scale is None:
        return float(max_seq_len), None
    if not isinstance(attn_scale, torch.Tensor):
        raise TypeError(f"attn_scale must be a tensor or None, got {type(attn_scale).__name__}")
    if attn_scale.ndim == 0:
        value = float(attn_scale)
        if not value > 0:
            raise ValueError(f"attn_scale must be > 0, got {value}")
        return 1.0 / value, None
    if attn_scale.shape != (total,):
        raise ValueError(f"attn_scale must be a scalar or have shape (L={total},), got {tuple(attn_scale.shape)}")
    return 1.0, attn_scale


def hstu_mha(
    max_seq_len: int,
    alpha: float,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    causal: bool = True,
    dropout_pr: float = 0.0,
    training: bool = True,
    num_targets: torch.Tensor | None = None,
    attn_scale: torch.Tensor | None = None,
    max_attn_len: int = 0,
    contextual_seq_len: int = 0,
    min_full_attn_seq_len: int = 0,
    sort_by_length: bool = False,
    kernel=None,
    enable_tma: bool = False,
    *,
    rel_bias: torch.Tensor | None = None,
    ts_bias: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
    dropout_seed: int | None = None,
    backend: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor:
    """HSTU attention ``silu(alpha * q.k + bias) / max_seq_len`` under HSTU's masks, times ``v``.

    The positional arguments are HSTU's (see the module docstring); the keyword-only ones
    add rec2pm's: ``rel_bias`` / ``ts_bias`` tables with ``timestamps`` and
    ``query_timestamps`` (see ``relative_bias_tables`` and ``hstu_timestamps``), the dropout
    seed, and ``backend`` / ``validate`` as in ``rec2pm_kernels.segment_attention``.

    Returns ``(L, H, V)`` in ``v``'s dtype, differentiable in ``q``, ``k``, ``v`` and the tables.
    """
    check.check_flag("sort_by_length", sort_by_length)
    check.check_flag("enable_tma", enable_tma)
    backend = _backend_of(kernel, backend)
    silu_norm, row_scale = _silu_norm_and_row_scale(attn_scale, max_seq_len, q.shape[0])
    out = segment_attention(
        q,
        k,
        v,
        seq_offsets,
        max_seq_len,
        score="silu",
        scale=alpha,
        silu_norm=silu_norm,
        rel_bias=rel_bias,
        num_targets=num_targets,
        contextual_seq_len=contextual_seq_len,
        max_attn_len=max_attn_len,
        min_full_attn_seq_len=min_full_attn_seq_len if max_attn_len > 0 else 0,
        causal=causal,
        ts_bias=ts_bias,
        timestamps=timestamps,
        query_timestamps=query_timestamps,
        dropout_p=dropout_pr if training else 0.0,
        dropout_seed=dropout_seed,
        backend=backend,
        validate=validate,
    )
    if row_scale is not None:  # HSTU scales each row's weights: the same as scaling its output
        out = out * row_scale.to(out.dtype)[:, None, None]
    return out


def cached_hstu_mha(
    max_seq_len: int,
    alpha: float,
    delta_q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: torch.Tensor | None = None,
    max_attn_len: int = 0,
    contextual_seq_len: int = 0,
    kernel=None,
    enable_tma: bool = False,
    *,
    backend: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor:
    """The last ``delta`` rows of every sequence over its whole jagged K/V (forward only).

    ``delta_q``: ``(B * delta, H, D)``, the queries of the last ``delta`` tokens of each of
    the ``B`` sequences (the same ``delta`` for all); ``k``, ``v``: ``(L, H, D)`` and
    ``(L, H, V)`` jagged by ``seq_offsets``, the new tokens included.  Row ``t`` of sequence
    ``b`` is position ``n_b - delta + t`` under HSTU's mask of the full sequence.  Without
    masks it runs ``rec2pm_kernels.cached_step_attention`` (C++ on the CPU, Triton on CUDA)
    over a cache built from the jagged K/V; with them, a dense PyTorch pass over the
    ``delta`` rows.  Returns ``(B * delta, H, V)``.
    """
    check.check_flag("enable_tma", enable_tma)
    backend = _backend_of(kernel, backend)
    batch = seq_offsets.numel() - 1
    if batch < 1 or delta_q.shape[0] % batch:
        raise ValueError(f"delta_q must have B * delta rows for B={batch} sequences, got {delta_q.shape[0]}")
    delta = delta_q.shape[0] // batch
    lengths = (seq_offsets[1:] - seq_offsets[:-1]).long()
    if delta and bool((lengths < delta).any()):
        raise ValueError(f"every sequence must hold its delta={delta} new tokens, got lengths {lengths.tolist()}")
    mask = HSTUMask(contextual_seq_len, max_attn_len, 0)
    heads, dim_v = k.shape[1], v.shape[2]
    with torch.no_grad():
        if not mask.active and num_targets is None:
            cache_k, cache_v, filled = jagged_to_kv_cache(k, v, seq_offsets, keep_last=delta)
            new_rows = _last_rows(seq_offsets, delta)
            cu_new = torch.arange(0, batch + 1, device=k.device, dtype=torch.int64) * delta
            return cached_step_attention(
                delta_q,
                k[new_rows],
                v[new_rows],
                cu_new,
                delta,
                cache_k,
                cache_v,
                filled,
                score="silu",
                scale=alpha,
                silu_norm=float(max_seq_len),
                backend=backend,
                validate=validate,
            )
        longest = int(lengths.max()) if batch else 0
        columns = torch.arange(longest, device=k.device)
        # Columns past a sequence read the next one's tokens: finite values the mask hides.
        padded = (seq_offsets[:-1].long()[:, None] + columns[None, :]).clamp(max=max(k.shape[0] - 1, 0))
        kp, vp = k[padded], v[padded]  # (B, N, H, D)
        rows = (lengths[:, None] - delta + torch.arange(delta, device=k.device)[None, :])[:, :, None]
        targets = None if num_targets is None else num_targets.long()[:, None, None]
        seen = hstu_visible(rows, columns[None, None, :], lengths[:, None, None], targets, mask)  # (B, delta, N)
        q = delta_q.reshape(batch, delta, heads, delta_q.shape[-1])
        scores = torch.einsum("bthd,bnhd->bhtn", q, kp) * alpha
        weights = torch.nn.functional.silu(scores) / max_seq_len * seen[:, None]
        out = torch.einsum("bhtn,bnhv->bthv", weights, vp)
        return out.reshape(batch * delta, heads, dim_v)


delta_hstu_mha = cached_hstu_mha  # the name of HSTU's dispatcher for the delta-query form


def _last_rows(seq_offsets: torch.Tensor, delta: int) -> torch.Tensor:
    """Packed indices of the last ``delta`` tokens of each sequence, in order."""
    ends = seq_offsets[1:].long()
    return (ends[:, None] - delta + torch.arange(delta, device=seq_offsets.device)[None, :]).reshape(-1)


def jagged_to_kv_cache(k: torch.Tensor, v: torch.Tensor, seq_offsets: torch.Tensor, keep_last: int = 0, capacity=None):
    """A jagged K/V ``(L, H, D)`` as ``(k_cache, v_cache, cache_seqlens)`` for
    ``cached_step_attention``: sequence ``b``'s first ``n_b - keep_last`` tokens fill slots
    ``[0, n_b - keep_last)`` of a ``(B, capacity, H, D)`` cache (default capacity: the longest
    sequence), leaving room for the ``keep_last`` tokens the next step appends."""
    lengths = (seq_offsets[1:] - seq_offsets[:-1]).long()
    batch = lengths.numel()
    filled = (lengths - keep_last).clamp(min=0)
    capacity = int(lengths.max()) if capacity is None and batch else (capacity or 0)
    if batch and int(lengths.max()) > capacity:
        raise ValueError(f"capacity={capacity} is smaller than the longest sequence ({int(lengths.max())})")
    cache_k = k.new_zeros(batch, capacity, *k.shape[1:])
    cache_v = v.new_zeros(batch, capacity, *v.shape[1:])
    slots = torch.arange(capacity, device=k.device)[None, :]
    used = slots < filled[:, None]
    tokens = (seq_offsets[:-1].long()[:, None] + slots)[used]
    cache_k[used] = k[tokens]
    cache_v[used] = v[tokens]
    return cache_k, cache_v, filled.to(torch.int32)


def relative_bias_tables(bias, max_seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """rec2pm's ``rel_bias`` and ``ts_bias`` from HSTU's ``RelativeBucketedTimeAndPositionBasedBias``.

    ``bias``: the module, or its state dict (keys ending in ``_pos_w`` and ``_ts_w``).  HSTU
    adds ``pos_w[N - 1 - d]`` at distance ``d = row - col`` (``N`` its ``max_seq_len``) and
    ``ts_w[bucket]``, one table for all heads; the result is ``{"rel_bias": (1, N),
    "ts_bias": (1, num_buckets + 1)}``, copies that share no memory with the module.
    """
    if isinstance(bias, torch.nn.Module):
        pos_w, ts_w = bias._pos_w, bias._ts_w
        max_seq_len = max_seq_len or bias._max_seq_len
    elif isinstance(bias, Mapping):
        found = {suffix: [v for key, v in bias.items() if key.endswith(suffix)] for suffix in ("_pos_w", "_ts_w")}
        for suffix, values in found.items():
            if len(values) != 1:
                raise ValueError(f"the state dict must hold exactly one key ending in {suffix!r}, found {len(values)}")
        pos_w, ts_w = found["_pos_w"][0], found["_ts_w"][0]
    else:
        raise TypeError(f"bias must be an nn.Module or a state dict, got {type(bias).__name__}")
    n = max_seq_len or (pos_w.numel() + 1) // 2
    if pos_w.shape != (2 * n - 1,):
        raise ValueError(f"_pos_w must have 2 * max_seq_len - 1 = {2 * n - 1} entries, got {tuple(pos_w.shape)}")
    rel = pos_w.detach()[:n].flip(0)[None].clone()
    return {"rel_bias": rel, "ts_bias": ts_w.detach()[None].clone()}


def hstu_timestamps(all_timestamps: torch.Tensor, seq_offsets: torch.Tensor) -> dict[str, torch.Tensor]:
    """HSTU's padded ``(B, N)`` timestamps as rec2pm's jagged ``timestamps`` and
    ``query_timestamps``, exactly as its bias reads them: row ``i`` is scored at
    ``all_timestamps[b, i + 1]`` (``[b, N - 1]`` for ``i = N - 1``), so the last token of a
    sequence shorter than ``N`` is scored at the padding value that follows it."""
    batch, n = all_timestamps.shape
    following = torch.cat([all_timestamps[:, 1:], all_timestamps[:, n - 1 :]], dim=1)
    lengths = (seq_offsets[1:] - seq_offsets[:-1]).long()
    used = torch.arange(n, device=all_timestamps.device)[None, :] < lengths[:, None]
    return {"timestamps": all_timestamps[used], "query_timestamps": following[used]}
