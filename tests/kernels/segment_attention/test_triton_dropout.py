"""Attention dropout on the Triton kernels (interpreter): the same draws as the ``torch``
backend for one seed, so the ``torch`` backend in float64 with that seed is the reference,
and the ``torch`` backend in the input dtype the budget's baseline."""

import pytest
import torch

from rec2pm_kernels import segment_attention
from rec2pm_kernels.testing import assert_within_budget, random_inputs

from ..targets import TRITON_INTERPRETER as TARGET

RAGGED = TARGET.ragged
pattern_kwargs, score_kwargs = TARGET.pattern_kwargs, TARGET.score_kwargs

pytestmark = pytest.mark.interpreter

SEED = 12345678901  # past 32 bits: both halves of the seed reach the hash


def _run(backend, q, k, v, cu, bias, grad_out, dtype=None, **kw):
    inputs = [q, k, v, bias]
    if dtype is not None:  # a float64 copy of every input, for the reference
        inputs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = segment_attention(*inputs[:3], cu, max(RAGGED), rel_bias=inputs[3], backend=backend, **kw)
    return (out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype)))


@pytest.mark.parametrize("pattern", ["causal", "global", "kv_memory_overwrite"])
@pytest.mark.parametrize("score", ["softmax", "silu"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_dropout_matches_the_torch_backend(pattern, score, deterministic):
    q, k, v, cu, bias = random_inputs(RAGGED)
    kw = dict(dropout_p=0.3, dropout_seed=SEED, **pattern_kwargs(pattern), **score_kwargs(score))
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2])
    got = _run("triton", q, k, v, cu, bias, grad_out, deterministic=deterministic, **kw)
    reference = _run("torch", q, k, v, cu, bias, grad_out, dtype=torch.float64, **kw)
    baseline = _run("torch", q, k, v, cu, bias, grad_out, **kw)
    for name, g, r, b in zip(("out", "dq", "dk", "dv", "d_rel_bias"), got, reference, baseline, strict=True):
        assert_within_budget(name, g, r, b, torch.float32)
    plain = segment_attention(q, k, v, cu, max(RAGGED), rel_bias=bias, backend="triton", **{**kw, "dropout_p": 0.0})
    assert (got[0] - plain).abs().max() > 0.1  # dropout changed the output


def test_dropout_with_hstu_masks_matches_the_torch_backend():
    q, k, v, cu, bias = random_inputs(RAGGED)
    targets = torch.tensor([min(2, n) for n in RAGGED])
    kw = dict(score="silu", silu_norm=9.0, num_targets=targets, max_attn_len=4, dropout_p=0.5, dropout_seed=7)
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2])
    got = _run("triton", q, k, v, cu, bias, grad_out, **kw)
    reference = _run("torch", q, k, v, cu, bias, grad_out, dtype=torch.float64, **kw)
    baseline = _run("torch", q, k, v, cu, bias, grad_out, **kw)
    for name, g, r, b in zip(("out", "dq", "dk", "dv", "d_rel_bias"), got, reference, baseline, strict=True):
        assert_within_budget(name, g, r, b, torch.float32)
