"""Layers: the drop-in low-rank replacement of ``nn.Linear``."""

from lrcomp.layers.lowrank_linear import LowRankLinear
from lrcomp.layers.masks import MASK_FNS

__all__ = ["MASK_FNS", "LowRankLinear"]
