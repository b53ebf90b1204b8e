"""The package without its compiled extension, the backend report, and the CUDA sources."""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rec2pm_kernels
from rec2pm_kernels import backends

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter where importing rec2pm_kernels._C fails, as on an install
# without a C++ compiler (REC2PM_BUILD_EXT=0).
WITHOUT_EXTENSION = textwrap.dedent("""
    import importlib.abc, sys

    class HideExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "rec2pm_kernels._C":
                raise ImportError("hidden by the test")
            return None

    sys.meta_path.insert(0, HideExtension())
    import torch
    import rec2pm_kernels
    status = rec2pm_kernels.backends()["cpp"]
    assert not status.available and "not built" in status.reason, status
    q = torch.randn(7, 2, 4)
    out = rec2pm_kernels.segment_attention(q, q, q, torch.tensor([0, 7]), 7, pattern="global",
                                           segment_len=2, num_memory_tokens=1)
    print("ok", tuple(out.shape), status.reason)
""")


def test_imports_and_runs_without_extension():
    result = subprocess.run([sys.executable, "-c", WITHOUT_EXTENSION], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok (7, 2, 4)")
    assert "hidden by the test" in result.stdout


def test_backend_report():
    status = backends()
    assert set(status) == {"torch", "triton", "cpp"}
    assert status["torch"].available and "segment_attention" in status["torch"].ops
    assert status["cpp"].reason
    triton_runs_here = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    assert status["triton"].available == (triton_runs_here and importlib.util.find_spec("triton") is not None)
    assert status["triton"].reason
    if status["triton"].available:
        assert set(status["triton"].ops) == {"segment_attention", "cached_step_attention"}
    if rec2pm_kernels._extension.C is not None:
        assert status["cpp"].available and set(status["cpp"].ops) == {"segment_attention", "cached_step_attention"}
        assert "forward only" in status["cpp"].reason
    else:
        assert not status["cpp"].available and "not built" in status["cpp"].reason
    if rec2pm_kernels._extension.C is None and os.environ.get("REC2PM_REQUIRE_EXT") == "1":
        pytest.fail(f"REC2PM_REQUIRE_EXT=1 but the extension is missing: {rec2pm_kernels._extension.IMPORT_ERROR}")


@pytest.mark.aot
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_cuda_sources_compile(arch, tmp_path):
    """The CUDA kernel compiles for Ampere and Hopper; prints ptxas register and spill figures."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = ROOT / "csrc" / "cuda" / "patterns_kernel.cu"
    cmd = [
        nvcc,
        "-c",
        str(src),
        "-o",
        str(tmp_path / "k.o"),
        "-std=c++17",
        f"-arch={arch}",
        "-Xptxas",
        "-v",
        "-I",
        str(ROOT / "csrc" / "include"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    usage = [line.strip() for line in result.stderr.splitlines() if "registers" in line or "spill" in line]
    print(f"\n{arch}: " + " | ".join(usage))
    assert usage, result.stderr
    assert all("0 bytes spill stores" in line for line in usage if "spill" in line), usage
