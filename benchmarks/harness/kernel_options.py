"""The model benchmarks' kernel options, set once per run from the command line.

``pytest benchmarks/ --kernel-backend torch --allow-tf32 --deterministic`` builds every
benchmarked model with ``ModelConfig.kernels`` set accordingly (default: the model's own
default, ``backend="auto"``).  The run's JSON record stores the value.
"""

from __future__ import annotations

from rec2pm.config import KernelOptions

_current = KernelOptions()


def configure(options: KernelOptions) -> None:
    global _current
    _current = options


def kernel_options() -> KernelOptions:
    return _current
