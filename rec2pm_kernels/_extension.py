"""Loads the optional compiled extension ``rec2pm_kernels._C``; the library runs without it."""

from __future__ import annotations

import importlib

try:
    C = importlib.import_module("rec2pm_kernels._C")

    IMPORT_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    C = None
    IMPORT_ERROR = str(exc) or type(exc).__name__


def utility_ops() -> tuple[str, ...]:
    if C is None:
        return ()
    return tuple(sorted(n for n in dir(C) if not n.startswith("_") and callable(getattr(C, n))))
