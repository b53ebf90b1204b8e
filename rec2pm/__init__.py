"""rec2pm: the model layer of Rec2PM on top of rec2pm_kernels.

``rec2pm.layout`` packs ragged user histories into the streams the two training stages,
the memory update and serving attend over (and maps outputs back).
"""

from . import layout

__all__ = ["layout"]
