"""``segment_attention``: varlen attention under the Rec2PM patterns.

* ``oracle.py``: the test-only reference (dense masks, float64 math for fp32 inputs).
* ``torch_backend.py``: the fast differentiable PyTorch path (row-chunked, bounded memory).
"""
