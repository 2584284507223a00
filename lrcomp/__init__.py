"""lrcomp: fine-tune a foundation model and compress it, in one run, into a low-rank model."""

from lrcomp import integrations  # noqa: F401  (registers the Hugging Face quantizer "lrcomp", lazily)
from lrcomp._ext import has_cuda_ext
from lrcomp.backend import get_backend, set_backend
from lrcomp.calib import CalibrationStats, calibrate
from lrcomp.compression.allocate import RankAllocation, allocate_ranks
from lrcomp.compression.config import CompressionConfig
from lrcomp.compression.cost import LatencyTable, measure_latency_table
from lrcomp.compression.factorizations import factorize
from lrcomp.compression.oneshot import compress, summary
from lrcomp.layers import LowRankLinear
from lrcomp.methods import JOINT_METHODS, Compressor
from lrcomp.replace import compact_lowrank, replace_linears

__version__ = "0.1.0"

__all__ = [
    "CalibrationStats",
    "CompressionConfig",
    "Compressor",
    "JOINT_METHODS",
    "LatencyTable",
    "LowRankLinear",
    "RankAllocation",
    "allocate_ranks",
    "calibrate",
    "compact_lowrank",
    "compress",
    "factorize",
    "get_backend",
    "has_cuda_ext",
    "measure_latency_table",
    "replace_linears",
    "set_backend",
    "summary",
    "__version__",
]
