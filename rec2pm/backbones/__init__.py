"""Decoder blocks (SASRec, HSTU) and the decoder that stacks them over packed streams."""

from .decoder import Decoder, LayerCache
from .hstu import HSTUBlock
from .sasrec import SASRecBlock

__all__ = ["Decoder", "LayerCache", "SASRecBlock", "HSTUBlock"]
