"""The backends the kernel tests run on: one list, so that a test written once runs on each.

A ``Target`` is a backend on a device with the sizes its tests use: small segments on the
CPU and under the Triton interpreter (several units in short sequences, fast), the model's
geometry on a GPU.  A test module takes the ``target`` fixture (and ``dtype``, drawn from the
target's dtypes) and declares ``OP``, the op it tests; ``tests/kernels/conftest.py``
parametrizes it over every target that implements the op.  Targets that need their own
process or a device carry the mark that selects them:

* ``torch`` and ``cpp``: CPU tensors, the unit stage (``cpp`` needs the compiled extension);
* ``triton-interpreter``: CPU tensors under ``TRITON_INTERPRET=1``, the interpreter stage;
* ``triton-cuda`` and ``cuda`` (the compiled CUDA kernels): a CUDA device, ``benchmarks/gpu.sh``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rec2pm_kernels import testing

SEGMENT_ATTENTION = "segment_attention"
CACHED_STEP = "cached_step_attention"

FLOATING = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class Target:
    """A backend on a device, with the sizes, dtypes and cache cases its shared tests run at."""

    id: str
    backend: str  # the ``backend=`` argument
    device: str
    ops: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    differentiable: bool  # has a backward (forward-only backends are checked on their outputs)
    segment_len: int
    num_memory_tokens: int
    dim: int  # the head dim of the standard cases
    dim_v: int  # the value head dim of the cached-step cases (the C++ loops' generic width on the CPU)
    head_dims: tuple[tuple[int, int], ...]  # (head_dim, head_dim_v) pairs of test_head_dims
    # Cached-step cases: (id, cached slots per user, new rows per user).
    cache_cases: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    marks: tuple = ()
    long_lengths: tuple[int, ...] = ()  # added to the standard batch: rows past a kernel's key chunk

    @property
    def ragged(self) -> list[int]:
        """Empty, 1, S - 1, S, units, units plus a tail: the standard ragged batch."""
        return testing.ragged_lengths(self.segment_len, self.num_memory_tokens) + list(self.long_lengths)

    @property
    def unit(self) -> int:
        return self.segment_len + self.num_memory_tokens

    @property
    def exact_dtype(self) -> torch.dtype:
        """The most precise dtype the target computes in, for equalities of two execution modes."""
        return torch.float32 if self.backend in ("triton", "cuda") else torch.float64

    @property
    def exact_tolerance(self) -> dict:
        """``assert_close`` tolerances of two execution modes that agree up to rounding in ``exact_dtype``."""
        return dict(rtol=1e-12, atol=1e-12) if self.exact_dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)

    def pattern_kwargs(self, pattern: str, segment_len: int | None = None, num_memory_tokens: int | None = None):
        """The pattern keywords at the target's ``S`` and ``C`` (unless given)."""
        return testing.pattern_kwargs(
            pattern, segment_len or self.segment_len, num_memory_tokens or self.num_memory_tokens
        )

    @staticmethod
    def score_kwargs(score: str) -> dict:
        return testing.score_kwargs(score, silu_norm=11.0)

    def check(self, lengths, pattern: str, score: str, **kw):
        """``testing.check_segment_attention`` on this target, at its sizes unless ``kw`` names
        others; gradients too unless the backend is forward only."""
        sizes = dict(segment_len=self.segment_len, num_memory_tokens=self.num_memory_tokens, dim=self.dim)
        return testing.check_segment_attention(
            lengths,
            pattern,
            score,
            backend=self.backend,
            device=self.device,
            grads=self.differentiable,
            **(sizes | kw),
        )

    def require(self) -> None:
        """Skip (or, where CI requires it, fail) when this installation cannot run the target."""
        if self.backend == "cpp":
            from ..conftest import require_extension

            require_extension()
        elif self.backend == "cuda":
            import rec2pm_kernels

            status = rec2pm_kernels.backends()["cuda"]
            if not status.available:
                pytest.skip(f"backend='cuda': {status.reason}")


# Rows on both sides of one chunk of 256 slots (the CUDA step's split), and many chunks.
_LONG_CACHE = ("split", (255, 250, 700, 1, 3000), (1, 8, 3, 2, 1))
# Several rows, empty users; one row each over equal prefixes (the torch backend drops the
# mask); equal ends, but users without new rows.
_SMALL_CACHES = (
    ("ragged", (0, 5, 12, 3, 20), (3, 1, 0, 4, 4)),
    ("equal", (9, 9, 9), (1, 1, 1)),
    ("equal-ends", (9, 10, 10), (1, 0, 0)),
)
_CPU_SIZES = dict(segment_len=3, num_memory_tokens=2, dim=8, dim_v=6, cache_cases=_SMALL_CACHES)

TARGETS = (
    Target(
        id="torch",
        backend="torch",
        device="cpu",
        ops=(SEGMENT_ATTENTION, CACHED_STEP),
        dtypes=FLOATING,
        differentiable=True,
        head_dims=((1, 1), (8, 8), (16, 16), (64, 64), (8, 5)),
        **_CPU_SIZES,
    ),
    Target(
        id="cpp",
        backend="cpp",
        device="cpu",
        ops=(SEGMENT_ATTENTION, CACHED_STEP),
        dtypes=FLOATING,  # float64 computes in float64: test_cpp_backend.py checks it to 1e-12
        differentiable=False,
        # 8/16/32/64 take the fixed-width value loops, the others the generic one.
        head_dims=((8, 8), (16, 16), (32, 32), (64, 64), (8, 5), (16, 24), (3, 7)),
        **_CPU_SIZES,
    ),
    Target(
        id="triton-interpreter",
        backend="triton",
        device="cpu",
        ops=(SEGMENT_ATTENTION, CACHED_STEP),
        dtypes=(torch.float32,),
        differentiable=True,
        segment_len=5,
        num_memory_tokens=2,
        dim=16,
        dim_v=8,
        head_dims=((8, 8), (16, 16), (64, 64), (8, 24)),  # 8 is padded to 16 inside the kernels
        cache_cases=(("ragged", (0, 5, 40, 3, 17), (3, 1, 0, 4, 2)),),
        marks=(pytest.mark.interpreter,),
    ),
    Target(
        id="triton-cuda",
        backend="triton",
        device="cuda",
        ops=(SEGMENT_ATTENTION, CACHED_STEP),
        dtypes=FLOATING,
        differentiable=True,
        segment_len=200,  # the model's geometry
        num_memory_tokens=4,
        dim=64,
        dim_v=64,
        head_dims=((8, 8), (16, 16), (32, 32), (128, 128), (64, 32)),
        cache_cases=(("long", (0, 900, 4000, 17, 2047), (1, 1, 5, 0, 2)), *_SMALL_CACHES[:1]),
        marks=(pytest.mark.gpu,),
    ),
    Target(
        id="cuda",
        backend="cuda",
        device="cuda",
        ops=(SEGMENT_ATTENTION, CACHED_STEP),
        dtypes=FLOATING,
        differentiable=False,
        segment_len=20,
        num_memory_tokens=4,
        dim=16,
        dim_v=8,
        head_dims=((8, 8), (16, 16), (32, 32), (64, 64), (128, 128), (64, 32), (256, 256)),
        cache_cases=(*_SMALL_CACHES[:1], _LONG_CACHE),
        marks=(pytest.mark.gpu, pytest.mark.cuda_kernels),
        long_lengths=(300, 700),  # past one chunk of 256 visible keys
    ),
)


BY_ID = {target.id: target for target in TARGETS}
# The interpreter's sizes, for the Triton tests that run there only (launch paths, tile counts, configs).
TRITON_INTERPRETER = BY_ID["triton-interpreter"]


def require_backend(name: str) -> None:
    """Skip unless this installation runs the target ``name`` (other names, such as ``oracle``, need nothing)."""
    if name in BY_ID:
        BY_ID[name].require()


def targets_of(op: str) -> list[Target]:
    return [target for target in TARGETS if op in target.ops]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
