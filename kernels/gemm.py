"""One fused Triton GEMM that every pass of the low-rank linear op is built from.

    C[P, Q] = (A * ascale) @ B  +  alpha2 * A2 @ B2     (then * colscale, + bias)

with optional side outputs, each fused into the epilogue or the main loop:

    DD[Q]     += sum_p T[p, q] * acc[p, q]     (before colscale: the dd of the backward pass)
    ROWSUM[P] += sum_r A[p, r]                 (db when A = dy^T)

A is [P, R], B is [R, Q], A2 is [P, R2], B2 is [R2, Q]; any strides, so transposes are
views. Accumulation is fp32 whatever the input dtype. Two schedules share the kernel:

- tiled ("prefill"): one program per output tile, result stored in C's dtype;
- split-K ("decode", and any GEMM whose output has too few tiles to fill the GPU): the
  reduction is split over SPLIT_K programs that atomically add into an fp32 C.

The pass-specific wiring lives in :mod:`lowrank_linear` beside this file.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
import triton.testing

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _configs(tiles, split_ks):
    return [
        triton.Config({"BLOCK_P": p, "BLOCK_Q": q, "BLOCK_R": r, "SPLIT_K": s, "GROUP_P": 8},
                      num_warps=w, num_stages=st)
        for (p, q, r, w, st) in tiles
        for s in split_ks
    ]


if _INTERPRET:
    # The interpreter runs every config it is given: one small config each, and split-K = 2
    # so that the atomic path is exercised on the CPU too.
    _TILED_CONFIGS = _configs([(16, 32, 16, 1, 1)], [1])
    _SPLIT_CONFIGS = _configs([(16, 32, 16, 1, 1)], [2])
else:
    # Few configs on purpose: every config is one compile per kernel variant (dtype, fused
    # side outputs), so the first call of a new variant costs ~1 s per config. The first
    # entry of each list is the one used when autotuning is off (LRCOMP_AUTOTUNE=0).
    _TILED_CONFIGS = _configs(
        [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)],
        [1],
    )
    _SPLIT_CONFIGS = _configs([(16, 64, 128, 4, 4), (32, 128, 64, 4, 4), (64, 64, 128, 4, 3)], [4, 16])
    if os.environ.get("LRCOMP_AUTOTUNE", "1").strip() in ("0", "false", "no"):
        _TILED_CONFIGS, _SPLIT_CONFIGS = _TILED_CONFIGS[:1], _SPLIT_CONFIGS[:1]


def _quick_bench(kernel_call, quantiles):
    """Autotuning timer: a short ``do_bench`` (5 ms warm-up, 25 ms of repeats) per config."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


_KEY = ["P_BUCKET", "Q_BUCKET", "R_BUCKET", "HAS_SECOND"]
_RESET = ["C", "DD", "ROWSUM"]


@triton.jit
def _lowrank_gemm_kernel(
    A, B, C, P, Q, R,
    stride_ap, stride_ar, stride_br, stride_bq, stride_cp, stride_cq,
    ASCALE,
    A2, B2, R2, stride_a2p, stride_a2r, stride_b2r, stride_b2q, alpha2,
    COLSCALE, BIAS,
    DD, T, stride_tp, stride_tq,
    ROWSUM,
    P_BUCKET, Q_BUCKET, R_BUCKET,
    HAS_ASCALE: tl.constexpr, HAS_SECOND: tl.constexpr, HAS_COLSCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DD: tl.constexpr, HAS_ROWSUM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_P: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_p = tl.cdiv(P, BLOCK_P)
    num_q = tl.cdiv(Q, BLOCK_Q)
    # Grouped tile order: GROUP_P row-tiles share their B column-tiles in L2.
    per_group = GROUP_P * num_q
    first_p = (pid // per_group) * GROUP_P
    group_size = min(num_p - first_p, GROUP_P)
    pid_p = first_p + (pid % per_group) % group_size
    pid_q = (pid % per_group) // group_size

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_r = tl.arange(0, BLOCK_R)
    mask_p = offs_p < P
    mask_q = offs_q < Q

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for r0 in range(pid_k * BLOCK_R, R, SPLIT_K * BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < R
        a = tl.load(A + offs_p[:, None] * stride_ap + rr[None, :] * stride_ar,
                    mask=mask_p[:, None] & mask_r[None, :], other=0.0)
        if HAS_ROWSUM:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
        if HAS_ASCALE:
            s = tl.load(ASCALE + rr, mask=mask_r, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * s[None, :]).to(B.dtype.element_ty)
        b = tl.load(B + rr[:, None] * stride_br + offs_q[None, :] * stride_bq,
                    mask=mask_r[:, None] & mask_q[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if HAS_SECOND:
        acc2 = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        for r0 in range(pid_k * BLOCK_R, R2, SPLIT_K * BLOCK_R):
            rr = r0 + offs_r
            mask_r = rr < R2
            a2 = tl.load(A2 + offs_p[:, None] * stride_a2p + rr[None, :] * stride_a2r,
                         mask=mask_p[:, None] & mask_r[None, :], other=0.0)
            b2 = tl.load(B2 + rr[:, None] * stride_b2r + offs_q[None, :] * stride_b2q,
                         mask=mask_r[:, None] & mask_q[None, :], other=0.0)
            acc2 = tl.dot(a2, b2, acc2, input_precision=PRECISION)
        acc += alpha2 * acc2

    mask_c = mask_p[:, None] & mask_q[None, :]
    if HAS_DD:
        tt = tl.load(T + offs_p[:, None] * stride_tp + offs_q[None, :] * stride_tq, mask=mask_c, other=0.0)
        tl.atomic_add(DD + offs_q, tl.sum(tt.to(tl.float32) * acc, axis=0), mask=mask_q)
    if HAS_ROWSUM:
        if pid_q == 0:
            tl.atomic_add(ROWSUM + offs_p, rowsum, mask=mask_p)
    if HAS_COLSCALE:
        cs = tl.load(COLSCALE + offs_q, mask=mask_q, other=0.0).to(tl.float32)
        acc = acc * cs[None, :]
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_q, mask=mask_q, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    c_ptrs = C + offs_p[:, None] * stride_cp + offs_q[None, :] * stride_cq
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_c)
    else:
        tl.atomic_add(c_ptrs, acc, mask=mask_c)


_tiled = triton.autotune(configs=_TILED_CONFIGS, key=_KEY, reset_to_zero=_RESET, do_bench=_quick_bench)(
    _lowrank_gemm_kernel)
_split = triton.autotune(configs=_SPLIT_CONFIGS, key=_KEY, reset_to_zero=_RESET, do_bench=_quick_bench)(
    _lowrank_gemm_kernel)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _bucket(n: int) -> int:
    """Autotune key of a dimension: the next power of two (M=1..16 get exact buckets)."""
    return 1 << max(0, (n - 1).bit_length())


def use_split_k(P: int, Q: int, R: int) -> bool:
    """Split the reduction when the output has too few tiles to fill the GPU.

    Decode (P <= 16 tokens) always splits; so do the weight gradients of training (small
    [r, K] or [N, r] outputs reduced over many tokens).
    """
    if P <= 16:
        return True
    return triton.cdiv(P, 64) * triton.cdiv(Q, 64) < 128 and R >= 2048


def lowrank_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    ascale: torch.Tensor | None = None,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    alpha2: float = 0.0,
    colscale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dd: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    rowsum: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(a * ascale) @ b + alpha2 * a2 @ b2``, then ``* colscale + bias``: ``[P, Q]`` in ``out_dtype``.

    a: ``[P, R]``, b: ``[R, Q]``, a2: ``[P, R2]``, b2: ``[R2, Q]`` (any strides), ascale ``[R]``,
    colscale and bias ``[Q]``. ``dd`` (fp32 ``[Q]``, zeroed by the caller) receives
    ``sum_p t * acc`` before colscale, ``t`` being ``[P, Q]``; ``rowsum`` (fp32 ``[P]``,
    zeroed) receives the row sums of ``a``.
    """
    P, R = a.shape
    Q = b.shape[1]
    has_second = a2 is not None
    R2 = a2.shape[1] if has_second else 0
    split = use_split_k(P, Q, R + R2)
    out = torch.zeros((P, Q), device=a.device, dtype=torch.float32) if split else \
        torch.empty((P, Q), device=a.device, dtype=out_dtype)
    dummy = out.new_empty(1, dtype=torch.float32)
    a2_, b2_ = (a2, b2) if has_second else (dummy.view(1, 1), dummy.view(1, 1))
    t_ = t if dd is not None else dummy.view(1, 1)
    precision = "tf32" if a.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    kernel = _split if split else _tiled

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(Q, meta["BLOCK_Q"]), meta["SPLIT_K"])

    kernel[grid](
        a, b, out, P, Q, R,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        ascale if ascale is not None else dummy,
        a2_, b2_, R2, a2_.stride(0), a2_.stride(1), b2_.stride(0), b2_.stride(1), float(alpha2),
        colscale if colscale is not None else dummy, bias if bias is not None else dummy,
        dd if dd is not None else dummy, t_, t_.stride(0), t_.stride(1),
        rowsum if rowsum is not None else dummy,
        _bucket(P), _bucket(Q), _bucket(R + R2),
        HAS_ASCALE=ascale is not None, HAS_SECOND=has_second, HAS_COLSCALE=colscale is not None,
        HAS_BIAS=bias is not None, HAS_DD=dd is not None, HAS_ROWSUM=rowsum is not None,
        PRECISION=precision,
    )
    return out.to(out_dtype) if split else out
