"""segment_attention(backend="triton") beyond the shared oracle tests (test_oracle.py), under
TRITON_INTERPRET=1 (fp32, CPU): both bias-gradient paths, every tile config, the backward's
launch path, and agreement with the torch backend."""

import pytest
import torch

from rec2pm_kernels import PATTERNS, segment_attention
from rec2pm_kernels.ops.segment_attention.triton_backend import segment_backward, segment_forward
from rec2pm_kernels.ops.triton_configs import config_key, configs
from rec2pm_kernels.testing import assert_outputs_within_budget, random_inputs, reference_and_baseline

from ..targets import TRITON_INTERPRETER as TARGET

S, C, UNIT = TARGET.segment_len, TARGET.num_memory_tokens, TARGET.unit
SCORES = ["softmax", "silu"]
pattern_kwargs, score_kwargs = TARGET.pattern_kwargs, TARGET.score_kwargs

pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("score", SCORES)
def test_deterministic_bias_gradient_matches_oracle(pattern, score):
    """``deterministic=True`` takes the partial-sum bias gradient (the shared oracle tests run
    the default atomic one)."""
    TARGET.check(TARGET.ragged, pattern, score, with_bias=True, deterministic=True)


@pytest.mark.parametrize("score", SCORES)
def test_deterministic_bias_gradient_of_global_with_many_memory_tokens(score):
    """``global``'s λ steps back by C - 1 at each unit boundary, so a 16 x 16 tile spans up to
    C + 14 buckets: at C = 20 more than the one-hot window of 32 held (it dropped them)."""
    TARGET.check(
        [3 * 36 + 5, 40], "global", score, with_bias=True, deterministic=True, segment_len=16,
        num_memory_tokens=20, heads=1, dim=16, num_buckets=64,
    )  # fmt: skip


def test_atomic_bias_gradient_stays_within_budget_on_long_sequences():
    """The atomics add one score gradient at a time: an fp32 running sum lost 4x the budget
    at 1k tokens, the float64 one stays within it."""
    TARGET.check([1024, 300], "causal", "softmax", with_bias=True, deterministic=False, heads=1, num_buckets=32)


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
        TARGET.check(lengths, pattern, "softmax", segment_len=segment_len, num_memory_tokens=memory)


def test_a_strided_cu_seqlens_is_read_by_value():
    """The kernels read cu_seqlens element after element by pointer: a strided view (every
    other entry of a buffer) gives the result of its contiguous copy."""
    lengths = [5, 3, 4]
    q, k, v, cu, _ = random_inputs(lengths)
    strided = torch.stack([cu, torch.full_like(cu, 99)], 1)[:, 0]
    assert strided.stride(0) == 2
    a = segment_attention(q, k, v, strided, max(lengths), backend="triton")
    torch.testing.assert_close(a, segment_attention(q, k, v, cu, max(lengths), backend="triton"), rtol=0, atol=0)
