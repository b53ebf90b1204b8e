"""Triton kernel tests run in two places, each in its own pytest process:

* ``interpreter``-marked tests: CPU tensors under ``TRITON_INTERPRET=1`` (CI; the flag is
  read when the kernels are defined, so it must be set before the process starts);
* ``gpu``-marked tests: CUDA tensors on a real GPU (``benchmarks/gpu.sh``).

Anything else here is skipped with the reason.
"""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "tests/triton/" not in item.nodeid.replace("\\", "/"):
            continue
        if "interpreter" in item.keywords and not interpreting:
            item.add_marker(
                pytest.mark.skip(
                    reason="needs TRITON_INTERPRET=1 in its own process (scripts/test.sh runs the interpreter stage)"
                )
            )
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
