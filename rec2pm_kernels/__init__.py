"""rec2pm_kernels: attention kernels for long-sequence generative recommendation with Rec2PM memory.

Public API:

* ``segment_attention``: packed varlen attention under the ``causal``, ``global`` and
  kv-memory patterns, softmax or SiLU scores, optional relative-position bias; HSTU's
  masks (candidates, contextual prefix, local window), timestamp bias and dropout.
* ``cached_step_attention``: new rows over a per-user K/V cache, for serving.
* ``backends()``: which backends (``torch``, ``triton``, ``cpp``) run here, and why not.
* ``rec2pm_kernels.compat.hstu``: HSTU's own entry points (``hstu_mha``, ``cached_hstu_mha``).
"""

from .backends import backends
from .interface import cached_step_attention, segment_attention
from .modules import SegmentAttention
from .patterns import PATTERNS, SCORES, PatternSpec

__version__ = "0.1.0"
__all__ = [
    "segment_attention",
    "cached_step_attention",
    "SegmentAttention",
    "backends",
    "PATTERNS",
    "PatternSpec",
    "SCORES",
    "__version__",
]
