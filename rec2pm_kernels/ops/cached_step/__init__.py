"""``cached_step_attention``: new rows over a per-user K/V cache (serving, forward only).

* ``oracle.py``: the test-only reference (dense, float64 math for fp32 inputs).
* ``torch_backend.py``: the vectorised PyTorch path with the in-place cache append.
* ``cpp_backend.py``: the C++ CPU path (``csrc/cpu/attention_cpu.cpp``), forward only;
  long caches split over threads in fixed chunks (``csrc/include/rec2pm/split_keys.h``).
* ``cuda_backend.py``: the compiled CUDA path (``csrc/cuda/attention_kernels.cu``): append,
  split-K programs, merge.
* ``triton_backend.py``: the Triton launcher: cache append, split-K launch, combine.
* ``triton_kernel.py``: the kernel, sharing its tile math with ``segment_attention``
  through ``ops/triton_tiles.py``.

Their tests: ``tests/kernels/cached_step/`` (``test_oracle.py`` on every backend, one file per
backend beside it).
"""
