"""``segment_attention``: varlen attention under the Rec2PM patterns.

* ``oracle.py``: the test-only reference (dense masks, float64 math for fp32 inputs).
* ``torch_backend.py``: the fast differentiable PyTorch path (row-chunked, bounded memory).
* ``cpp_backend.py``: the C++ CPU forward (``csrc/cpu/attention_cpu.cpp``), forward only.
* ``cuda_backend.py``: the compiled CUDA forward for short blocks (``csrc/cuda/attention_kernels.cu``).
* ``triton_backend.py``: the Triton launchers and their ``torch.library`` custom ops, with
  fake implementations and the autograd link between forward and backward.
* ``triton_forward.py``: the forward kernel (online softmax or SiLU sum over visible tiles).
* ``triton_backward.py``: the dK/dV kernel (one program per key block; by default it also
  adds the relative-bias gradient with float64 atomics) and the row-block kernel, which writes dQ
  or the bias tables' deterministic gradient (relative and timestamp).

Their tests: ``tests/kernels/segment_attention/`` (``test_oracle.py`` on every backend, one file
per backend beside it).

The tile math all Triton kernels share is in ``ops/triton_tiles.py``, the pattern rule on
tiles in ``ops/triton_patterns.py``, the per-bucket sums of the bias gradients in
``ops/triton_bucket_sums.py`` and the named switch codes in ``ops/triton_codes.py``; the kernels' tuple
arguments are listed in ``ops/triton_args.py``.
"""
