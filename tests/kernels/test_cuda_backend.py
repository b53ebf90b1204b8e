"""The compiled CUDA kernels (``backend="cuda"``): what the backend says and refuses where it
cannot run, and, on a GPU, bit-identical runs that agree with Triton.  Their checks against
the oracle are the shared ones (``segment_attention/`` and ``cached_step/test_oracle.py``,
target ``cuda``).

The ``gpu``-marked tests need the extension built with CUDA and a device; ``benchmarks/gpu.sh``
runs every ``cuda_kernels`` test in its ``cuda-kernels`` stage.  Their math (the key spans, the bias buckets and the
chunk merge of split_keys.h) is the CPU kernels' and is tested on the CPU with them; that
the sources compile without spills for sm_80 and sm_90a is tests/kernels/test_build.py."""

import pytest
import torch

import rec2pm_kernels
from rec2pm_kernels import cached_step_attention, segment_attention
from rec2pm_kernels.testing import cu_seqlens_of, make_cache, random_qkv

from .targets import BY_ID

TARGET = BY_ID["cuda"]


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


@pytest.mark.gpu
@pytest.mark.cuda_kernels
@needs_cuda_kernels
def test_cuda_kernels_are_bit_identical_across_runs_and_match_triton():
    lengths = [700, 3, 57, 0, 90]
    cu = cu_seqlens_of(lengths, device="cuda")
    q, k, v = random_qkv(sum(lengths), 4, 16, dtype=torch.bfloat16, device="cuda")
    kw = TARGET.pattern_kwargs("global")
    outs = [segment_attention(q, k, v, cu, 700, backend="cuda", **kw) for _ in range(3)]
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
    triton = segment_attention(q, k, v, cu, 700, backend="triton", **kw)
    torch.testing.assert_close(outs[0], triton, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.cuda_kernels
@needs_cuda_kernels
def test_rows_past_what_the_launch_was_sized_for_are_nan_not_written_out_of_bounds():
    """Unvalidated bounds that are too small (no device sync checks them): a sequence longer
    than max_seqlen, a step that appends past the caches' capacity.  The rows that break
    them are NaN; the rows that keep them are still right; nothing past a buffer changes."""
    lengths = [600, 100]
    cu = cu_seqlens_of(lengths, device="cuda")
    q, k, v = random_qkv(sum(lengths), 2, 16, device="cuda")
    right = segment_attention(q, k, v, cu, 600, backend="cuda", validate=False)
    short = segment_attention(q, k, v, cu, 200, backend="cuda", validate=False)  # one chunk of 256 keys
    assert short[256:600].isnan().all()  # rows of sequence 0 with more than 256 keys
    torch.testing.assert_close(short[:256], right[:256])
    torch.testing.assert_close(short[600:], right[600:])
    k_cache, v_cache = make_cache(2, 8, 2, 16, 16, [8, 3], device="cuda")
    before = k_cache[1, :3].clone(), v_cache[1, :3].clone()  # user 0's slot 8 would be user 1's slot 0
    q_new, k_new, v_new = random_qkv(2, 2, 16, device="cuda")
    seqlens = torch.tensor([8, 3], device="cuda")  # user 0's cache is full
    out = cached_step_attention(
        q_new,
        k_new,
        v_new,
        cu_seqlens_of([1, 1], device="cuda"),
        1,
        k_cache,
        v_cache,
        seqlens,
        backend="cuda",
        validate=False,
    )
    assert out[0].isnan().all() and not out[1].isnan().any()
    assert torch.equal(k_cache[1, :3], before[0]) and torch.equal(v_cache[1, :3], before[1])
