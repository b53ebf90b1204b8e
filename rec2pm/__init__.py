"""rec2pm: the model layer of Rec2PM on top of rec2pm_kernels.

* ``rec2pm.layout``: packs ragged histories into the streams of both training stages, the
  memory update and serving (and maps outputs back).
* ``rec2pm.config``: model configurations and the named reference settings.
* ``rec2pm.backbones``: SASRec and HSTU blocks and the decoder that stacks them.
* ``rec2pm.methods``: Rec2PM and every baseline behind one interface (``build_model``).
* ``rec2pm.losses``: full and sampled softmax next-item losses.
"""

from . import layout

__all__ = ["layout"]
