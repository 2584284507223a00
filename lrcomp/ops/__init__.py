"""lrcomp's ops: the only module that dispatches to the Triton kernels and the CUDA extension."""

from lrcomp.ops.lowrank_linear import lowrank_linear

__all__ = ["lowrank_linear"]
