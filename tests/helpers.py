"""Input builders and oracle comparisons shared by the kernel tests."""

from __future__ import annotations

import torch

from rec2pm_kernels import segment_attention, testing
from rec2pm_kernels.ops.segment_attention.oracle import segment_attention_oracle
from rec2pm_kernels.testing import assert_within_budget, cu_seqlens_of

S, C = 3, 2  # small segment and write block: several units in short sequences
# The backends that run on CPU tensors without the Triton interpreter.
CPU_BACKENDS = ["torch", "cpp"]


def require_backend(name: str) -> None:
    """Skip a test of the C++ backend without the extension, or fail when CI requires it."""
    if name == "cpp":
        from .conftest import require_extension

        require_extension()


def pattern_kwargs(pattern: str, segment_len: int = S, num_memory_tokens: int = C) -> dict:
    return testing.pattern_kwargs(pattern, segment_len, num_memory_tokens)


def score_kwargs(score: str) -> dict:
    return testing.score_kwargs(score, silu_norm=7.0)


def make_qkv(
    total: int, heads: int = 2, dim: int = 8, dim_v: int | None = None, dtype=torch.float32, requires_grad: bool = False
):
    dim_v = dim if dim_v is None else dim_v
    q = torch.randn(total, heads, dim, dtype=dtype)
    k = torch.randn(total, heads, dim, dtype=dtype)
    v = torch.randn(total, heads, dim_v, dtype=dtype)
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))


def make_bias(heads: int, num_buckets: int = 9, dtype=torch.float32, requires_grad: bool = False):
    return (0.5 * torch.randn(heads, num_buckets, dtype=dtype)).requires_grad_(requires_grad)


def check_against_oracle(
    lengths, pattern, score, *, with_bias, dtype=torch.float32, heads=2, dim=8, dim_v=None, grads=True, **backend_kwargs
):
    """Forward and every gradient of ``segment_attention`` against the oracle, within budget."""
    cu = cu_seqlens_of(lengths)
    q, k, v = make_qkv(sum(lengths), heads, dim, dim_v, dtype, requires_grad=grads)
    bias = make_bias(heads, dtype=dtype, requires_grad=grads) if with_bias else None
    kw = dict(rel_bias=bias, **pattern_kwargs(pattern), **score_kwargs(score))
    out = segment_attention(q, k, v, cu, max(lengths, default=0), **kw, **backend_kwargs)
    ref = segment_attention_oracle(q, k, v, cu, **kw)
    base = segment_attention_oracle(q, k, v, cu, upcast=False, **kw)
    assert out.dtype == v.dtype
    assert_within_budget("out", out, ref, base, dtype)
    if not grads:
        return
    grad_out = torch.randn_like(out)
    inputs = [q, k, v] + ([bias] if with_bias else [])
    names = ["dq", "dk", "dv"] + (["d_rel_bias"] if with_bias else [])
    got = torch.autograd.grad(out, inputs, grad_out)
    want = torch.autograd.grad(ref, inputs, grad_out.to(ref.dtype))
    same_dtype = torch.autograd.grad(base, inputs, grad_out)
    for name, g, r, b in zip(names, got, want, same_dtype, strict=True):
        assert_within_budget(name, g, r, b, dtype)
