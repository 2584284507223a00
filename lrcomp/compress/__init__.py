"""Compression core: factorisations, global rank allocation and one-shot compression."""

from lrcomp.compress.allocate import RankAllocation, allocate_ranks
from lrcomp.compress.config import CompressionConfig
from lrcomp.compress.cost import LatencyTable, measure_latency_table
from lrcomp.compress.factorizations import FACTORIZATIONS, REQUIRED_STATS, factorize
from lrcomp.compress.oneshot import compress, summary

__all__ = ["FACTORIZATIONS", "REQUIRED_STATS", "CompressionConfig", "LatencyTable", "RankAllocation",
           "allocate_ranks", "compress", "factorize", "measure_latency_table", "summary"]
