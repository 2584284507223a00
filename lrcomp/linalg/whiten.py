"""Whitening helpers for activation-aware factorisations (SVD-LLM, JACTUS), all in fp64.

* :func:`shifted_cholesky`: ``C + delta I = L L^T`` with ``delta = 0`` when ``C`` is safely positive
  definite, else ``delta = max(0, -lambda_min(C)) + eps * trace(C) / K`` (warned once per process).
* :func:`top_eigenvectors`: the ``k`` leading eigenvectors of a symmetric matrix.
* :func:`orthonormal_union`: an orthonormal basis of ``span(A) + span(B)`` that drops near-dependent
  directions.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

# One warning per process: a model has hundreds of layers and a rank-deficient covariance
# (few calibration tokens, dead or duplicated channels) usually affects many of them.
_SHIFT_WARNED = False


def _check_square(cov: Tensor, name: str) -> None:
    if not isinstance(cov, Tensor) or cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        shape = tuple(cov.shape) if isinstance(cov, Tensor) else type(cov).__name__
        raise ValueError(f"{name} must be a square [K, K] matrix, got {shape}")


def shifted_cholesky(cov: Tensor, *, eps: float = 1e-8, name: str = "covariance") -> tuple[Tensor, float]:
    """Lower Cholesky factor of ``cov`` (fp64), shifted when ``cov`` is not positive definite.

    ``cov [K, K]`` symmetric positive semi-definite (up to round-off). Returns ``(L, delta)`` with
    ``L L^T = cov + delta * I`` and ``L [K, K]`` lower triangular, fp64.

    ``delta = 0`` when the plain Cholesky succeeds and every pivot satisfies
    ``L_kk^2 >= eps * trace(cov) / K`` (a pivot ``L_kk^2`` is a Schur complement, an upper bound of
    ``lambda_min``, so a tiny pivot proves near-singularity). Otherwise

        delta = max(0, -lambda_min(cov)) + eps * trace(cov) / K

    so that ``lambda_min(cov + delta I) >= eps * trace(cov) / K`` (condition number <= ~K / eps), and a
    :class:`RuntimeWarning` naming ``delta`` is issued once per process. For a covariance that is all
    zeros (a layer that only saw zero inputs) ``delta = 1`` (the identity: no weighting).

    Why this is still correct: minimising ``tr(E (C + delta I) E^T)`` over rank-r ``W_r`` with
    ``E = W - W_r`` exceeds the optimum of ``tr(E C E^T)`` by at most ``delta ||W - W*||_F^2``, i.e.
    relatively by about ``delta / lambda_min^+(C)`` (the smallest nonzero eigenvalue).
    """
    global _SHIFT_WARNED
    _check_square(cov, name)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    cov = cov.to(torch.float64)
    cov = 0.5 * (cov + cov.mT)
    K = cov.shape[0]
    mean_eig = float(torch.diagonal(cov).sum()) / K
    if not mean_eig > 0:
        delta, lam_min = 1.0, 0.0
    else:
        floor = eps * mean_eig
        L, info = torch.linalg.cholesky_ex(cov)
        if int(info) == 0 and float(torch.diagonal(L).square().min()) >= floor:
            return L, 0.0
        lam_min = float(torch.linalg.eigvalsh(cov)[0])
        delta = max(0.0, -lam_min) + floor
    eye = torch.eye(K, dtype=cov.dtype, device=cov.device)
    for _ in range(60):  # round-off can leave the shifted matrix just short of PD: grow the shift
        L, info = torch.linalg.cholesky_ex(cov + delta * eye)
        if int(info) == 0:
            break
        delta *= 2.0
    else:  # pragma: no cover - only for matrices with non-finite entries, rejected upstream
        raise ValueError(f"{name} could not be made positive definite (last shift {delta:.3e})")
    if not _SHIFT_WARNED:
        _SHIFT_WARNED = True
        warnings.warn(
            f"{name} [{K}x{K}] is not positive definite (smallest eigenvalue {lam_min:.3e}); added the "
            f"eigenvalue shift {delta:.3e} * I (= max(0, -lambda_min) + eps * trace / K, eps={eps:g}) before "
            "its Cholesky factorisation. Later shifts in this process are not reported.",
            RuntimeWarning,
            stacklevel=3,
        )
    return L, delta


def top_eigenvectors(sym: Tensor, k: int) -> Tensor:
    """The ``k`` eigenvectors of the symmetric ``sym [n, n]`` with the largest eigenvalues, ``[n, k]`` fp64.

    Columns are orthonormal and ordered by descending eigenvalue.
    """
    _check_square(sym, "sym")
    if k <= 0:
        return sym.new_zeros(sym.shape[0], 0, dtype=torch.float64)
    sym = sym.to(torch.float64)
    _, vecs = torch.linalg.eigh(0.5 * (sym + sym.mT))
    return vecs[:, -k:].flip(-1)


def orthonormal_union(A: Tensor, B: Tensor, *, tol: float = 1e-8) -> Tensor:
    """Orthonormal basis ``[n, m]`` of ``span(A) + span(B)``; ``A [n, a]`` has orthonormal columns.

    The columns of ``A`` come first, unchanged. ``B [n, b]`` is projected off ``span(A)`` (twice, for
    round-off: classical Gram-Schmidt with re-orthogonalisation), and the left singular vectors of
    the remainder whose singular values exceed ``tol * max(1, max_j ||B_j||)`` are appended: a
    direction of ``B`` that ``A`` (or the rest of ``B``) already spans to ``tol`` is dropped.
    """
    A = A.to(torch.float64)
    B = B.to(torch.float64)
    if B.shape[1] == 0:
        return A
    R = B - A @ (A.mT @ B)
    R = R - A @ (A.mT @ R)
    u, s, _ = torch.linalg.svd(R, full_matrices=False)
    scale = max(1.0, float(B.norm(dim=0).max()))
    keep = s > tol * scale
    return torch.cat([A, u[:, keep]], dim=1)
