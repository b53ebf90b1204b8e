"""Named compile-time switch values the Triton kernels branch on.

``PATTERN`` and ``SCORE`` reach the kernels as integers; these names (``PATTERN == GLOBAL``,
``SCORE == SOFTMAX``) keep the kernels readable and take their values from the host tables
of ``rec2pm_kernels.patterns``, so a launcher and a kernel can never disagree on a code.
"""

from __future__ import annotations

import triton.language as tl

from ..patterns import PATTERN_CODES, SCORE_CODES

CAUSAL = tl.constexpr(PATTERN_CODES["causal"])
GLOBAL = tl.constexpr(PATTERN_CODES["global"])
KV_MEMORY_OVERWRITE = tl.constexpr(PATTERN_CODES["kv_memory_overwrite"])
KV_MEMORY_APPEND = tl.constexpr(PATTERN_CODES["kv_memory_append"])
# ``causal`` refined by HSTU's masks (``rec2pm_kernels.hstu_masks``: candidates, a contextual
# prefix, a local window) and per-sequence SiLU divisors.  A Triton-only code: the C++
# kernel takes the masks as arguments beside ``causal``.
HSTU_CAUSAL_CODE = max(PATTERN_CODES.values()) + 1
HSTU_CAUSAL = tl.constexpr(HSTU_CAUSAL_CODE)

SOFTMAX = tl.constexpr(SCORE_CODES["softmax"])
SILU = tl.constexpr(SCORE_CODES["silu"])

# Softmax runs in base 2 (exp2 is one instruction): exp(z) = exp2(z * LOG2E).
LOG2E = tl.constexpr(1.4426950408889634)

# What the row-block backward kernel makes of each tile's score gradient
# (``ops/segment_attention/triton_backward.py``): dQ, or the bias tables' deterministic sums.
WRITES_DQ = tl.constexpr(0)
WRITES_BIAS_SUMS = tl.constexpr(1)
