"""Dense per-sequence attention math shared by the test-only oracles.

Deliberately plain: a full score matrix, an explicit mask, no chunking.  The oracles
call it once per sequence with a dense boolean mask built from the pattern rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    """float64 for fp32/fp64 inputs and fp32 for fp16/bf16 when ``upcast``, else the input dtype."""
    if not upcast:
        return dtype
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    score: str,
    scale: float,
    silu_norm: float | None,
) -> torch.Tensor:
    """``q: (n, H, D)``, ``k: (m, H, D)``, ``v: (m, H, Dv)``, ``mask: (n, m)`` bool, ``bias: (H, n, m)``.

    Returns ``(n, H, Dv)`` in the dtype of the inputs.
    """
    s = torch.einsum("nhd,mhd->hnm", q, k) * scale
    if bias is not None:
        s = s + bias
    if score == "softmax":
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    else:
        p = F.silu(s).masked_fill(~mask, 0.0) / silu_norm
    return torch.einsum("hnm,mhd->nhd", p, v)
