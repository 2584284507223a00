"""Randomized SVD op: dispatch to ``torch.ops.lrcomp.rsvd`` (csrc/rsvd.cpp) and its PyTorch reference.

:func:`rsvd_reference` is the same algorithm as the C++ op step for step (the CPU path and
the oracle of the tests); :func:`rsvd` picks the extension for CUDA tensors when it loaded.
The public, validating entry point is :func:`lrcomp.linalg.rsvd`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lrcomp import _ext

ORTHO_METHODS = ("cholqr2", "householder")

# max|Q1^T Q1 - I| after CholeskyQR's first pass beyond which the entry falls back to
# Householder QR (same constant as kCholQR2Tolerance in csrc/rsvd.cpp).
CHOLQR2_TOLERANCE = 0.1


def householder_qr(Y: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced Householder QR of ``Y [B, m, k]``: ``Q`` fp32, ``R`` fp64."""
    Q, R = torch.linalg.qr(Y, mode="reduced")
    return Q, R.double()


def _cholqr_pass(Y64: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    G = Y64.mT @ Y64
    L, info = torch.linalg.cholesky_ex(G)
    R = L.mT
    Q = torch.linalg.solve_triangular(R, Y64, upper=True, left=False)
    return Q, R, info, G


def cholesky_qr2(Y: Tensor) -> tuple[Tensor, Tensor]:
    """CholeskyQR2 (Fukaya et al. 2014) of ``Y [B, m, k]`` in fp64, Householder fallback per entry.

    Two passes of ``G = Y^T Y = L L^T, Q = Y L^{-T}``: mostly GEMMs, so much faster than
    Householder QR on a GPU. An entry whose Gram matrix is not numerically positive definite,
    or whose first pass lost orthogonality (``max|Q1^T Q1 - I| > 0.1``, where one more pass no
    longer restores it), is redone with Householder QR. Returns ``Q`` fp32 and ``R`` fp64.
    """
    Y64 = Y.double()
    Q1, R1, info1, _ = _cholqr_pass(Y64)
    Q2, R2, info2, G2 = _cholqr_pass(Q1)
    eye = torch.eye(Y.shape[-1], dtype=G2.dtype, device=G2.device)
    deviation = (G2 - eye).abs().amax(dim=(-2, -1))
    bad = (info1 != 0) | (info2 != 0) | ~(deviation <= CHOLQR2_TOLERANCE)  # NaN counts as bad
    Q, R = Q2.float(), R2 @ R1
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(-1)
        Qh, Rh = householder_qr(Y.index_select(0, idx))
        Q = Q.index_copy(0, idx, Qh)
        R = R.index_copy(0, idx, Rh)
    return Q, R


def _orthonormalize(Y: Tensor, ortho: str) -> tuple[Tensor, Tensor]:
    return cholesky_qr2(Y) if ortho == "cholqr2" else householder_qr(Y)


def rsvd_reference(A: Tensor, omega: Tensor, rank: int, niter: int, ortho: str = "householder"):
    """Randomized SVD of ``A [m, n]`` or ``[B, m, n]`` from the sketch ``omega [n, k]`` (HMT 2011).

    ``Q = orth(A omega)``; ``niter`` times ``Z = orth(A^T Q), Q = orth(A Z)``; then
    ``A^T Q = P R`` and the fp64 SVD ``R^T = Ur S Vr^T`` give ``A ~ (Q Ur) S (P Vr)^T``
    (``Q^T A = R^T P^T``, so the fp64 SVD is k x k even for wide A). GEMMs in fp32.

    Returns ``U [..., m, rank], S [..., rank], Vh [..., rank, n]`` in fp32 (fp64 for fp64 A).
    """
    batched = A.ndim == 3
    Af = (A if batched else A.unsqueeze(0)).float()
    At = Af.mT
    Q, _ = _orthonormalize(Af @ omega, ortho)
    for _ in range(niter):
        Z, _ = _orthonormalize(At @ Q, ortho)
        Q, _ = _orthonormalize(Af @ Z, ortho)
    P, R = _orthonormalize(At @ Q, ortho)
    Ur, S, Vrh = torch.linalg.svd(R.mT, full_matrices=False)
    U = Q.double() @ Ur[..., :rank]
    Vh = (P.double() @ Vrh[..., :rank, :].mT).mT
    S = S[..., :rank]
    out = torch.float64 if A.dtype == torch.float64 else torch.float32
    U, S, Vh = U.to(out).contiguous(), S.to(out).contiguous(), Vh.to(out).contiguous()
    if not batched:
        U, S, Vh = U.squeeze(0), S.squeeze(0), Vh.squeeze(0)
    return U, S, Vh


def draw_sketch(n: int, k: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """The Gaussian sketch ``omega [n, k]`` (fp32), drawn on the CPU so it is the same on every device.

    One sketch serves the whole batch, so a batched call equals per-matrix calls with the same
    generator state.
    """
    omega = torch.randn((n, k), generator=generator, dtype=torch.float32, device="cpu")
    return omega.to(device)


def use_extension(t: Tensor) -> bool:
    """Dispatch rule: the extension for CUDA tensors when it loaded, the reference elsewhere."""
    return t.device.type == "cuda" and _ext.has_cuda_ext()


def rsvd(A: Tensor, rank: int, *, oversample: int, niter: int, generator: torch.Generator | None = None,
         ortho: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Unvalidated randomized SVD (see :func:`lrcomp.linalg.rsvd`).

    ``ortho`` is ``"cholqr2"`` or ``"householder"``; None picks CholeskyQR2 on the extension
    (GEMM-bound, fast on a GPU) and Householder on the reference (LAPACK, most robust).
    """
    m, n = A.shape[-2], A.shape[-1]
    k = min(rank + oversample, m, n)
    omega = draw_sketch(n, k, generator, A.device)
    if use_extension(A):
        return tuple(torch.ops.lrcomp.rsvd(A, omega, rank, niter, ortho or "cholqr2"))
    return rsvd_reference(A, omega, rank, niter, ortho or "householder")
