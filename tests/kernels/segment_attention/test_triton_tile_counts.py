"""Work follows the mask: each Triton program visits exactly the tiles with a visible entry.

Built with ``COUNT_TILES=True`` (interpreter only), every program stores how many tiles it
visited; the expected count comes from the oracle's dense mask cut into the same tiles.
"""

import pytest
import torch
import triton

from rec2pm_kernels import PATTERNS
from rec2pm_kernels.ops.segment_attention.oracle import dense_mask
from rec2pm_kernels.ops.segment_attention.triton_backend import segment_backward, segment_forward
from rec2pm_kernels.ops.triton_configs import configs
from rec2pm_kernels.testing import random_inputs

from ..targets import TRITON_INTERPRETER as TARGET

S, C, UNIT = TARGET.segment_len, TARGET.num_memory_tokens, TARGET.unit

pytestmark = pytest.mark.interpreter

LENGTHS = [11 * UNIT + 3, 1, 4 * UNIT, 0, S]


def visible_tiles(mask: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """``(row tiles, col tiles)`` booleans: does the tile hold at least one visible entry?"""
    n = mask.shape[0]
    rows, cols = triton.cdiv(n, block_rows), triton.cdiv(n, block_cols)
    padded = torch.zeros(rows * block_rows, cols * block_cols, dtype=torch.bool)
    padded[:n, :n] = mask
    return padded.view(rows, block_rows, cols, block_cols).any(dim=(1, 3))


def expected_counts(pattern, lengths, block_m, block_n, per, segment_len, num_memory_tokens):
    """Per program (sequence, block), as the kernels number them: key tiles per row block
    (``per="row"``) or row tiles per key block (``per="col"``)."""
    block = block_m if per == "row" else block_n
    blocks = triton.cdiv(max(lengths), block)
    out = torch.zeros(len(lengths) * blocks, dtype=torch.int32)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        tiles = visible_tiles(dense_mask(pattern, n, segment_len, num_memory_tokens), block_m, block_n)
        counts = tiles.sum(1) if per == "row" else tiles.sum(0)
        out[b * blocks : b * blocks + counts.numel()] = counts.int()
    return out


def count_tiles(q, k, v, cu, lengths, config, options) -> dict[str, torch.Tensor]:
    """Tiles each program of the forward and both backward kernels visited, ``{kernel: (programs,)}``."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    max_len = max(lengths)
    counts = {
        "segment_fwd": torch.zeros(len(lengths) * triton.cdiv(max_len, block_m), 1, dtype=torch.int32),
        "segment_bwd_dq": torch.zeros(len(lengths) * triton.cdiv(max_len, block_m), 1, dtype=torch.int32),
        "segment_bwd_dkdv": torch.zeros(len(lengths) * triton.cdiv(max_len, block_n), 1, dtype=torch.int32),
    }
    out, lse = segment_forward(q, k, v, cu, max_len, config=config, tile_counts=counts["segment_fwd"], **options)
    segment_backward(
        torch.randn_like(out),
        q,
        k,
        v,
        out,
        lse,
        cu,
        max_len,
        configs_by_kernel={"segment_bwd_dq": config, "segment_bwd_dkdv": config},
        tile_counts={name: counts[name] for name in ("segment_bwd_dq", "segment_bwd_dkdv")},
        **options,
    )
    return {name: count[:, 0] for name, count in counts.items()}


def tile_configs() -> list:
    """Configs from ``configs()`` plus 16 x 16 tiles, which cut units into several tiles."""
    small = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    return [configs("segment_fwd", torch.float32, 16)[0], configs("segment_bwd_dkdv", torch.float32, 16)[0], small]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("config", tile_configs(), ids=lambda c: f"M{c.kwargs['BLOCK_M']}N{c.kwargs['BLOCK_N']}")
@pytest.mark.parametrize("segment_len, num_memory_tokens", [(S, C), (3, 16), (40, 2)], ids=["C2", "C16", "S40"])
def test_visited_tiles_equal_visible_tiles(pattern, config, segment_len, num_memory_tokens):
    unit = segment_len + num_memory_tokens
    lengths = LENGTHS if (segment_len, num_memory_tokens) == (S, C) else [5 * unit + 2, 1, 2 * unit, 0, segment_len]
    q, k, v, cu, bias = random_inputs(lengths, heads=1)
    q, k, v, bias = (t.detach() for t in (q, k, v, bias))
    interleaved = pattern != "causal"
    options = dict(
        pattern=pattern,
        segment_len=segment_len if interleaved else None,
        num_memory_tokens=num_memory_tokens if interleaved else None,
        score="softmax",
        scale=0.25,
        rel_bias=bias,
        silu_norm=1.0,
    )
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    counts = count_tiles(q, k, v, cu, lengths, config, options)
    args = (lengths, block_m, block_n)
    geometry = (segment_len, num_memory_tokens) if interleaved else (None, None)
    per_row = expected_counts(pattern, *args, "row", *geometry)
    per_col = expected_counts(pattern, *args, "col", *geometry)
    assert torch.equal(counts["segment_fwd"], per_row), (counts["segment_fwd"], per_row)
    assert torch.equal(counts["segment_bwd_dq"], per_row)
    assert torch.equal(counts["segment_bwd_dkdv"], per_col), (counts["segment_bwd_dkdv"], per_col)
    # Skipping is real: dense work would visit every tile at or below the diagonal.
    # kv_memory_append skips the item tiles of earlier units, once units span several tiles.
    if (
        pattern == "kv_memory_overwrite"
        and block_n == 16
        or pattern == "kv_memory_append"
        and segment_len > 2 * block_n
    ):
        causal = expected_counts("causal", *args, "row", None, None)
        assert per_row.sum() < causal.sum()
