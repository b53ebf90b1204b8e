"""Test utilities shared by every kernel test: the error budget, input generators and oracle checks.

The error budget
----------------
A kernel's output (or gradient) ``out`` passes against the reference ``ref`` when::

    max|out - ref| <= 2 * max|baseline - ref| + 2 * eps(dtype) * max|ref|

``ref`` comes from the oracle in float64 for fp32 inputs (fp32 for fp16/bf16), and
``baseline`` is the same oracle computed in the input dtype (``upcast=False``), i.e. the
error plain PyTorch makes in that dtype.  The second term is a rounding floor for outputs
where the baseline happens to be exact.
"""

from __future__ import annotations

import contextlib

import torch

from .interface import segment_attention
from .ops import outputs
from .ops.cached_step.oracle import cached_step_oracle
from .ops.segment_attention.oracle import segment_attention_oracle


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


def error_budget(ref: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest error allowed for a kernel computing ``ref`` in ``dtype``."""
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    return 2 * max_abs_error(baseline, ref) + 2 * torch.finfo(dtype).eps * scale


def assert_within_budget(
    name: str, out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype | None = None
) -> None:
    """Raise ``AssertionError`` if ``out`` is further from ``ref`` than the budget allows."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    dtype = dtype or out.dtype
    err = max_abs_error(out, ref)
    budget = error_budget(ref, baseline, dtype)
    if not err <= budget:  # also catches NaN
        raise AssertionError(
            f"{name}: max abs error {err:.3e} exceeds the budget {budget:.3e} "
            f"(same-dtype baseline error {max_abs_error(baseline, ref):.3e}, dtype {dtype})"
        )


def interleaved_lengths(
    generator: torch.Generator,
    batch: int,
    max_units: int,
    segment_len: int,
    num_memory_tokens: int,
    allow_empty: bool = True,
) -> list[int]:
    """Random sequence lengths that never end inside a write block.

    Each is a number of complete units plus 0..S trailing items (0 allowed only as the
    whole sequence when ``allow_empty``).
    """
    unit = segment_len + num_memory_tokens
    out = []
    for _ in range(batch):
        units = int(torch.randint(0, max_units + 1, (1,), generator=generator))
        tail = int(torch.randint(0, segment_len + 1, (1,), generator=generator))
        n = units * unit + tail
        if n == 0 and not allow_empty:
            n = 1
        out.append(n)
    return out


def cu_seqlens_of(lengths: list[int], dtype=torch.int32, device="cpu") -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    if lengths:
        out[1:] = torch.tensor(lengths).cumsum(0)
    return out.to(dtype=dtype, device=device)


@contextlib.contextmanager
def nan_filled_outputs(enabled: bool = True):
    """Fill every fresh kernel output with NaN while active, so that a row a kernel never
    writes fails the comparison instead of passing as zero (the tests turn it on for all)."""
    before = outputs._fill_with_nan
    outputs._fill_with_nan = enabled
    try:
        yield
    finally:
        outputs._fill_with_nan = before


# -- input builders shared by the kernel tests, on any device --------------------------------


def pattern_kwargs(pattern: str, segment_len: int, num_memory_tokens: int) -> dict:
    """The pattern keywords of ``segment_attention``: ``causal`` takes no ``S`` or ``C``."""
    if pattern == "causal":
        return {"pattern": pattern}
    return {"pattern": pattern, "segment_len": segment_len, "num_memory_tokens": num_memory_tokens}


def score_kwargs(score: str, silu_norm: float) -> dict:
    """The score keywords: ``silu`` needs its normaliser, ``softmax`` refuses one."""
    return {"score": score, "silu_norm": silu_norm if score == "silu" else None}


def ragged_lengths(segment_len: int, num_memory_tokens: int) -> list[int]:
    """The standard ragged batch: empty, 1, S - 1, S, a unit, a unit plus one, units plus a
    tail, several units (no length ends inside a write block)."""
    S, unit = segment_len, segment_len + num_memory_tokens
    return [0, 1, S - 1, S, unit, unit + 1, 2 * unit + 3, 3 * unit, 5 * unit + S]


def make_cache(batch, capacity, heads, dim, dim_v, filled, dtype=torch.float32, device="cpu"):
    """``(k_cache, v_cache)`` whose unused slots hold NaN, so any read past the filled prefix shows."""
    k_cache = torch.full((batch, capacity, heads, dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full((batch, capacity, heads, dim_v), float("nan"), dtype=dtype, device=device)
    for b, n in enumerate(filled):
        k_cache[b, :n] = torch.randn(n, heads, dim, dtype=dtype, device=device)
        v_cache[b, :n] = torch.randn(n, heads, dim_v, dtype=dtype, device=device)
    return k_cache, v_cache


def random_qkv(
    total: int,
    heads: int = 2,
    dim: int = 8,
    dim_v: int | None = None,
    dtype=torch.float32,
    device="cpu",
    requires_grad: bool = False,
):
    """``(q, k, v)`` of ``total`` tokens; ``v`` has ``dim_v`` (default ``dim``) features."""
    dim_v = dim if dim_v is None else dim_v
    shapes = ((total, heads, dim), (total, heads, dim), (total, heads, dim_v))
    return tuple(torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad) for shape in shapes)


def random_bias(heads: int, num_buckets: int = 13, dtype=torch.float32, device="cpu", requires_grad: bool = False):
    """A relative-position bias table ``(heads, num_buckets)`` of moderate weights."""
    return (0.5 * torch.randn(heads, num_buckets, dtype=dtype, device=device)).requires_grad_(requires_grad)


def random_inputs(
    lengths, heads=2, dim=16, dim_v=None, dtype=torch.float32, device="cpu", with_bias=True, num_buckets=13
):
    """``(q, k, v, cu_seqlens, rel_bias)`` of a ragged batch, all requiring grad (``rel_bias``
    is ``None`` unless ``with_bias``)."""
    q, k, v = random_qkv(sum(lengths), heads, dim, dim_v, dtype, device, requires_grad=True)
    bias = random_bias(heads, num_buckets, dtype, device, requires_grad=True) if with_bias else None
    return q, k, v, cu_seqlens_of(lengths, device=device), bias


def reference_and_baseline(q, k, v, cu, bias, grad_out, **kw):
    """``[reference, baseline]`` of ``segment_attention``: the oracle's output and the gradients
    of the inputs that require one, upcast (the reference) and in the input dtype (the
    budget's baseline)."""
    inputs = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    results = []
    for upcast in (True, False):
        out = segment_attention_oracle(q, k, v, cu, rel_bias=bias, upcast=upcast, **kw)
        grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype)) if inputs else ()
        results.append((out, *grads))
    return results


OUTPUT_NAMES = ("out", "dq", "dk", "dv", "d_rel_bias")


def assert_outputs_within_budget(got, reference, baseline, dtype, names=OUTPUT_NAMES) -> None:
    """Each of ``got`` (an output, then gradients) within budget of its reference."""
    for name, g, r, b in zip(names[: len(got)], got, reference, baseline, strict=True):
        assert_within_budget(name, g, r, b, dtype)


def check_segment_attention(
    lengths,
    pattern: str,
    score: str,
    *,
    backend: str,
    segment_len: int | None = None,  # needed by every pattern but ``causal``
    num_memory_tokens: int | None = None,
    with_bias: bool = True,
    dtype=torch.float32,
    device="cpu",
    heads: int = 2,
    dim: int = 16,
    dim_v: int | None = None,
    grads: bool = True,
    silu_norm: float = 11.0,
    num_buckets: int = 13,
    **options,
):
    """``segment_attention(backend=...)`` against the oracle within the error budget: the output
    and, with ``grads``, the gradient of every input (the bias table's included).  Returns
    ``(out, *grads)``."""
    q, k, v, cu, bias = random_inputs(lengths, heads, dim, dim_v, dtype, device, with_bias, num_buckets)
    if not grads:
        q, k, v = (t.detach() for t in (q, k, v))
        bias = None if bias is None else bias.detach()
    kw = dict(**pattern_kwargs(pattern, segment_len, num_memory_tokens), **score_kwargs(score, silu_norm))
    out = segment_attention(q, k, v, cu, max(lengths, default=0), rel_bias=bias, backend=backend, **kw, **options)
    if out.dtype != v.dtype or out.shape != v.shape:
        raise AssertionError(f"out: {out.dtype} {tuple(out.shape)}, expected v's {v.dtype} {tuple(v.shape)}")
    grad_out = torch.randn_like(out)
    inputs = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    got = (out, *torch.autograd.grad(out, inputs, grad_out)) if inputs else (out,)
    reference, baseline = reference_and_baseline(q, k, v, cu, bias, grad_out, **kw)
    assert_outputs_within_budget(got, reference, baseline, dtype)
    return got


def cached_step_case(
    filled, new, *, heads=2, dim=16, dim_v=8, capacity=None, dtype=torch.float32, device="cpu", with_bias=True
):
    """Inputs of one cached step: ``(q, k, v, cu_seqlens, k_cache, v_cache, cache_seqlens, rel_bias)``;
    user ``b`` has ``filled[b]`` cached slots and ``new[b]`` new rows."""
    capacity = capacity or max((f + n for f, n in zip(filled, new, strict=True)), default=0) + 3
    q, k, v = random_qkv(sum(new), heads, dim, dim_v, dtype, device)
    k_cache, v_cache = make_cache(len(new), capacity, heads, dim, dim_v, filled, dtype, device)
    seqlens = torch.tensor(filled, dtype=torch.int32, device=device)
    bias = random_bias(heads, 10, dtype, device) if with_bias else None
    return q, k, v, cu_seqlens_of(new, device=device), k_cache, v_cache, seqlens, bias


def cached_step_reference(q, k, v, cu, k_cache, v_cache, seqlens, bias, **kw):
    """Oracle and same-dtype baseline of a cached step (computed before the cache is written)."""
    return tuple(
        cached_step_oracle(q, k, v, cu, k_cache, v_cache, seqlens, rel_bias=bias, upcast=upcast, **kw)
        for upcast in (True, False)
    )


# -- HSTU's timestamp bias: tables of TIME_BUCKETS + 1 weights and gaps that cover most of them.

TIME_BUCKETS = 60
TIME_BIAS_NAMES = ("out", "dq", "dk", "dv", "d_rel_bias", "d_ts_bias")


def time_inputs(lengths, seed=3, device="cpu"):
    """Epoch-sized int64 timestamps, increasing in each sequence, with gaps over most buckets."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(0, 5000, (sum(lengths),), generator=g) ** 2
    cu = cu_seqlens_of(lengths).tolist()
    times = torch.cat([gaps[a:b].cumsum(0) for a, b in zip(cu[:-1], cu[1:], strict=True)]) + 1_700_000_000
    return times.to(device)


def time_tables(heads_of_tables, with_rel=True, heads=2, dtype=torch.float32, device="cpu"):
    """``(rel_bias or None, ts_bias)``, requiring grad; ``ts_bias`` has ``heads_of_tables`` rows."""
    rel = random_bias(heads, 13, dtype, device, requires_grad=True) if with_rel else None
    ts = (0.3 * torch.randn(heads_of_tables, TIME_BUCKETS + 1, dtype=dtype, device=device)).requires_grad_()
    return rel, ts


def run_time_bias(q, k, v, cu, tables, grad_out, **kw):
    """``(out, *grads)`` with ``tables = (rel_bias, ts_bias)`` (either may be ``None``): of a
    backend (``backend=``) or of the oracle (``upcast=``: float64, or the input dtype).  The
    gradients are those of the inputs that require one."""
    rel_bias, ts_bias = tables
    inputs = [t for t in (q, k, v, rel_bias, ts_bias) if t is not None and t.requires_grad]
    if "backend" in kw:
        max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        out = segment_attention(q, k, v, cu, max_seqlen, rel_bias=rel_bias, ts_bias=ts_bias, **kw)
    else:
        out = segment_attention_oracle(q, k, v, cu, rel_bias=rel_bias, ts_bias=ts_bias, **kw)
    return (out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype)))


def check_time_bias(lengths, tables, backend="triton", deterministic=False, dtype=torch.float32, device="cpu", **kw):
    """A backend against the oracle with a timestamp bias, forward and every gradient."""
    q, k, v, cu, _ = random_inputs(lengths, with_bias=False, dtype=dtype, device=device)
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2], device=device)
    got = run_time_bias(q, k, v, cu, tables, grad_out, backend=backend, deterministic=deterministic, **kw)
    reference = run_time_bias(q, k, v, cu, tables, grad_out, upcast=True, **kw)
    baseline = run_time_bias(q, k, v, cu, tables, grad_out, upcast=False, **kw)
    names = [name for name in TIME_BIAS_NAMES if name != "d_rel_bias" or tables[0] is not None]
    for name, g, r, b in zip(names, got, reference, baseline, strict=True):
        assert_within_budget(name, g, r, b, dtype)
    return got
