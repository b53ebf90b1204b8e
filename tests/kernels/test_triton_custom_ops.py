"""The Triton launchers as ``torch.library`` custom ops: opcheck, and torch.compile without graph breaks."""

import pytest
import torch

from rec2pm_kernels import cached_step_attention, segment_attention

# Importing the backends registers the ops.
from rec2pm_kernels.ops.cached_step import triton_backend as cached_step_backend  # noqa: F401
from rec2pm_kernels.ops.segment_attention import triton_backend as segment_backend  # noqa: F401
from rec2pm_kernels.testing import cached_step_case, random_inputs

from .targets import TRITON_INTERPRETER as TARGET

S, C, UNIT = TARGET.segment_len, TARGET.num_memory_tokens, TARGET.unit

pytestmark = pytest.mark.interpreter

LENGTHS = [2 * UNIT + 1, 1, UNIT]


def _segment_args(pattern="global", score="softmax", with_bias=True):
    q, k, v, cu, bias = random_inputs(LENGTHS, with_bias=with_bias)
    return (q, k, v, cu, max(LENGTHS), pattern, S, C, score, 0.25, bias, 3.0 if score == "silu" else 1.0, False, False)


@pytest.mark.parametrize("score", ["softmax", "silu"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_opcheck_segment_attention_ops(score, with_bias):
    args = _segment_args(score=score, with_bias=with_bias)
    torch.library.opcheck(torch.ops.rec2pm.segment_attention_fwd.default, args)
    q, k, v, cu, max_len, pattern, s, c, score, scale, bias, norm, tf32, det = args
    out, lse = torch.ops.rec2pm.segment_attention_fwd(*args)
    bwd_args = (
        torch.randn_like(out),
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        lse.detach(),
        cu,
        max_len,
        pattern,
        s,
        c,
        score,
        scale,
        bias.detach() if bias is not None else None,
        norm,
        tf32,
        det,
    )
    torch.library.opcheck(torch.ops.rec2pm.segment_attention_bwd.default, bwd_args)


def test_opcheck_cached_step_op():
    q, k, v, cu, k_cache, v_cache, seqlens, bias = cached_step_case([3, 0, 9], [1, 2, 0])
    k_cache.nan_to_num_(0.0)
    v_cache.nan_to_num_(0.0)
    args = (q, k, v, cu, 2, k_cache, v_cache, seqlens, "softmax", 0.25, bias, 1.0, False)
    torch.library.opcheck(torch.ops.rec2pm.cached_step_attention.default, args)


def test_compile_fullgraph_forward_and_backward():
    """A model-like function around segment_attention compiles as one graph, and matches eager."""
    q, k, v, cu, bias = random_inputs(LENGTHS)
    weight = torch.randn(16, 16, requires_grad=True)

    def block(q, k, v, bias, weight):
        out = segment_attention(
            q @ weight,
            k,
            v,
            cu,
            max(LENGTHS),
            pattern="kv_memory_append",
            segment_len=S,
            num_memory_tokens=C,
            rel_bias=bias,
            backend="triton",
        )
        return out.relu().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    inputs = (q, k, v, bias, weight)
    eager_loss = block(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    compiled_loss = compiled(*inputs)
    compiled_grads = torch.autograd.grad(compiled_loss, inputs)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_cached_step():
    q, k, v, cu, k_cache, v_cache, seqlens, bias = cached_step_case([3, 0, 9], [1, 2, 0])
    eager_cache = (k_cache.clone(), v_cache.clone())

    def step(q, k, v, k_cache, v_cache):
        return cached_step_attention(q, k, v, cu, 2, k_cache, v_cache, seqlens, rel_bias=bias, backend="triton")

    with torch.no_grad():
        want = step(q, k, v, *eager_cache)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, k_cache, v_cache)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(k_cache, eager_cache[0], equal_nan=True)
