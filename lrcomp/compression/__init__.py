"""Compression core: factorisations, global rank allocation and one-shot compression."""

from lrcomp.compression.allocate import RankAllocation, allocate_ranks
from lrcomp.compression.config import CompressionConfig
from lrcomp.compression.cost import LatencyTable, measure_latency_table
from lrcomp.compression.factorizations import FACTORIZATIONS, REQUIRED_STATS, factorize
from lrcomp.compression.oneshot import compress, summary

__all__ = ["FACTORIZATIONS", "REQUIRED_STATS", "CompressionConfig", "LatencyTable", "RankAllocation",
           "allocate_ranks", "compress", "factorize", "measure_latency_table", "summary"]
