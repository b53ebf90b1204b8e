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
    assert set(status) == {"torch", "triton", "cpp", "cuda"}
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


CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def ptxas_usage(stderr: str) -> list[str]:
    """One line per kernel: its (demangled where possible) name, registers, stack, spills, shared memory."""
    lines, kernel, frame = [], None, ""
    for line in stderr.splitlines():
        if "Compiling entry function" in line:
            kernel = line.split("'")[1]
            for known in (
                "cached_step_append",
                "cached_step_chunk",
                "cached_step_merge",
                "segment_block_chunk",
                "segment_block_merge",
                "visibility_mask",
            ):
                if known in kernel:
                    element = next((t for t in ("__nv_bfloat16", "__half", "If") if t in kernel), "")
                    kernel = known + {"__nv_bfloat16": "<bf16>", "__half": "<fp16>", "If": "<fp32>"}.get(element, "")
        elif "bytes stack frame" in line:
            frame = line.strip()
        elif "Used" in line and "registers" in line and kernel:
            lines.append(f"{kernel}: {line.split('info    :')[-1].strip()}; {frame}")
            kernel = None
    return lines


@pytest.mark.aot
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile(arch, source, tmp_path):
    """Every CUDA kernel compiles for Ampere and Hopper without spills; prints ptxas's figures."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [
        nvcc,
        "-c",
        str(source),
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
    usage = ptxas_usage(result.stderr)
    print(f"\n{arch} {source.name}:\n  " + "\n  ".join(usage))
    assert usage, result.stderr
    assert all("0 bytes spill stores" in line and "0 bytes spill loads" in line for line in usage), usage


# The torch-facing CUDA wrappers and the CUDA half of the bindings as one translation unit:
# they build only where torch has CUDA, so this is what checks them on a CPU machine.
CUDA_HOST_UNIT = """
#include "bindings.cpp"
#include "cuda/attention_cuda.cpp"
#include "cuda/patterns_cuda.cpp"
"""


@pytest.mark.aot
def test_cuda_host_wrappers_compile(tmp_path):
    """attention_cuda.cpp, patterns_cuda.cpp and bindings.cpp with REC2PM_WITH_CUDA against
    torch's headers (a syntax and type check; nothing is linked).  A CPU build of torch ships
    the c10/cuda headers but not the one CMake generates for them, an empty macro file here."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    cuda_include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    if cxx is None or not (cuda_include / "cuda_runtime.h").exists():
        pytest.skip("needs a C++ compiler and the CUDA headers")
    from torch.utils import cpp_extension

    generated = tmp_path / "c10" / "cuda" / "impl"
    generated.mkdir(parents=True)
    (generated / "cuda_cmake_macros.h").write_text("#pragma once\n")
    unit = tmp_path / "cuda_host_unit.cpp"
    unit.write_text(CUDA_HOST_UNIT)
    import sysconfig

    includes = [ROOT / "csrc" / "include", ROOT / "csrc", *cpp_extension.include_paths(), tmp_path, cuda_include]
    cmd = [cxx, "-fsyntax-only", "-w", "-std=c++17", "-DREC2PM_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C"]
    cmd += [f"-I{p}" for p in [*includes, sysconfig.get_paths()["include"]]] + [str(unit)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
