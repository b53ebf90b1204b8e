"""segment_attention(backend="triton") against the oracle, under TRITON_INTERPRET=1 (fp32, CPU)."""

import pytest
import torch

from rec2pm_kernels import segment_attention
from rec2pm_kernels.ops.segment_attention.triton_backend import segment_backward, segment_forward
from rec2pm_kernels.ops.triton_configs import config_key, configs
from rec2pm_kernels.testing import cu_seqlens_of

from .cases import (
    PATTERNS,
    RAGGED,
    SCORES,
    UNIT,
    C,
    S,
    assert_outputs_within_budget,
    check_segment_attention,
    pattern_kwargs,
    random_inputs,
    reference_and_baseline,
    score_kwargs,
)

pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("bias", ["nobias", "bias", "bias-deterministic"])
def test_matches_oracle(pattern, score, bias):
    check_segment_attention(
        RAGGED, pattern, score, with_bias=bias != "nobias", deterministic=bias == "bias-deterministic"
    )


@pytest.mark.parametrize("pattern", PATTERNS)
def test_lengths_around_one_write_token(pattern):
    """With ``C = 1`` a sequence may end right after its first write token: lengths S - 1, S, S + 1."""
    segment_len = 4
    lengths = [segment_len - 1, segment_len, segment_len + 1, 3 * (segment_len + 1) + 2]
    check_segment_attention(lengths, pattern, "softmax", segment_len=segment_len, num_memory_tokens=1)


@pytest.mark.parametrize("dim, dim_v", [(8, 8), (16, 16), (64, 64), (8, 24)])
@pytest.mark.parametrize("pattern", ["global", "kv_memory_append"])
def test_head_dims(dim, dim_v, pattern):
    """8 is padded to 16 inside the kernels; ``head_dim_v`` may differ from ``head_dim``."""
    check_segment_attention([UNIT + 2, 2 * UNIT, 1], pattern, "softmax", dim=dim, dim_v=dim_v)


def _kernel_configs(kernel: str) -> list:
    """Every config ``configs()`` can return for this kernel, over the dtypes, head dims and architectures."""
    seen = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for dim in (8, 16, 32, 64, 128):
            for arch in (80, 90):
                for config in configs(kernel, dtype, dim, arch):
                    seen.setdefault(config_key(config), config)
    return list(seen.values())


CONFIG_CASES = [
    (kernel, config)
    for kernel in ("segment_fwd", "segment_bwd_dq", "segment_bwd_dkdv", "segment_bwd_bias")
    for config in _kernel_configs(kernel)
]


@pytest.mark.parametrize("kernel, config", CONFIG_CASES, ids=[f"{k}-{config_key(c)}" for k, c in CONFIG_CASES])
def test_every_config(kernel, config):
    """Each config runs (forward and backward) and stays within budget; patterns rotate over the configs."""
    pattern = PATTERNS[CONFIG_CASES.index((kernel, config)) % len(PATTERNS)]
    lengths = [3 * UNIT + 4, 1, 9 * UNIT + S, UNIT]
    q, k, v, cu, bias = random_inputs(lengths)
    kw = dict(**pattern_kwargs(pattern), **score_kwargs("softmax"))
    options = dict(
        pattern=pattern,
        segment_len=kw.get("segment_len"),
        num_memory_tokens=kw.get("num_memory_tokens"),
        score="softmax",
        scale=16**-0.5,
        rel_bias=bias.detach(),
        silu_norm=1.0,
    )
    detached = [t.detach() for t in (q, k, v)]
    fwd_config = config if kernel == "segment_fwd" else None
    out, lse = segment_forward(*detached, cu, max(lengths), config=fwd_config, **options)
    grad_out = torch.randn_like(out)
    *grads, d_time_bias = segment_backward(
        grad_out,
        *detached,
        out,
        lse,
        cu,
        max(lengths),
        deterministic=kernel == "segment_bwd_bias",
        configs_by_kernel={kernel: config},
        **options,
    )
    assert d_time_bias.numel() == 0  # no timestamp bias, no gradient for one
    reference, baseline = reference_and_baseline(q, k, v, cu, bias, grad_out, scale=16**-0.5, **kw)
    assert_outputs_within_budget((out, *grads), reference, baseline, torch.float32)


@pytest.mark.parametrize("lengths", [[], [0], [0, 0], [1], [1, 0, 1]], ids=str)
@pytest.mark.parametrize("score", SCORES)
def test_empty_and_single_token_sequences(lengths, score):
    q, k, v, cu, bias = random_inputs(lengths)
    out = segment_attention(
        q, k, v, cu, max(lengths, default=0), rel_bias=bias, backend="triton", **score_kwargs(score)
    )
    assert out.shape == v.shape
    out.sum().backward()
    for x in (q, k, v, bias):
        assert x.grad is not None and x.grad.shape == x.shape
        if sum(lengths) == 0:
            assert torch.count_nonzero(x.grad) == 0
    if score == "softmax" and sum(lengths):
        assert torch.equal(out, v.detach())  # a length-1 sequence sees only itself


def test_deterministic_bias_gradient_is_bit_identical_and_matches_atomics():
    lengths = [4 * UNIT + 3, 2 * UNIT, 7]
    q, k, v, cu, bias = random_inputs(lengths)
    kw = dict(pattern="global", segment_len=S, num_memory_tokens=C)
    grads = {}
    for deterministic in (True, True, False):
        out = segment_attention(
            q, k, v, cu, max(lengths), rel_bias=bias, backend="triton", deterministic=deterministic, **kw
        )
        grads.setdefault(deterministic, []).append(torch.autograd.grad(out.square().sum(), bias)[0])
    assert torch.equal(grads[True][0], grads[True][1])
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-5, atol=1e-5)


ATOMIC_PATH = [("segment_bwd_dkdv", {"bias_atomics": True}), ("segment_bwd_dq", {})]
DETERMINISTIC_PATH = [("segment_bwd_dkdv", {"bias_atomics": False}), ("segment_bwd_dq", {}), ("segment_bwd_bias", {})]
NO_BIAS_PATH = [("segment_bwd_dkdv", {"bias_atomics": False}), ("segment_bwd_dq", {})]


@pytest.mark.parametrize(
    "deterministic, torch_flag, with_bias, path",
    [
        (True, False, True, DETERMINISTIC_PATH),
        (False, True, True, ATOMIC_PATH),  # an explicit argument wins over torch's flag
        (None, True, True, DETERMINISTIC_PATH),  # None follows torch.use_deterministic_algorithms
        (None, False, True, ATOMIC_PATH),
        (True, False, False, NO_BIAS_PATH),  # without a bias there is nothing to make deterministic
    ],
    ids=["true", "false-over-torch", "none-torch-on", "none-torch-off", "no-bias"],
)
def test_deterministic_flag_picks_the_backward_path(monkeypatch, deterministic, torch_flag, with_bias, path):
    """The kernels launched and whether the bias gradient uses atomics, not only equal outputs
    (the interpreter runs programs one at a time, so atomics are deterministic here too)."""
    from rec2pm_kernels.ops import triton_launch

    log = []
    monkeypatch.setattr(triton_launch, "launch_log", log)
    q, k, v, cu, bias = random_inputs([9, 4])
    torch.use_deterministic_algorithms(torch_flag, warn_only=True)
    try:
        out = segment_attention(
            q, k, v, cu, 9, rel_bias=bias if with_bias else None, backend="triton", deterministic=deterministic
        )
        out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert log[0] == ("segment_fwd", {})
    assert log[1:] == path


@pytest.mark.parametrize("score", SCORES)
def test_global_item_rows_equal_causal_over_items(score):
    """Stage 1 ``global`` item rows are causal attention over the items alone, bias included."""
    units, tail = 4, 3
    n = units * UNIT + tail
    q, k, v, cu, bias = random_inputs([n])
    is_item = (torch.arange(n) % UNIT) < S
    out_global = segment_attention(
        q,
        k,
        v,
        cu,
        n,
        rel_bias=bias,
        backend="triton",
        pattern="global",
        segment_len=S,
        num_memory_tokens=C,
        **score_kwargs(score),
    )
    items = [t[is_item] for t in (q, k, v)]
    n_items = int(is_item.sum())
    out_causal = segment_attention(
        *items, cu_seqlens_of([n_items]), n_items, rel_bias=bias, backend="triton", **score_kwargs(score)
    )
    torch.testing.assert_close(out_global[is_item], out_causal, rtol=1e-5, atol=1e-6)


def test_matches_torch_backend_with_tf32_off():
    """Two implementations, one contract: triton and torch agree to fp32 rounding."""
    lengths = [3 * UNIT + 1, UNIT, 2]
    q, k, v, cu, bias = random_inputs(lengths)
    kw = dict(pattern="kv_memory_overwrite", segment_len=S, num_memory_tokens=C, rel_bias=bias)
    a = segment_attention(q, k, v, cu, max(lengths), backend="triton", **kw)
    b = segment_attention(q, k, v, cu, max(lengths), backend="torch", **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_large_write_block_skips_write_only_tiles():
    """``C >= BLOCK_N``: ``global`` must test tiles before the row's unit one by one."""
    segment_len, memory = 5, 16
    lengths = [3 * (segment_len + memory) + 2, segment_len + memory]
    for pattern in ("global", "kv_memory_append"):
        check_segment_attention(lengths, pattern, "softmax", segment_len=segment_len, num_memory_tokens=memory)
