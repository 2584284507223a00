"""Triton launchers of the masked-singular-value low-rank linear op.

Forward (x2 [M, K], V [r, K], d [r], U [N, r], bias [N], dense branch W0 [N, K] * lam):

    t = x2 @ V^T                                   one GEMM (split-K when M <= 16)
    y = (t * d) @ U^T + lam * x2 @ W0^T + bias     one GEMM: d scales t on load, the dense
                                                   branch is a second reduction into the
                                                   same accumulator, bias in the epilogue

Backward (dy [M, N]), four GEMMs with every elementwise step fused:

    dU = (dy^T @ t) * d          colscale epilogue; db = row sums of dy^T, in the same loop
    dt = (dy @ U) * d            colscale epilogue; dd = sum_rows(t * (dy @ U)) in the epilogue
    dV = dt^T @ x2
    dx = dt @ V + lam * dy @ W0  second reduction into the same accumulator

fp32 accumulation throughout; t and the gradients are returned in the inputs' dtypes
(dd in d's dtype).
"""

from __future__ import annotations

import torch

from .gemm import SUPPORTED_DTYPES, lowrank_gemm


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels take fp32/fp16/bf16 inputs, got {x.dtype}")


def lowrank_linear_forward(x2, V, d, U, bias=None, dense_weight=None, dense_scale=0.0):
    """Returns ``(y [M, N], t [M, r])`` in x2's dtype."""
    _check_dtype(x2)
    t = lowrank_gemm(x2, V.t(), out_dtype=x2.dtype)
    dense = dense_weight is not None and dense_scale != 0.0
    y = lowrank_gemm(
        t, U.t(), out_dtype=x2.dtype, ascale=d,
        a2=x2 if dense else None, b2=dense_weight.t() if dense else None, alpha2=dense_scale,
        bias=bias,
    )
    return y, t


def lowrank_linear_backward(dy, x2, t, V, d, U, dense_weight, dense_scale, needs):
    """Gradients ``(dx, dV, dd, dU, db)``; None where ``needs`` (x, V, d, U, bias) is False."""
    _check_dtype(dy)
    need_x, need_v, need_d, need_u, need_b = needs
    dx = dV = dd = dU = db = None
    db32 = dy.new_zeros(dy.shape[1], dtype=torch.float32) if need_b else None
    if need_u:
        dU = lowrank_gemm(dy.t(), t, out_dtype=U.dtype, colscale=d, rowsum=db32)
    elif need_b:
        db32 = dy.float().sum(0)
    if need_b:
        db = db32.to(dy.dtype)
    if need_x or need_v or need_d:
        dd32 = d.new_zeros(d.shape, dtype=torch.float32) if need_d else None
        dt = lowrank_gemm(dy, U, out_dtype=dy.dtype, colscale=d, dd=dd32, t=t)
        if need_d:
            dd = dd32.to(d.dtype)
        if need_v:
            dV = lowrank_gemm(dt.t(), x2, out_dtype=V.dtype)
        if need_x:
            dense = dense_weight is not None and dense_scale != 0.0
            dx = lowrank_gemm(dt, V, out_dtype=x2.dtype, a2=dy if dense else None,
                              b2=dense_weight if dense else None, alpha2=dense_scale)
    return dx, dV, dd, dU, db
