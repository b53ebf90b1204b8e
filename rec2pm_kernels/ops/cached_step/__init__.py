"""``cached_step_attention``: new rows over a per-user K/V cache (serving, forward only).

* ``oracle.py``: the test-only reference (dense, float64 math for fp32 inputs).
* ``torch_backend.py``: the vectorised PyTorch path with the in-place cache append.
"""
