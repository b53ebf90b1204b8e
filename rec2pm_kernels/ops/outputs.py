"""Allocating kernel outputs: uninitialised, so that a row a kernel never writes shows.

Outputs come from ``new_output`` (``torch.empty``).  Zeros would make a row that a kernel
forgot to write look like a valid zero output; under ``rec2pm_kernels.testing.nan_filled_outputs()``
fresh outputs are filled with NaN instead, so the tests see every unwritten row.
"""

from __future__ import annotations

import torch

_fill_with_nan = False


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _fill_with_nan and out.is_floating_point():
        out.fill_(float("nan"))
    return out
