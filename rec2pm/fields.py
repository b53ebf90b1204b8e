"""Type checks for the dataclass configs, so a wrong-typed value is an error naming its field.

``ModelConfig``, ``TrainingOptions`` and the run tables are often filled from TOML or the
command line, where ``dropout = "0.5"`` or ``batch_size = true`` would otherwise be read
as something else (a bool is an int in Python) or fail deep inside with an unrelated error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# Annotation names (the dataclasses use postponed annotations, so these are strings).
_KINDS = {"int": "an int", "float": "a number", "bool": "true or false", "str": "a string", "None": "None"}


def describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def matches(kind: str, value: Any) -> bool:
    """Whether ``value`` is of the annotation ``kind``; bools are never ints or floats here."""
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind == "str":
        return isinstance(value, str)
    raise TypeError(f"unsupported field annotation {kind!r}")


def check_value(name: str, annotation: str, value: Any) -> None:
    """``TypeError`` naming ``name`` unless ``value`` fits ``annotation`` (e.g. ``"float | None"``)."""
    kinds = [part.strip() for part in annotation.split("|")]
    if not any(matches(kind, value) for kind in kinds):
        expected = " or ".join(_KINDS[kind] for kind in kinds)
        if "float" in kinds:
            expected = expected.replace("a number", "a finite number")
        raise TypeError(f"{name} must be {expected}, got {describe(value)}")


def check_field_types(cls, values: dict[str, Any], prefix: str = "") -> None:
    """Check every entry of ``values`` against the field of dataclass ``cls`` of that name.

    Fields whose type is itself a config class (``ModelConfig.kernels``) check themselves.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name in fields and all(kind.strip() in _KINDS for kind in str(fields[name].type).split("|")):
            check_value(prefix + name, str(fields[name].type), value)


def check_instance_types(instance, prefix: str = "") -> None:
    """Check every field of a dataclass instance (call from ``__post_init__``)."""
    values = {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}
    check_field_types(type(instance), values, prefix=prefix)
