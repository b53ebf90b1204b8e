"""The compiled CUDA kernels (``backend="cuda"``) against the oracle, and what the backend
says and refuses where it cannot run.

The ``gpu``-marked tests need the extension built with CUDA and a device; ``benchmarks/gpu.sh``
runs them (its ``cuda-kernels`` stage).  Their math (the key spans, the bias buckets and the
chunk merge of split_keys.h) is the CPU kernels' and is tested on the CPU with them; that
the sources compile without spills for sm_80 and sm_90a is tests/kernels/test_build.py."""

import pytest
import torch

import rec2pm_kernels
from rec2pm_kernels import cached_step_attention, segment_attention
from rec2pm_kernels.ops.cached_step.oracle import cached_step_oracle
from rec2pm_kernels.ops.segment_attention.oracle import segment_attention_oracle
from rec2pm_kernels.testing import assert_within_budget, cu_seqlens_of, make_cache, pattern_kwargs, score_kwargs

PATTERNS = ["causal", "global", "kv_memory_overwrite", "kv_memory_append"]
SCORES = ["softmax", "silu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
S, C = 20, 4
# Empty and one-token sequences, a tail, and rows past one chunk of 256 visible keys.
LENGTHS = [0, 1, S - 1, S + C, 3 * (S + C) + 5, 300, 700]


def cuda_available() -> bool:
    return rec2pm_kernels.backends()["cuda"].available


needs_cuda_kernels = pytest.mark.skipif(not cuda_available(), reason="needs the CUDA kernels and a CUDA device")


def test_status_says_why_not_here():
    status = rec2pm_kernels.backends()["cuda"]
    assert status.name == "cuda" and status.reason
    if not status.available:
        assert status.ops == ()
        assert "without CUDA kernels" in status.reason or "no CUDA device" in status.reason
    else:
        assert set(status.ops) == {"segment_attention", "cached_step_attention"}


@pytest.mark.skipif(cuda_available(), reason="checks the refusal where the CUDA kernels cannot run")
def test_refused_with_the_reason_where_it_cannot_run():
    q = k = v = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run segment_attention here: .*CUDA"):
        segment_attention(q, k, v, cu_seqlens_of([3]), 3, backend="cuda")
    k_cache, v_cache = make_cache(1, 4, 2, 8, 8, [1])
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run cached_step_attention here"):
        seqlens = torch.tensor([1])
        cached_step_attention(q[:1], k[:1], v[:1], cu_seqlens_of([1]), 1, k_cache, v_cache, seqlens, backend="cuda")


def test_resolve_rules_name_the_device_and_gradients(monkeypatch):
    import importlib

    backends = importlib.import_module("rec2pm_kernels.backends")  # the package exports the function
    available = backends.BackendStatus("cuda", True, backends.OPS, "test")
    monkeypatch.setattr(backends, "_status", lambda name: available)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors, got tensors on cpu"):
        backends.resolve_backend("cuda", "segment_attention", cpu, needs_grad=False)
    with pytest.raises(ValueError, match="backend='cuda' is forward only"):
        backends.resolve_backend("cuda", "segment_attention", torch.device("cuda"), needs_grad=True)
    with pytest.raises(ValueError, match="backend='cuda' takes float32, float16 or bfloat16"):
        backends.resolve_backend("cuda", "segment_attention", torch.device("cuda"), False, torch.float64)
    assert backends.resolve_backend("cuda", "cached_step_attention", torch.device("cuda"), False) == "cuda"


@pytest.mark.parametrize(
    "options, named",
    [
        (dict(max_attn_len=3), "HSTU's masks"),
        (dict(num_targets=torch.tensor([1])), "num_targets"),
        (dict(silu_norm=torch.tensor([2.0])), "per-sequence silu_norm"),
    ],
)
def test_options_the_kernels_lack_are_named(options, named):
    from rec2pm_kernels.hstu_masks import HSTUMask
    from rec2pm_kernels.ops.segment_attention.cuda_backend import check_cuda_options

    mask = HSTUMask(max_attn_len=options.get("max_attn_len", 0))
    with pytest.raises(ValueError, match=f"backend='cuda' does not implement .*{named}"):
        check_cuda_options(mask, options.get("num_targets"), None, options.get("silu_norm"))


# ---- on a GPU -------------------------------------------------------------------------------


def _qkv(total, heads, dim, dim_v, dtype):
    return tuple(torch.randn(total, heads, d, dtype=dtype, device="cuda") for d in (dim, dim, dim_v))


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_attention_matches_oracle(pattern, score, with_bias, dtype):
    heads = 2
    cu = cu_seqlens_of(LENGTHS, device="cuda")
    q, k, v = _qkv(sum(LENGTHS), heads, 16, 16, dtype)
    bias = 0.5 * torch.randn(heads, 40, dtype=dtype, device="cuda") if with_bias else None
    kw = dict(rel_bias=bias, **pattern_kwargs(pattern, S, C), **score_kwargs(score, silu_norm=11.0))
    out = segment_attention(q, k, v, cu, max(LENGTHS), backend="cuda", **kw)
    ref = segment_attention_oracle(q, k, v, cu, **kw)
    base = segment_attention_oracle(q, k, v, cu, upcast=False, **kw)
    assert out.dtype == dtype
    assert_within_budget("out", out, ref, base, dtype)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dim, dim_v", [(8, 8), (16, 16), (32, 32), (64, 64), (128, 128), (64, 32), (256, 256)])
def test_segment_attention_head_dims(dim, dim_v):
    cu = cu_seqlens_of(LENGTHS, device="cuda")
    q, k, v = _qkv(sum(LENGTHS), 2, dim, dim_v, torch.float32)
    out = segment_attention(q, k, v, cu, max(LENGTHS), backend="cuda")
    ref = segment_attention_oracle(q, k, v, cu)
    assert_within_budget("out", out, ref, segment_attention_oracle(q, k, v, cu, upcast=False), torch.float32)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "filled, new",
    [([0, 5, 12, 3, 20], [3, 1, 0, 4, 4]), ([255, 250, 700, 1, 3000], [1, 8, 3, 2, 1])],
    ids=["short", "split"],  # "split": rows on both sides of one chunk of 256 slots, and many chunks
)
def test_cached_step_matches_oracle_and_appends(score, with_bias, dtype, filled, new):
    heads, dim, dim_v = 2, 16, 8
    cu = cu_seqlens_of(new, device="cuda")
    q, k, v = _qkv(sum(new), heads, dim, dim_v, dtype)
    k_cache, v_cache = make_cache(
        len(new), max(f + n for f, n in zip(filled, new, strict=True)) + 2, heads, dim, dim_v, filled, dtype, "cuda"
    )
    seqlens = torch.tensor(filled, dtype=torch.int32, device="cuda")
    bias = 0.5 * torch.randn(heads, 300, dtype=dtype, device="cuda") if with_bias else None
    kw = dict(rel_bias=bias, **score_kwargs(score, silu_norm=11.0))
    ref = cached_step_oracle(q, k, v, cu, k_cache, v_cache, seqlens, **kw)
    base = cached_step_oracle(q, k, v, cu, k_cache, v_cache, seqlens, upcast=False, **kw)
    out = cached_step_attention(q, k, v, cu, max(new), k_cache, v_cache, seqlens, backend="cuda", **kw)
    assert_within_budget("out", out, ref, base, dtype)
    for b, (f, n) in enumerate(zip(filled, new, strict=True)):
        start = int(cu[b])
        assert torch.equal(k_cache[b, f : f + n], k[start : start + n])
        assert torch.equal(v_cache[b, f : f + n], v[start : start + n])


@pytest.mark.gpu
@needs_cuda_kernels
def test_cuda_kernels_are_bit_identical_across_runs_and_match_triton():
    lengths = [700, 3, 57, 0, 90]
    cu = cu_seqlens_of(lengths, device="cuda")
    q, k, v = _qkv(sum(lengths), 4, 16, 16, torch.bfloat16)
    kw = pattern_kwargs("global", S, C)
    outs = [segment_attention(q, k, v, cu, 700, backend="cuda", **kw) for _ in range(3)]
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
    triton = segment_attention(q, k, v, cu, 700, backend="triton", **kw)
    torch.testing.assert_close(outs[0], triton, rtol=2e-2, atol=2e-2)
