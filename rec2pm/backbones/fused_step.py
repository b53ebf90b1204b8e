"""The decoder's serving step in one C++ call (``rec2pm_kernels._C.decoder_step``), and its
causal forward pass in inference (``decoder_forward``: the same code over no caches).

On the CPU a step of a few new events through 16 small layers costs mostly the overhead
of the Python and dispatcher calls per op (about 60 of them per layer); the fused step runs
every layer's norms, projections, gating, residuals and cached-step attention in one call.
``Decoder.step``, ``Decoder.prefill`` and ``Decoder.forward`` (causal pattern) take it when
it applies (see ``applies``) and otherwise run block by block;
``tests/model/test_fused_step.py`` checks that both give the same outputs and caches.
"""

from __future__ import annotations

import torch

from rec2pm_kernels import _extension
from rec2pm_kernels import validation as check

BACKBONE_CODES = {"sasrec": 0, "hstu": 1}


def available() -> bool:
    C = _extension.C
    return C is not None and hasattr(C, "decoder_step") and hasattr(C, "decoder_forward")


def applies(decoder, x_new: torch.Tensor, caches) -> bool:
    """The fused step reproduces ``Decoder.step`` for an eval-mode fp32/fp64 decoder on the CPU
    with caches of the same dtype, when no gradient is recorded and the model's kernel
    backend is ``"auto"`` or ``"cpp"``.  The caches are judged by the first layer's, as
    ``applies_to_users`` does: the C++ step checks every layer's (and refuses mixed dtypes or
    devices) before it writes, and a scan of 16 layers here cost a hot request 8 us."""
    if not (decoder.use_fused_step and available()) or decoder.training or torch.is_grad_enabled():
        return False
    if decoder.config.kernels.backend not in ("auto", "cpp"):  # a backend asked for by name runs every layer
        return False
    dtype = x_new.dtype
    if x_new.device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        return False
    weight = decoder.final_norm.weight
    first = caches[0] if caches else None
    return (
        weight.dtype == dtype
        and weight.device.type == "cpu"
        and (first is None or (first.k.dtype == dtype and first.v.dtype == dtype and first.k.device.type == "cpu"))
    )


# Each block's tensors in the order the C++ step reads them: (submodule path, parameter
# name), the path empty for the block's own.  Read through the modules' dicts: nn.Module
# attribute lookups cost more than the whole C++ step of a small layer.
LAYER_WEIGHTS = {
    "sasrec": (
        (("attn_norm",), "weight"),
        (("attn_norm",), "bias"),
        (("query",), "weight"),
        (("query",), "bias"),
        (("key",), "weight"),
        (("value",), "weight"),
        (("value",), "bias"),
        (("attn_out",), "weight"),
        (("attn_out",), "bias"),
        (("ffn_norm",), "weight"),
        (("ffn_norm",), "bias"),
        (("ffn", "0"), "weight"),
        (("ffn", "0"), "bias"),
        (("ffn", "3"), "weight"),
        (("ffn", "3"), "bias"),
    ),
    "hstu": (
        (("input_norm",), "weight"),
        (("input_norm",), "bias"),
        (("f1",), "weight"),
        (("f1",), "bias"),
        ((), "rel_bias"),
        (("output_norm",), "weight"),
        (("output_norm",), "bias"),
        (("f2",), "weight"),
        (("f2",), "bias"),
    ),
}


def layer_weights(block, backbone: str) -> list[torch.Tensor]:
    """One block's tensors in the order the C++ step reads them."""
    weights = []
    for path, name in LAYER_WEIGHTS[backbone]:
        module = block
        for child in path:
            module = module._modules[child]
        weights.append(module._parameters[name])
    return weights


def fused_step(
    decoder,
    x_new,
    positions_new,
    cu_seqlens_new,
    caches,
    cache_seqlens,
    *,
    fresh_caches: bool = False,
    validate: bool = True,
    last_rows_only: bool = False,
) -> torch.Tensor:
    """``Decoder.step`` in one call (positions already checked by the caller).

    The index checks that each layer's ``cached_step_attention`` would make run once here:
    the C++ step writes the caches in place and must never write past their capacity.
    ``fresh_caches``: the caller has just allocated the caches for these rows
    (``Decoder.prefill``), so only ``cu_seqlens_new`` is checked.  ``validate=False``: the
    caller has made these checks itself (``Decoder.step``).  ``last_rows_only``: each user's
    last new row alone, ``(batch, d)`` (see ``Decoder.forward``; every user needs a new row).
    """
    if validate:
        _check_step(decoder, x_new, cu_seqlens_new, caches, cache_seqlens, fresh_caches)
    return _extension.C.decoder_step(
        **_decoder_arguments(decoder, x_new, positions_new),
        cu_seqlens_new=cu_seqlens_new,
        k_caches=[cache.k for cache in caches],
        v_caches=[cache.v for cache in caches],
        cache_seqlens=cache_seqlens,
        last_rows_only=last_rows_only,
    )


def _check_step(decoder, x_new, cu_seqlens_new, caches, cache_seqlens, fresh_caches: bool) -> None:
    check.check_cu_seqlens("cu_seqlens_new", cu_seqlens_new, x_new.shape[0], x_new.device)
    counts = check.check_cu_seqlens_values("cu_seqlens_new", cu_seqlens_new, x_new.shape[0], "x_new")
    if not fresh_caches:
        # The shapes and layouts every layer's cached_step_attention would check, for the
        # rows (tokens, heads, head_dim) each layer appends.
        config = decoder.config
        rows = x_new.new_empty((x_new.shape[0], config.num_heads, config.head_dim))
        check.check_layer_caches(rows, rows, counts.numel(), [(cache.k, cache.v) for cache in caches], cache_seqlens)
        if caches:  # the filled lengths are the same for every layer: checked once, against the smallest cache
            check.check_cache_seqlens_values(cache_seqlens, counts, min(cache.k.shape[1] for cache in caches))


def applies_to_users(decoder, x_new: torch.Tensor, user_layers) -> bool:
    """``applies`` for caches held per user, judged by the first user's first layer: the C++
    call checks every cache (and refuses mixed dtypes or devices) before it writes."""
    k, v = user_layers[0][0]
    if not applies_to_new_users(decoder, x_new):
        return False
    return k.dtype == x_new.dtype and v.dtype == x_new.dtype and k.device.type == "cpu"


def applies_to_new_users(decoder, x_new: torch.Tensor) -> bool:
    """``applies_to_users`` for caches yet to be allocated in ``x_new``'s dtype and device."""
    return hasattr(_extension.C, "decoder_step_users") and applies(decoder, x_new, [])


def fused_step_users(
    decoder, x_new, positions_new, cu_seqlens_new, user_layers, cache_seqlens, *, last_rows_only: bool = False
) -> torch.Tensor:
    """``fused_step`` over caches held per user (``user_layers[b][l] = (k, v)``, each
    ``(capacity_b, heads, head_dim)``), appended in place: a batch of session entries is
    stepped without stacking their caches into one (and copying the new slots back)."""
    return _extension.C.decoder_step_users(
        **_decoder_arguments(decoder, x_new, positions_new),
        cu_seqlens_new=cu_seqlens_new,
        user_k_caches=[[k for k, _ in layers] for layers in user_layers],
        user_v_caches=[[v for _, v in layers] for layers in user_layers],
        cache_seqlens=cache_seqlens,
        last_rows_only=last_rows_only,
    )


def fused_forward(decoder, x, positions, cu_seqlens, *, last_rows_only: bool = False) -> torch.Tensor:
    """``Decoder.forward`` with the causal pattern in one call, without caches (positions
    already checked by the caller): the serving step's code over empty caches.
    ``last_rows_only``: each sequence's last row only, ``(batch, d)`` (see ``Decoder.forward``)."""
    check.check_cu_seqlens("cu_seqlens", cu_seqlens, x.shape[0], x.device)
    lengths = check.check_cu_seqlens_values("cu_seqlens", cu_seqlens, x.shape[0], "x")
    if last_rows_only:
        check_last_rows(lengths)
    return _extension.C.decoder_forward(
        **_decoder_arguments(decoder, x, positions), cu_seqlens=cu_seqlens, last_rows_only=last_rows_only
    )


def check_last_rows(lengths: torch.Tensor) -> None:
    """``last_rows_only`` returns a row per sequence: every one needs rows."""
    if bool((lengths < 1).any()):
        raise ValueError(f"last_rows_only needs every sequence non-empty, got lengths {lengths.tolist()[:8]}")


def _decoder_arguments(decoder, x, positions) -> dict:
    """The rows, their SASRec positions and the decoder's weights, as both C++ calls take them."""
    backbone = decoder.config.backbone
    input_norm = decoder.input_norm  # the C++ step applies every norm with final_norm's eps (all torch's default)
    return {
        "x": x,
        "position_rows": decoder.position(positions) if decoder.position is not None else None,
        "input_norm_weight": None if input_norm is None else input_norm.weight,
        "input_norm_bias": None if input_norm is None else input_norm.bias,
        "layers": [layer_weights(block, backbone) for block in decoder.blocks],
        "backbone": BACKBONE_CODES[backbone],
        "num_heads": decoder.config.num_heads,
        "silu_norm": decoder.config.attention_norm,
        "final_norm_weight": decoder.final_norm.weight,
        "final_norm_bias": decoder.final_norm.bias,
        "eps": decoder.final_norm.eps,
    }
