"""The Triton kernels on a real GPU beyond the shared oracle tests (``segment_attention/`` and
``cached_step/test_oracle.py`` run every pattern, score, bias and dtype on the
``triton-cuda`` target): TF32, bit-identical deterministic gradients, no recompiles across
ragged batches, the CUDA index checks, and HSTU's masks and timestamp bias at serving-like
lengths.  Run by ``benchmarks/gpu.sh``; skipped without CUDA."""

import pytest
import torch

from rec2pm_kernels import segment_attention
from rec2pm_kernels.testing import (
    assert_outputs_within_budget,
    check_segment_attention,
    check_time_bias,
    random_inputs,
    reference_and_baseline,
    score_kwargs,
    time_inputs,
    time_tables,
)

pytestmark = pytest.mark.gpu

SEGMENT_LEN, MEMORY_TOKENS = 200, 4
UNIT = SEGMENT_LEN + MEMORY_TOKENS
LENGTHS = [5 * UNIT + 17, 1, SEGMENT_LEN, 2 * UNIT, 0, 3 * UNIT + SEGMENT_LEN]
SCORES = ["softmax", "silu"]


def test_tf32_is_opt_in_and_close():
    exact = check_segment_attention(LENGTHS[:2], "causal", "softmax", backend="triton", device="cuda")
    assert exact[0].dtype == torch.float32
    q = torch.randn(300, 2, 64, device="cuda")
    cu = torch.tensor([0, 300], dtype=torch.int32, device="cuda")
    a = segment_attention(q, q, q, cu, 300, allow_tf32=True)
    b = segment_attention(q, q, q, cu, 300)
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_deterministic_bias_gradient_is_bit_identical():
    q = torch.randn(3000, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 1000, 3000], dtype=torch.int32, device="cuda")
    grads = []
    for _ in range(2):
        out = segment_attention(
            q,
            q,
            q,
            cu,
            2000,
            pattern="global",
            segment_len=SEGMENT_LEN,
            num_memory_tokens=MEMORY_TOKENS,
            rel_bias=bias,
            deterministic=True,
        )
        grads.append(torch.autograd.grad(out.float().square().sum(), (q, bias)))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_auto_picks_triton_on_cuda():
    from rec2pm_kernels.backends import resolve_backend

    assert resolve_backend("auto", "segment_attention", torch.device("cuda"), True, torch.bfloat16) == "triton"


def test_ragged_batches_neither_recompile_nor_retune():
    """Lengths are runtime values and the autotune key is a power-of-two bucket."""
    from rec2pm_kernels.ops import triton_launch
    from rec2pm_kernels.ops.segment_attention.triton_forward import segment_fwd_kernel

    device = torch.cuda.current_device()

    def run(lengths):
        q = torch.randn(sum(lengths), 2, 64, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
        segment_attention(
            q, q, q, cu, max(lengths), pattern="global", segment_len=SEGMENT_LEN, num_memory_tokens=MEMORY_TOKENS
        )
        torch.cuda.synchronize()

    def compiled():
        return len(segment_fwd_kernel.device_caches[device][0])

    def tuned():
        return sum(len(t.cache) for key, t in triton_launch._autotuned.items() if key[0] == "segment_fwd")

    run([1020, 37])
    kernels, tunings = compiled(), tuned()
    run([1016, 5, 300, 204])  # same bucket (1024), other total and batch
    assert (compiled(), tuned()) == (kernels, tunings)
    run([2040, 999])  # next bucket: tuned again, nothing compiled
    assert compiled() == kernels and tuned() == tunings + 1


def test_rec2pm_validate_checks_cuda_index_tensors(monkeypatch):
    """On CUDA the index checks read device memory, so they run only when asked for."""
    q = torch.randn(10, 2, 16, device="cuda")
    unordered = torch.tensor([0, 7, 4, 10], dtype=torch.int32, device="cuda")
    monkeypatch.setenv("REC2PM_VALIDATE", "1")
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        segment_attention(q, q, q, unordered, 10)
    monkeypatch.setenv("REC2PM_VALIDATE", "0")
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        segment_attention(q, q, q, unordered, 10, validate=True)
    nan = q.clone()
    nan[3, 1, 2] = float("nan")
    ordered = torch.tensor([0, 4, 10], dtype=torch.int32, device="cuda")
    assert segment_attention(nan, q, q, ordered, 10).isnan().any()  # unchecked by default on CUDA
    monkeypatch.setenv("REC2PM_VALIDATE", "1")
    with pytest.raises(ValueError, match="q contains NaN or Inf"):
        segment_attention(nan, q, q, ordered, 10)


# HSTU's masks at serving-like lengths: candidates, a prefix of 8, a window of 256 with a tail of 64.
HSTU_LENGTHS = [1500, 9, 300, 0, 777]
HSTU_MASKS = {
    "targets": dict(num_targets=[64, 0, 20, 0, 7]),
    "prefix_window_tail": dict(contextual_seq_len=8, max_attn_len=256, min_full_attn_seq_len=64),
    "all": dict(num_targets=[64, 0, 20, 0, 7], contextual_seq_len=8, max_attn_len=256),
    # Bidirectional masks take no rel_bias (a one-sided table).
    "bidirectional": dict(causal=False),
    "bidirectional_all": dict(num_targets=[64, 0, 20, 0, 7], contextual_seq_len=8, max_attn_len=256, causal=False),
}


@pytest.mark.parametrize("mask", list(HSTU_MASKS))
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_hstu_masks_match_oracle(mask, score, dtype):

    lengths = (
        [n if n == 0 else max(n, 8) for n in HSTU_LENGTHS] if "contextual_seq_len" in HSTU_MASKS[mask] else HSTU_LENGTHS
    )
    q, k, v, cu, bias = random_inputs(lengths, heads=2, dim=64, dtype=dtype, device="cuda", num_buckets=512)
    kw = dict(HSTU_MASKS[mask])
    if "num_targets" in kw:
        kw["num_targets"] = torch.tensor(kw["num_targets"], device="cuda")
    kw.update(score_kwargs(score, silu_norm=11.0))
    if score == "silu":
        kw["silu_norm"] = torch.full((len(lengths),), float(max(lengths)), device="cuda")
    if not kw.get("causal", True):
        bias = None
    out = segment_attention(q, k, v, cu, max(lengths), rel_bias=bias, backend="triton", **kw)
    grad_out = torch.randn_like(out)
    inputs = (q, k, v) if bias is None else (q, k, v, bias)
    got = (out, *torch.autograd.grad(out, inputs, grad_out))
    reference, baseline = reference_and_baseline(q, k, v, cu, bias, grad_out, **kw)
    assert_outputs_within_budget(got, reference, baseline, dtype)


@pytest.mark.parametrize("pattern", ["causal", "kv_memory_overwrite", "hstu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_time_bias_matches_oracle(pattern, dtype):
    """HSTU's timestamp bias (with its position table) at the model's lengths, forward and
    every gradient, the tables' included."""
    lengths = HSTU_LENGTHS if pattern == "hstu" else LENGTHS
    kw = dict(score="silu", silu_norm=float(max(lengths)), timestamps=time_inputs(lengths, device="cuda"))
    if pattern == "hstu":
        kw.update(num_targets=torch.tensor(HSTU_MASKS["all"]["num_targets"], device="cuda"), max_attn_len=256)
    elif pattern != "causal":
        kw.update(pattern=pattern, segment_len=SEGMENT_LEN, num_memory_tokens=MEMORY_TOKENS)
    tables = time_tables(heads_of_tables=1, dtype=dtype, device="cuda")
    check_time_bias(lengths, tables, dtype=dtype, device="cuda", **kw)
