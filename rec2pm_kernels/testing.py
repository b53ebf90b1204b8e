"""Test utilities shared by every kernel test: the error budget and input generators.

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

from .ops import outputs


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
