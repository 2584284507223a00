"""Covariance update op: ``master += upper_triangle(x^T x)``; dispatch to csrc/covariance.cu or the reference.

``master`` is ``[d, d]`` fp64 and holds the upper triangle only (its strict lower part stays
zero); ``x`` is ``[M, d]`` in bf16/fp16/fp32. Products are summed in fp32 over at most
:data:`ROWS_PER_FOLD` rows and then added into ``master`` in fp64, in the reference and in
the CUDA kernel alike, so the fp32 rounding error is bounded by the chunk length whatever
the batch size. The public entry point is :class:`lrcomp.calib.CovarianceAccumulator`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lrcomp import _ext

ROWS_PER_FOLD = 8192  # same as kRowsPerFold in csrc/covariance.cu

# Column-block width of the reference: blocks of the upper triangle are one GEMM each, so
# about half of the full x^T x is computed.
_BLOCK = 512


def covariance_update_reference(master: Tensor, x: Tensor) -> None:
    """In place: ``master[i, j] += sum_t x[t, i] x[t, j]`` for ``i <= j`` (fp32 sums, fp64 master)."""
    d = master.shape[0]
    for r0 in range(0, x.shape[0], ROWS_PER_FOLD):
        xf = x[r0:r0 + ROWS_PER_FOLD].float()
        for j0 in range(0, d, _BLOCK):
            j1 = min(d, j0 + _BLOCK)
            block = xf[:, :j1].mT @ xf[:, j0:j1]  # rows 0..j1 of columns j0..j1: upper part only
            block[j0:j1].triu_()  # the diagonal block keeps its upper triangle
            master[:j1, j0:j1] += block.double()


def covariance_update_(master: Tensor, x: Tensor) -> None:
    """Unvalidated in-place update; the extension's kernel for CUDA tensors when it loaded."""
    if master.device.type == "cuda" and _ext.has_cuda_ext():
        torch.ops.lrcomp.covariance_update_(master, x)
    else:
        covariance_update_reference(master, x)


def symmetrize(master: Tensor) -> Tensor:
    """The full symmetric matrix from an upper-triangle master: ``triu(M) + triu(M, 1)^T``."""
    upper = master.triu()
    return upper + upper.triu(1).mT
