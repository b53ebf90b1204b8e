"""Triton backend of ``segment_attention``: launchers, ``torch.library`` custom ops, autograd.

``rec2pm::segment_attention_fwd`` returns ``(out, lse)`` and ``rec2pm::segment_attention_bwd``
returns ``(dq, dk, dv, d_rel_bias, d_ts_bias)``; both have fake implementations, and the forward op
carries its autograd formula, so ``torch.compile(fullgraph=True)`` traces through them.

HSTU's masks and per-sequence SiLU divisors run as the kernels' ``HSTU_CAUSAL`` pattern:
the launchers then pass ``num_targets`` (zeros without candidates) and ``silu_norms`` (one
divisor per sequence) and the mask sizes as runtime integers.

Backward determinism: dQ, dK and dV never use atomics.  The bias gradient by default
adds each tile's score gradient with float64 atomics (fast, order-dependent in the last
bits); ``deterministic=True`` (or ``torch.use_deterministic_algorithms(True)``) computes it
with per-program partial sums and a fixed-order reduction instead (the row-block kernel of
``triton_backward.py``).
"""

from __future__ import annotations

import torch
import triton

from ...hstu_masks import HSTUMask
from ...patterns import PATTERN_CODES, SCORE_CODES, PatternSpec
from ..outputs import new_output
from ..triton_codes import HSTU_CAUSAL_CODE, WRITES_BIAS_SUMS, WRITES_DQ
from ..triton_configs import BIAS_WINDOW, bias_grad_precision, configs, heaviness, padded_head_dim
from ..triton_dropout import dropout_args
from ..triton_launch import input_precision, launch, length_bucket
from .triton_backward import segment_bwd_dkdv_kernel, segment_bwd_rows_kernel
from .triton_forward import segment_fwd_kernel


def _switches(q, v, pattern, score, rel_bias, allow_tf32, hstu, dropout_p, time_bias) -> dict:
    return dict(
        HEAD_DIM=q.shape[2],
        HEAD_DIM_V=v.shape[2],
        BLOCK_D=padded_head_dim(q.shape[2]),
        BLOCK_DV=padded_head_dim(v.shape[2]),
        PATTERN=HSTU_CAUSAL_CODE if hstu is not None else PATTERN_CODES[pattern],
        SCORE=SCORE_CODES[score],
        HAS_BIAS=rel_bias is not None,
        HAS_TIME_BIAS=time_bias is not None,
        HAS_DROPOUT=dropout_p > 0,
        INPUT_PRECISION=input_precision(q.dtype, allow_tf32),
    )


def _hstu_inputs(hstu) -> dict:
    """The HSTU tensors and sizes every segment kernel takes (``hstu``: ``None``, or
    ``(num_targets, silu_norms, contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal)``)."""
    num_targets, silu_norms, contextual, window, tail, causal = hstu if hstu is not None else (None, None, 0, 0, 0, 1)
    return dict(
        NUM_TARGETS=num_targets,
        SILU_NORMS=silu_norms,
        contextual_seq_len=contextual,
        max_attn_len=window,
        min_full_attn_seq_len=tail,
        causal=int(causal),
    )


def _time_inputs(time_bias) -> dict:
    """The timestamp-bias tensors and bucket count (``time_bias``: ``None``, or
    ``(ts_bias, timestamps, query_timestamps)``)."""
    table, times, query_times = time_bias if time_bias is not None else (None, None, None)
    return dict(
        TIME_BIAS=table,
        TIMESTAMPS=times,
        QUERY_TIMESTAMPS=query_times,
        NUM_TIME_BUCKETS=table.shape[1] - 1 if table is not None else 0,
    )


def _runtime(q, max_seqlen, segment_len, num_memory_tokens, rel_bias, scale, silu_norm) -> dict:
    """The runtime scalars every segment kernel takes, by parameter name."""
    return dict(
        total_tokens=q.shape[0],
        max_seqlen=max_seqlen,
        S=segment_len if segment_len is not None else 1,
        C=num_memory_tokens if num_memory_tokens is not None else 0,
        NUM_BUCKETS=rel_bias.shape[1] if rel_bias is not None else 1,
        scale=float(scale),
        silu_norm=float(silu_norm),
        SEQ_BUCKET=length_bucket(max_seqlen),
    )


def _strides(**tensors) -> dict:
    """``_strides(q=q)`` -> ``{"stride_qt": q.stride(0), "stride_qh": q.stride(1)}`` (token, head)."""
    return {f"stride_{name}{axis}": t.stride(dim) for name, t in tensors.items() for dim, axis in enumerate("th")}


def _heavy(hstu, dropout_p, time_bias) -> int:
    """How heavy the variant is (``triton_configs.heaviness``: smaller tiles or more warps)."""
    return heaviness(hstu is not None, dropout_p > 0, time_bias is not None)


def _tune_dim(q, v) -> int:
    return max(q.shape[2], v.shape[2])


def segment_forward(
    q,
    k,
    v,
    cu_seqlens,
    max_seqlen,
    pattern,
    segment_len,
    num_memory_tokens,
    score,
    scale,
    rel_bias,
    silu_norm,
    allow_tf32=False,
    config: triton.Config | None = None,
    tile_counts: torch.Tensor | None = None,
    hstu: tuple | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    time_bias: tuple | None = None,
):
    """``(out, lse)``; ``lse`` is ``(H, T)`` fp32 base-2 log-sum-exp for softmax, empty for SiLU.
    ``hstu``: see ``_hstu_inputs``; ``time_bias``: see ``_time_inputs``; dropout as
    ``ops/triton_dropout.py`` draws it.

    ``tile_counts`` (interpreter only): a ``(programs, H)`` int32 buffer that receives the
    number of key tiles each program visited.
    """
    total, heads, _ = q.shape
    batch = cu_seqlens.numel() - 1
    out = new_output(v.shape, dtype=v.dtype, device=v.device)
    lse = new_output((heads, total) if score == "softmax" else (0,), dtype=torch.float32, device=q.device)
    if total == 0 or batch == 0 or max_seqlen == 0:
        return out, lse
    switches = _switches(q, v, pattern, score, rel_bias, allow_tf32, hstu, dropout_p, time_bias)
    args = dict(
        Q=q,
        K=k,
        V=v,
        OUT=out,
        LSE=lse if score == "softmax" else None,
        CU_SEQLENS=cu_seqlens,
        BIAS=rel_bias,
        TILE_COUNTS=tile_counts,
        **_strides(q=q, k=k, v=v, o=out),
        **_runtime(q, max_seqlen, segment_len, num_memory_tokens, rel_bias, scale, silu_norm),
        **_hstu_inputs(hstu),
        **_time_inputs(time_bias),
        **dropout_args(dropout_p, dropout_seed),
    )
    launch(
        segment_fwd_kernel,
        "segment_fwd",
        lambda meta: (batch * triton.cdiv(max_seqlen, meta["BLOCK_M"]), heads),
        args,
        dict(switches, COUNT_TILES=tile_counts is not None),
        dtype=q.dtype,
        head_dim=_tune_dim(q, v),
        device=q.device,
        config=config,
        heavy=_heavy(hstu, dropout_p, time_bias),
    )
    return out, lse


def segment_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens,
    max_seqlen,
    pattern,
    segment_len,
    num_memory_tokens,
    score,
    scale,
    rel_bias,
    silu_norm,
    allow_tf32=False,
    deterministic=False,
    configs_by_kernel: dict | None = None,
    tile_counts: dict | None = None,
    hstu: tuple | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    time_bias: tuple | None = None,
    tables_need_grad: bool = True,
):
    """``(dq, dk, dv, d_rel_bias, d_ts_bias)``; each bias gradient is empty without its bias.

    ``tables_need_grad=False`` (no bias table requires a gradient): the tables' gradients
    are not computed (no atomics, no bias-gradient kernel) and come back as zeros.

    ``configs_by_kernel`` / ``tile_counts``: optional ``{"segment_bwd_dq": ..., "segment_bwd_dkdv": ...}``
    configs and interpreter tile-count buffers, for the tests.
    """
    configs_by_kernel = configs_by_kernel or {}
    tile_counts = tile_counts or {}
    total, heads, _ = q.shape
    batch = cu_seqlens.numel() - 1
    dout = dout.contiguous()
    # Every row of dq and every key row of dk/dv is written by exactly one program (no atomics).
    dq, dk, dv = (new_output(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    buckets = rel_bias.shape[1] if rel_bias is not None else 0
    # float64: the atomic path sums into it directly (``triton_backward.py`` says why).
    dbias = torch.zeros((heads, buckets), dtype=torch.float64, device=q.device)
    ts_bias = time_bias[0] if time_bias is not None else None
    time_buckets = ts_bias.shape[1] if ts_bias is not None else 0
    dtime = torch.zeros((heads, time_buckets), dtype=torch.float32, device=q.device)

    def grads():
        return (
            dq,
            dk,
            dv,
            dbias.to(rel_bias.dtype) if rel_bias is not None else dbias.float(),
            dtime.to(ts_bias.dtype) if ts_bias is not None else dtime,
        )

    if total == 0 or batch == 0 or max_seqlen == 0:
        return grads()
    if score == "softmax":
        # delta = rowsum(dO * O) stands in for sum_j P_ij dP_ij, which the oracle forms from the
        # same rounded dP (so a row with one dominant key cancels exactly there).  Summed in
        # float64 so that only dP's own rounding is left: in fp32 it put dQ and dK of the
        # head-dim-64 cases at 1.07-1.09x the error budget (3 of 40 seeded batches).  The
        # products stay fp32 and only the reduction accumulates in float64, so no float64
        # copy of the output is made (as accurate on those batches).
        delta = (out.float() * dout.float()).sum(-1, dtype=torch.float64).float().transpose(0, 1).contiguous()
    else:  # SiLU needs no row statistics
        lse = delta = None
    switches = _switches(q, v, pattern, score, rel_bias, allow_tf32, hstu, dropout_p, time_bias)
    # What every backward kernel reads, by parameter name (the row-block kernel's outputs
    # are absent where its launch does not write them).
    inputs = dict(
        Q=q,
        K=k,
        V=v,
        DO=dout,
        LSE=lse,
        DELTA=delta,
        CU_SEQLENS=cu_seqlens,
        BIAS=rel_bias,
        **_strides(q=q, k=k, v=v, do=dout),
        **_runtime(q, max_seqlen, segment_len, num_memory_tokens, rel_bias, scale, silu_norm),
        **_hstu_inputs(hstu),
        **_time_inputs(time_bias),
        **dropout_args(dropout_p, dropout_seed),
    )
    common = dict(dtype=q.dtype, head_dim=_tune_dim(q, v), device=q.device, heavy=_heavy(hstu, dropout_p, time_bias))
    # The timestamp bias's gradient always comes from the deterministic kernel (its buckets
    # are data-dependent); the relative one's then comes from the same pass.
    atomics = rel_bias is not None and not deterministic and time_bias is None and tables_need_grad

    counts = tile_counts.get("segment_bwd_dkdv")
    launch(
        segment_bwd_dkdv_kernel,
        "segment_bwd_dkdv",
        lambda meta: (batch * triton.cdiv(max_seqlen, meta["BLOCK_N"]), heads),
        dict(
            inputs,
            DK=dk,
            DV=dv,
            # Written only with bias_atomics (a runtime flag, so one binary serves both).
            DBIAS=dbias if rel_bias is not None else None,
            TILE_COUNTS=counts,
            **_strides(dk=dk, dv=dv),
            bias_atomics=int(atomics),
        ),
        dict(switches, COUNT_TILES=counts is not None),
        config=configs_by_kernel.get("segment_bwd_dkdv"),
        reset_to_zero=("DBIAS",) if atomics else (),
        notes={"bias_atomics": atomics},
        **common,
    )

    counts = tile_counts.get("segment_bwd_dq")
    launch(
        segment_bwd_rows_kernel,
        "segment_bwd_dq",
        lambda meta: (batch * triton.cdiv(max_seqlen, meta["BLOCK_M"]), heads),
        dict(inputs, DQ=dq, PARTIAL=None, TIME_PARTIAL=None, TILE_COUNTS=counts, **_strides(dq=dq)),
        dict(switches, WRITES=WRITES_DQ, COUNT_TILES=counts is not None, WINDOW=BIAS_WINDOW),
        config=configs_by_kernel.get("segment_bwd_dq"),
        **common,
    )

    if tables_need_grad and ((rel_bias is not None and not atomics) or time_bias is not None):
        bias_configs = configs("segment_bwd_bias", q.dtype, _tune_dim(q, v), heavy=common["heavy"])
        config = configs_by_kernel.get("segment_bwd_bias") or bias_configs[0]
        programs = batch * triton.cdiv(max_seqlen, config.kwargs["BLOCK_M"])
        # float64 partial sums (``triton_backward.py`` says why).
        partial = torch.zeros((programs, heads, buckets), dtype=torch.float64, device=q.device)
        time_partial = torch.zeros((programs, heads, time_buckets), dtype=torch.float64, device=q.device)
        launch(
            segment_bwd_rows_kernel,
            "segment_bwd_bias",
            lambda meta: (programs, heads),
            dict(
                inputs,
                DQ=None,  # not written; dq's strides only fill the kernel's DQ tuple
                PARTIAL=partial if rel_bias is not None else None,
                TIME_PARTIAL=time_partial if time_bias is not None else None,
                TILE_COUNTS=None,
                **_strides(dq=dq),
            ),
            dict(
                switches,
                WRITES=WRITES_BIAS_SUMS,
                COUNT_TILES=False,
                WINDOW=BIAS_WINDOW,
                INPUT_PRECISION=bias_grad_precision(
                    switches["INPUT_PRECISION"],
                    max(switches["BLOCK_D"], switches["BLOCK_DV"]),
                    rel_bias is not None,
                    time_bias is not None,
                ),
            ),
            config=config,
            **common,
        )
        dbias, dtime = (p.sum(0).float() for p in (partial, time_partial))
    return grads()


# ---------------------------------------------------------------------------------------
# torch.library custom ops


@torch.library.custom_op("rec2pm::segment_attention_fwd", mutates_args=())
def segment_attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    pattern: str,
    segment_len: int,
    num_memory_tokens: int,
    score: str,
    scale: float,
    rel_bias: torch.Tensor | None,
    silu_norm: float,
    allow_tf32: bool,
    deterministic: bool,
    num_targets: torch.Tensor | None = None,
    silu_norms: torch.Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    causal: bool = True,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    ts_bias: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher; ``segment_len = num_memory_tokens = 0`` for ``causal``, ``silu_norm = 1`` for
    softmax.  HSTU's masks run when ``num_targets`` is given (with ``silu_norms``), its
    timestamp bias when ``ts_bias`` is (with both timestamp tensors)."""
    return segment_forward(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        pattern,
        segment_len or None,
        num_memory_tokens if segment_len else None,
        score,
        scale,
        rel_bias,
        silu_norm,
        allow_tf32,
        hstu=_hstu_tuple(num_targets, silu_norms, contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal),
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        time_bias=(ts_bias, timestamps, query_timestamps) if ts_bias is not None else None,
    )


def _hstu_tuple(num_targets, silu_norms, contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal):
    if num_targets is None:
        return None
    return (num_targets, silu_norms, contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal)


def _op_arguments(op) -> tuple[str, ...]:
    """A custom op's argument names, in its schema's order."""
    return tuple(argument.name for argument in op._opoverload._schema.arguments)


def _named_arguments(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """A call's arguments by name (those left at their defaults are absent)."""
    return dict(zip(names, args, strict=False), **kwargs)


@segment_attention_fwd_op.register_fake
def _segment_attention_fwd_fake(*args, **kwargs):
    named = _named_arguments(_FWD_ARGS, args, kwargs)
    q, v = named["q"], named["v"]
    lse_shape = (q.shape[1], q.shape[0]) if named["score"] == "softmax" else (0,)
    return v.new_empty(v.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("rec2pm::segment_attention_bwd", mutates_args=())
def segment_attention_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    pattern: str,
    segment_len: int,
    num_memory_tokens: int,
    score: str,
    scale: float,
    rel_bias: torch.Tensor | None,
    silu_norm: float,
    allow_tf32: bool,
    deterministic: bool,
    num_targets: torch.Tensor | None = None,
    silu_norms: torch.Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    causal: bool = True,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    ts_bias: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
    tables_need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher: ``(dq, dk, dv, d_rel_bias, d_ts_bias)`` (a bias gradient is ``(H, 0)``
    without its bias, zeros when ``tables_need_grad`` is False)."""
    return segment_backward(
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens,
        max_seqlen,
        pattern,
        segment_len or None,
        num_memory_tokens if segment_len else None,
        score,
        scale,
        rel_bias,
        silu_norm,
        allow_tf32,
        deterministic,
        hstu=_hstu_tuple(num_targets, silu_norms, contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal),
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        time_bias=(ts_bias, timestamps, query_timestamps) if ts_bias is not None else None,
        tables_need_grad=tables_need_grad,
    )


@segment_attention_bwd_op.register_fake
def _segment_attention_bwd_fake(*args, **kwargs):
    named = _named_arguments(_BWD_ARGS, args, kwargs)
    q, k, v = named["q"], named["k"], named["v"]

    def table_grad(table):
        return table.new_empty(table.shape) if table is not None else q.new_empty((q.shape[1], 0), dtype=torch.float32)

    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        *map(table_grad, (named["rel_bias"], named.get("ts_bias"))),
    )


# The forward op's inputs in its schema order (read from the schema, so never restated);
# autograd hands them over as a tuple and wants one gradient per input, so both sides go
# through these names.
_FWD_ARGS = _op_arguments(segment_attention_fwd_op)
_BWD_ARGS = _op_arguments(segment_attention_bwd_op)
_FWD_TENSORS = ("q", "k", "v", "cu_seqlens")
_FWD_OPTIONS = tuple(name for name in _FWD_ARGS if name not in _FWD_TENSORS)
# Tensors: saved for backward, not kept as options.
_SAVED_OPTIONS = ("rel_bias", "num_targets", "silu_norms", "ts_bias", "timestamps", "query_timestamps")


def _setup_context(ctx, inputs, output):
    named = dict(zip(_FWD_ARGS, inputs, strict=True))
    out, lse = output
    saved = [named[key] for key in _SAVED_OPTIONS]
    ctx.save_for_backward(named["q"], named["k"], named["v"], out, lse, named["cu_seqlens"], *saved)
    ctx.options = {key: named[key] for key in _FWD_OPTIONS if key not in _SAVED_OPTIONS}


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, *saved = ctx.saved_tensors
    tensors = dict(zip(_SAVED_OPTIONS, saved, strict=True))
    # needs_input_grad follows the schema but stops before the trailing arguments left at
    # their defaults (14 of 25 entries without a timestamp bias): those need no gradient.
    wanted = {name for name, needed in zip(_FWD_ARGS, ctx.needs_input_grad, strict=False) if needed}
    tables = {"rel_bias", "ts_bias"} & wanted
    dq, dk, dv, dbias, dtime = segment_attention_bwd_op(
        dout, q, k, v, out, lse, cu_seqlens, **tensors, **ctx.options, tables_need_grad=bool(tables)
    )
    grads = {"q": dq, "k": dk, "v": dv}
    if "rel_bias" in tables:
        grads["rel_bias"] = dbias
    if "ts_bias" in tables:
        grads["ts_bias"] = dtime
    return tuple(grads.get(name) for name in _FWD_ARGS)  # None for every input without a gradient


segment_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def segment_attention_triton(
    q,
    k,
    v,
    cu_seqlens,
    max_seqlen,
    *,
    pattern: PatternSpec,
    score,
    scale,
    rel_bias,
    silu_norm,
    allow_tf32=False,
    deterministic=False,
    hstu_mask: HSTUMask | None = None,
    num_targets: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    ts_bias: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
):
    """Arguments as ``rec2pm_kernels.segment_attention`` after validation (``query_timestamps``
    filled in with ``ts_bias``).  The custom op
    takes the pattern as its plain fields (``S = C = 0`` for ``causal``), and HSTU's masks or
    a per-sequence ``silu_norm`` as ``num_targets`` (zeros without candidates), one divisor
    per sequence and the mask sizes."""
    if q.dtype == torch.float64:
        raise ValueError("backend='triton' supports fp32, fp16 and bf16 inputs, got q of dtype torch.float64")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cu_seqlens = cu_seqlens.contiguous()  # read by raw pointer, element after element
    rel_bias = rel_bias.contiguous() if rel_bias is not None else None
    if ts_bias is not None:
        ts_bias = ts_bias.contiguous()
        timestamps, query_timestamps = (t.to(torch.int64).contiguous() for t in (timestamps, query_timestamps))
    hstu_mask = hstu_mask or HSTUMask()
    per_sequence = isinstance(silu_norm, torch.Tensor)
    silu_norms = None
    if hstu_mask.active or num_targets is not None or per_sequence:  # the HSTU_CAUSAL kernels
        batch = cu_seqlens.numel() - 1
        if num_targets is None:
            num_targets = torch.zeros(batch, dtype=torch.int32, device=q.device)
        num_targets = num_targets.to(torch.int32).contiguous()
        norm = silu_norm if per_sequence else torch.full((batch,), 1.0 if silu_norm is None else float(silu_norm))
        silu_norms = norm.to(device=q.device, dtype=torch.float32).contiguous()
        silu_norm = 1.0
    out, _ = segment_attention_fwd_op(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen=int(max_seqlen),
        pattern=pattern.name,
        segment_len=pattern.segment_len or 0,
        num_memory_tokens=pattern.num_memory_tokens or 0,
        score=score,
        scale=float(scale),
        rel_bias=rel_bias,
        silu_norm=float(silu_norm) if silu_norm is not None else 1.0,
        allow_tf32=bool(allow_tf32),
        deterministic=bool(deterministic),
        num_targets=num_targets if silu_norms is not None else None,
        silu_norms=silu_norms,
        **hstu_mask.as_kwargs(),
        dropout_p=float(dropout_p),
        dropout_seed=int(dropout_seed or 0),
        ts_bias=ts_bias,
        timestamps=timestamps if ts_bias is not None else None,
        query_timestamps=query_timestamps if ts_bias is not None else None,
    )
    return out
