"""The ``lrcomp::lowrank_linear`` custom op: dispatch, fake implementation, autograd.

Two torch.library custom ops carry the work: ``lrcomp::lowrank_linear_fwd`` returns
``(y, t)`` and ``lrcomp::lowrank_linear_bwd`` the gradients. Each has a fake (meta)
implementation, so graphs with them compile with ``torch.compile(fullgraph=True)``, and
picks its implementation at call time from :func:`lrcomp.backend.resolve`: the reference
in :mod:`lrcomp.ops.reference` or the Triton launchers of :mod:`lrcomp.kernels`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lrcomp import backend
from lrcomp.ops import reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _use_triton(x2: Tensor) -> bool:
    # fp64 (gradcheck, oracles) always runs the reference: the kernels take fp32/fp16/bf16.
    return backend.resolve(x2.device) == "triton" and x2.dtype in _TRITON_DTYPES


def _kernels():
    # Imported lazily: triton is optional and must never be touched at import time.
    from lrcomp.kernels import lowrank_linear as kernels

    return kernels


@torch.library.custom_op("lrcomp::lowrank_linear_fwd", mutates_args=())
def _fwd(
    x2: Tensor,
    V: Tensor,
    d: Tensor,
    U: Tensor,
    bias: Tensor | None,
    dense_weight: Tensor | None,
    dense_scale: float,
) -> tuple[Tensor, Tensor]:
    if _use_triton(x2):
        return _kernels().lowrank_linear_forward(x2, V, d, U, bias, dense_weight, dense_scale)
    y, t = reference.lowrank_linear_forward(x2, V, d, U, bias, dense_weight, dense_scale)
    return y, t


@_fwd.register_fake
def _fwd_fake(x2, V, d, U, bias, dense_weight, dense_scale):
    M, N, r = x2.shape[0], U.shape[0], V.shape[0]
    return x2.new_empty((M, N)), x2.new_empty((M, r))


@torch.library.custom_op("lrcomp::lowrank_linear_bwd", mutates_args=())
def _bwd(
    dy: Tensor,
    x2: Tensor,
    t: Tensor,
    V: Tensor,
    d: Tensor,
    U: Tensor,
    dense_weight: Tensor | None,
    dense_scale: float,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dV, dd, dU, db); those not needed come back as empty tensors."""
    flags = tuple(bool(n) for n in needs)
    if _use_triton(dy):
        grads = _kernels().lowrank_linear_backward(dy, x2, t, V, d, U, dense_weight, dense_scale, flags)
    else:
        grads = reference.lowrank_linear_backward(dy, x2, t, V, d, U, dense_weight, dense_scale, flags)
    return tuple(g if g is not None else dy.new_empty(0) for g in grads)


@_bwd.register_fake
def _bwd_fake(dy, x2, t, V, d, U, dense_weight, dense_scale, needs):
    shapes = [x2.shape, V.shape, d.shape, U.shape, dy.shape[1:]]
    dtypes = [x2.dtype, V.dtype, d.dtype, U.dtype, dy.dtype]
    return tuple(
        dy.new_empty(s, dtype=dt) if n else dy.new_empty(0)
        for s, dt, n in zip(shapes, dtypes, needs, strict=True)
    )


def _setup_context(ctx, inputs, output):
    x2, V, d, U, bias, dense_weight, dense_scale = inputs
    _, t = output
    ctx.save_for_backward(x2, t, V, d, U, dense_weight)
    ctx.dense_scale = dense_scale
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dt):
    x2, t, V, d, U, dense_weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[1], need[2], need[3], bool(ctx.has_bias and need[4])]
    dx, dV, dd, dU, db = _bwd(dy.contiguous(), x2, t, V, d, U, dense_weight, ctx.dense_scale, needs)
    d_dense = None
    if need[5]:
        # The dense branch is meant to be frozen; its gradient, when asked for, is one GEMM.
        d_dense = ctx.dense_scale * (dy.t() @ x2)
    return (
        dx if needs[0] else None,
        dV if needs[1] else None,
        dd if needs[2] else None,
        dU if needs[3] else None,
        db if needs[4] else None,
        d_dense,
        None,
    )


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(name: str, value: Tensor | None, ndim: int, x: Tensor) -> None:
    if value is None:
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}: put all inputs on one device")


def lowrank_linear(
    x: Tensor,
    V: Tensor,
    d: Tensor,
    U: Tensor,
    bias: Tensor | None = None,
    *,
    dense_weight: Tensor | None = None,
    dense_scale: float = 0.0,
) -> Tensor:
    """Masked-singular-value low-rank linear map.

    ``y = ((x @ V^T) * d) @ U^T + bias + dense_scale * x @ dense_weight^T``

    Args:
        x: ``[..., K]`` input, fp32/fp16/bf16 (fp64 on the reference backend).
        V: ``[r, K]`` down factor (K-contiguous, like ``nn.Linear.weight``).
        d: ``[r]`` per-direction scale ``S * mask(scores)``, x's dtype or fp32.
        U: ``[N, r]`` up factor.
        bias: optional ``[N]``.
        dense_weight: optional ``[N, K]`` dense branch (PC-LoRA, TuneComp), accumulated into the
            same output with weight ``dense_scale``.

    Returns:
        ``[..., N]`` in x's dtype. Differentiable in every tensor argument.

    Raises:
        TypeError: an argument is not a tensor or has an unsupported dtype.
        ValueError: shapes, dtypes or devices do not agree; the message names the argument.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be floating point (fp32, fp16, bf16), got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    for name, value, ndim in (("V", V, 2), ("d", d, 1), ("U", U, 2), ("bias", bias, 1),
                              ("dense_weight", dense_weight, 2)):
        if value is None and name in ("V", "d", "U"):
            raise TypeError(f"{name} must be a torch.Tensor, got None")
        _check(name, value, ndim, x)
    r, K = V.shape
    N = U.shape[0]
    if x.shape[-1] != K:
        raise ValueError(f"x has width {x.shape[-1]} but V is [r={r}, K={K}]: the last dim of x must be {K}")
    if U.shape[1] != r:
        raise ValueError(f"U must be [N, r={r}] to match V, got {tuple(U.shape)}")
    if d.shape[0] != r:
        raise ValueError(f"d must be [r={r}], got {tuple(d.shape)}")
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias must be [N={N}], got {tuple(bias.shape)}")
    if dense_weight is not None and tuple(dense_weight.shape) != (N, K):
        raise ValueError(f"dense_weight must be [N={N}, K={K}], got {tuple(dense_weight.shape)}")
    for name, value in (("V", V), ("U", U), ("bias", bias), ("dense_weight", dense_weight)):
        if value is not None and value.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {value.dtype} but x has {x.dtype}: cast them to one dtype")
    if d.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"d must have x's dtype ({x.dtype}) or float32, got {d.dtype}")
    if not isinstance(dense_scale, (int, float)):
        raise TypeError(f"dense_scale must be a Python float, got {type(dense_scale).__name__}")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if _is_plain_inference(x2, V, d, U, bias, dense_weight):
        # No autograd, no compiler, reference backend: call the reference directly. The custom
        # op's dispatch costs ~30 us a call on the CPU, 25% of a 128x384x96 layer (measured).
        y, _ = reference.lowrank_linear_forward(x2, V, d, U, bias, dense_weight, float(dense_scale))
    else:
        y, _ = _fwd(x2, V, d, U, bias, dense_weight, float(dense_scale))
    # A tensor of its own, not a view of y (F.linear and matmul return the same way): FSDP2 warns on every call
    # of a module whose output is a view, since an in-place op on it would skip the module's backward hook.
    # y is a temporary nothing else holds, so sharing its storage is safe.
    return torch.ops.aten._unsafe_view(y, (*lead, N))


def _is_plain_inference(x2: Tensor, *tensors: Tensor | None) -> bool:
    if torch.compiler.is_compiling() or _use_triton(x2):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, *tensors)):
        return False
    return True
