"""Rec2PM and every baseline behind one interface, built by name.

=================  ===========================================================
``rec2pm-o/-a``    two-stage teacher-forced training, token memory (``two_stage``)
``full``           causal attention over the whole history
``recent``         trained on segments without memory, served on recent items
``tok-serial-o/a`` token memory trained serially through the segment loop
``kv-mask-o/a``    kv-memory patterns; the memory is the write tokens' K/V
=================  ===========================================================
"""

from __future__ import annotations

from dataclasses import replace

from ..config import ModelConfig
from .base import LossOutput, RecModel, TrainingOptions
from .full import FullAttention, RecentOnly
from .kv_mask import KVMask, KVMemory
from .tok_serial import TokSerial
from .token_memory import Memory, ServingState, TokenMemoryModel
from .two_stage import Rec2PM

METHODS = {
    "rec2pm-o": (Rec2PM, "overwrite"),
    "rec2pm-a": (Rec2PM, "append"),
    "full": (FullAttention, None),
    "recent": (RecentOnly, None),
    "tok-serial-o": (TokSerial, "overwrite"),
    "tok-serial-a": (TokSerial, "append"),
    "kv-mask-o": (KVMask, "overwrite"),
    "kv-mask-a": (KVMask, "append"),
}


def build_model(method: str, config: ModelConfig, options: TrainingOptions | None = None, **option_overrides):
    """A model of ``method`` (a key of ``METHODS``); its mode comes from the name (``-o``:
    overwrite, ``-a``: append).  A ``mode`` given as well must agree with it: an override
    ``mode=...``, or ``options.mode`` other than the default."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    if not isinstance(config, ModelConfig):
        raise TypeError(
            f"config must be a rec2pm.config.ModelConfig (for example named_config('sasrec', "
            f"num_items=N), or ModelConfig(**fields)), got {type(config).__name__}"
        )
    if options is not None and not isinstance(options, TrainingOptions):
        raise TypeError(f"options must be a TrainingOptions or None, got {type(options).__name__}")
    cls, mode = METHODS[method]
    _check_mode_agrees(method, mode, options, option_overrides)
    options = replace(options or TrainingOptions(), **option_overrides)
    if mode is not None:
        options = replace(options, mode=mode)
    return cls(config, options)


def _check_mode_agrees(method: str, mode: str | None, options: TrainingOptions | None, overrides: dict) -> None:
    """The name sets the mode; a ``mode`` asked for explicitly that says otherwise is an error,
    not silently replaced."""
    if "mode" in overrides:
        asked, source = overrides["mode"], "mode"
    elif options is not None and options.mode != TrainingOptions.mode:
        asked, source = options.mode, "options.mode"
    else:
        return
    if mode is None:
        raise ValueError(f"{source}={asked!r}: method {method!r} keeps no memory, so it has no mode")
    if asked != mode:
        names = [name for name, (cls, m) in METHODS.items() if m == asked and cls is METHODS[method][0]]
        raise ValueError(
            f"{source}={asked!r} contradicts method {method!r}, whose name sets mode {mode!r}"
            + (f"; use method {names[0]!r}" if names else "")
        )


__all__ = [
    "METHODS",
    "build_model",
    "RecModel",
    "TokenMemoryModel",
    "Rec2PM",
    "TokSerial",
    "FullAttention",
    "RecentOnly",
    "KVMask",
    "KVMemory",
    "Memory",
    "ServingState",
    "TrainingOptions",
    "LossOutput",
]
