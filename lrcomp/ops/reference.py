"""Pure-PyTorch reference of the masked-singular-value low-rank linear op.

This is the CPU path and the oracle of every kernel test. With x2 [M, K], V [r, K],
d [r], U [N, r], optional bias [N] and an optional dense branch W0 [N, K] scaled by lam:

    t  = x2 @ V^T                     [M, r]
    y  = (t * d) @ U^T + b + lam * x2 @ W0^T     [M, N]

and, for an output gradient dy [M, N], with t~ = t * d:

    dU = dy^T @ t~      dt~ = dy @ U      dd = sum_rows(t * dt~)      dt = dt~ * d
    dV = dt^T @ x2      dx  = dt @ V + lam * dy @ W0                 db = sum_rows(dy)
"""

from __future__ import annotations

import torch
from torch import Tensor


def lowrank_linear_forward(
    x2: Tensor,
    V: Tensor,
    d: Tensor,
    U: Tensor,
    bias: Tensor | None = None,
    dense_weight: Tensor | None = None,
    dense_scale: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Returns ``(y [M, N], t [M, r])``; t is kept for the backward pass."""
    t = x2 @ V.t()
    scaled = t * d.to(t.dtype)
    y = scaled @ U.t() if bias is None else torch.addmm(bias, scaled, U.t())
    if dense_weight is not None and dense_scale != 0.0:
        y = y.addmm(x2, dense_weight.t(), alpha=dense_scale)
    return y, t


def lowrank_linear_backward(
    dy: Tensor,
    x2: Tensor,
    t: Tensor,
    V: Tensor,
    d: Tensor,
    U: Tensor,
    dense_weight: Tensor | None,
    dense_scale: float,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """Gradients ``(dx, dV, dd, dU, db)``; an entry is None where ``needs`` says False.

    ``needs`` lists, in order, whether x, V, d, U and bias need a gradient. dd is
    returned in d's dtype and summed in fp32 (fp64 for fp64 inputs).
    """
    need_x, need_v, need_d, need_u, need_b = needs
    dx = dV = dd = dU = db = None
    dcast = d.to(dy.dtype)
    if need_u:
        dU = dy.t() @ (t * dcast)
    if need_x or need_v or need_d:
        dt_scaled = dy @ U
        if need_d:
            acc = torch.promote_types(t.dtype, torch.float32)  # never sum fp64 in fp32
            dd = (t.to(acc) * dt_scaled.to(acc)).sum(0).to(d.dtype)
        if need_x or need_v:
            dt = dt_scaled * dcast
            if need_v:
                dV = dt.t() @ x2
            if need_x:
                dx = dt @ V
    if need_x and dense_weight is not None and dense_scale != 0.0:
        dx = dx.addmm(dy, dense_weight, alpha=dense_scale)
    if need_b:
        db = dy.sum(0)
    return dx, dV, dd, dU, db
