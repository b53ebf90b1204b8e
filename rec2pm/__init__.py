"""rec2pm: the model layer of Rec2PM on top of rec2pm_kernels.

* ``rec2pm.layout``: packs ragged histories into the streams of both training stages, the
  memory update and serving (and maps outputs back).
* ``rec2pm.config``: model configurations and the named reference settings.
* ``rec2pm.backbones``: SASRec and HSTU blocks and the decoder that stacks them.
* ``rec2pm.methods``: Rec2PM and every baseline behind one interface (``build_model``).
* ``rec2pm.losses``: full and sampled softmax next-item losses.
"""

import importlib

__all__ = ["layout"]


def __getattr__(name: str):
    # Submodules load on first use, so that ``rec2pm.serving.store`` (no torch) stays light.
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'rec2pm' has no attribute {name!r}")
