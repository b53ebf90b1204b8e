"""The entry of a compiled cached-step backend (C++ on the CPU, CUDA): its custom op when
``torch.compile`` traces, its launcher directly in eager mode (the op's dispatch costs a
``torch._dynamo`` import on first use), the output in ``v_new``'s dtype."""

from __future__ import annotations

import torch


def compiled_cached_step(op, launcher):
    """``cached_step(...)`` with the arguments of ``rec2pm_kernels.cached_step_attention`` after
    validation, running ``op`` or ``launcher``."""

    def cached_step(
        q_new,
        k_new,
        v_new,
        cu_seqlens_new,
        max_new,
        k_cache,
        v_cache,
        cache_seqlens,
        *,
        score,
        scale,
        rel_bias,
        silu_norm,
    ):
        run = op if torch.compiler.is_compiling() else launcher
        out = run(
            q_new,
            k_new,
            v_new,
            cu_seqlens_new,
            k_cache,
            v_cache,
            cache_seqlens,
            score,
            float(scale),
            rel_bias,
            float(silu_norm) if silu_norm is not None else 1.0,
        )
        return out.to(v_new.dtype)

    return cached_step
