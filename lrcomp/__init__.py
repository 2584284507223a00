"""lrcomp: fine-tune a foundation model and compress it, in one run, into a low-rank model."""

from lrcomp._ext import has_cuda_ext
from lrcomp.backend import get_backend, set_backend
from lrcomp.layers import LowRankLinear
from lrcomp.replace import compact_lowrank, replace_linears

__version__ = "0.1.0"

__all__ = [
    "LowRankLinear",
    "compact_lowrank",
    "get_backend",
    "has_cuda_ext",
    "replace_linears",
    "set_backend",
    "__version__",
]
