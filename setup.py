"""Build entry point: installs rec2pm_kernels and rec2pm, and builds rec2pm_kernels._C.

Environment switches:

* ``REC2PM_BUILD_EXT``: ``auto`` (default: build when torch's C++ toolchain is usable,
  otherwise install without the extension and say why), ``1`` (build, fail if impossible),
  ``0`` (never build).
* ``REC2PM_BUILD_CUDA``: ``auto`` (default: add the CUDA sources when torch has CUDA and
  ``nvcc`` is found), ``1`` (require them), ``0`` (CPU only).
* ``MAX_JOBS``: parallel compile jobs (torch's ninja build reads it).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent  # absolute: ninja compiles from a build folder
CSRC = ROOT / "csrc"


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"{name} must be auto, 0 or 1, got {value!r}")
    return value


def _extension_modules():
    """The extension list and the build_ext command, or ``([], {})`` without a build."""
    build = _switch("REC2PM_BUILD_EXT")
    if build == "0":
        print("rec2pm: REC2PM_BUILD_EXT=0, installing without rec2pm_kernels._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if build == "1":
            sys.exit(
                f"rec2pm: REC2PM_BUILD_EXT=1 but torch is not importable ({exc}); install torch first "
                "and build with --no-build-isolation"
            )
        print(f"rec2pm: torch is not importable ({exc}); installing without rec2pm_kernels._C")
        return [], {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        if build == "1":
            sys.exit(f"rec2pm: REC2PM_BUILD_EXT=1 but no C++ compiler ({compiler}) was found")
        print(f"rec2pm: no C++ compiler ({compiler}); installing without rec2pm_kernels._C")
        return [], {}

    include = [str(CSRC / "include"), str(CSRC)]
    sources = [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cpu").glob("*.cpp"))]
    sources.append("csrc/bindings.cpp")
    # -fno-wrapv undoes the -fwrapv in Python's default compile flags: with signed overflow
    # defined, GCC keeps the causal lane kernel's index arithmetic in a form that cost it 18%.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-wrapv"]
    cuda_switch = _switch("REC2PM_BUILD_CUDA")
    has_nvcc = cpp_extension.CUDA_HOME is not None and shutil.which(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    with_cuda = cuda_switch == "1" or (cuda_switch == "auto" and torch.version.cuda is not None and bool(has_nvcc))
    if cuda_switch == "1" and (torch.version.cuda is None or not has_nvcc):
        sys.exit("rec2pm: REC2PM_BUILD_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME)")
    if with_cuda:
        sources += [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cuda").glob("*.c*"))]
        ext = cpp_extension.CUDAExtension(
            "rec2pm_kernels._C",
            sources,
            include_dirs=include,
            define_macros=[("REC2PM_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "rec2pm_kernels._C",
            sources,
            include_dirs=include,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    print(f"rec2pm: building rec2pm_kernels._C ({'CPU + CUDA' if with_cuda else 'CPU'})")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extension_modules()

setup(
    name="rec2pm",
    version="0.1.0",
    description="Kernels and a thin model layer for long-sequence generative recommendation with Rec2PM memory",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",  # tomllib reads the training configs
    packages=find_packages(include=["rec2pm_kernels", "rec2pm_kernels.*", "rec2pm", "rec2pm.*"]),
    install_requires=[
        "torch>=2.5",
        "numpy",
        "tqdm",
        "triton>=3.6; platform_system == 'Linux'",
    ],
    entry_points={"console_scripts": ["rec2pm = rec2pm.cli:main"]},
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "pandas",  # the Parquet path of the table loader
            "pyarrow",
            "triton==3.6.*; platform_system == 'Linux'",
            "numpy<2.3",
            "redis>=5",  # the Redis memory store's integration tests (a real server: scripts/services.sh)
            "matplotlib",  # the accuracy study's plots (its miniature runs in CI)
        ],
        "data": ["pandas", "pyarrow"],  # Parquet interaction tables
        "serve": ["redis>=5"],  # the Redis memory store (SQLite and the HTTP endpoint need nothing more)
        "study": ["matplotlib"],  # python -m rec2pm study report: the plots of docs/results.md
        "bench": ["pytest>=8", "pytest-benchmark>=4", "triton==3.6.*; platform_system == 'Linux'", "numpy<2.3"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
