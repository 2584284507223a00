"""lrcomp.linalg.rsvd on the CPU reference: accuracy vs Eckart-Young, batching, determinism, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from lrcomp.linalg import rsvd
from lrcomp.ops import rsvd as rsvd_ops


def make_matrix(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``A = U diag(s) V^T`` (fp64) with Haar-random orthonormal U [m, p], V [n, p], p = len(s)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (U * s.double()) @ V.T


def error_ratio(A: torch.Tensor, rank: int, **kw) -> float:
    """||A - U S Vh||_F over the Eckart-Young optimum ||A - A_rank||_F."""
    U, S, Vh = rsvd(A.float(), rank, generator=torch.Generator().manual_seed(1), **kw)
    err = torch.linalg.matrix_norm(A - (U.double() * S.double()) @ Vh.double())
    s = torch.linalg.svdvals(A)
    return float(err / s[rank:].square().sum().sqrt())


@pytest.mark.parametrize(
    ("m", "n", "rank", "decay"),
    [(300, 200, 20, 0.9), (200, 300, 20, 0.9), (431, 123, 7, 0.8), (256, 256, 64, 0.95)],
)
def test_error_within_1p02_of_eckart_young_on_decaying_spectrum(m, n, rank, decay):
    s = decay ** torch.arange(min(m, n), dtype=torch.float64)
    A = make_matrix(m, n, s)
    assert error_ratio(A, rank) <= 1.02


def test_flat_spectrum_error_matches_docstring():
    # The docstring of lrcomp.linalg.rsvd states 1.0139 (niter=2) and 1.0621 (niter=0) for an
    # i.i.d. Gaussian 300 x 200 matrix at rank 20.
    A = torch.randn(300, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ratio2 = error_ratio(A, 20)
    ratio0 = error_ratio(A, 20, niter=0)
    assert ratio2 == pytest.approx(1.0139, abs=2e-3)
    assert ratio0 == pytest.approx(1.0621, abs=2e-3)


def test_singular_values_and_orthonormal_factors():
    s = 0.9 ** torch.arange(200, dtype=torch.float64)
    A = make_matrix(300, 200, s)
    U, S, Vh = rsvd(A.float(), 20, generator=torch.Generator().manual_seed(0))
    assert U.shape == (300, 20) and S.shape == (20,) and Vh.shape == (20, 200)
    torch.testing.assert_close(S.double(), s[:20], rtol=2e-4, atol=0)
    assert bool((S[:-1] >= S[1:]).all())
    eye = torch.eye(20, dtype=torch.float64)
    torch.testing.assert_close(U.double().T @ U.double(), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh.double() @ Vh.double().T, eye, atol=1e-5, rtol=0)


def test_full_rank_reconstructs_exactly():
    A = torch.randn(40, 30, dtype=torch.float64)
    U, S, Vh = rsvd(A, 30, generator=torch.Generator().manual_seed(0))
    assert U.dtype == torch.float64
    # fp32 GEMMs: exact up to fp32 rounding.
    rel = torch.linalg.matrix_norm(A - (U * S) @ Vh) / torch.linalg.matrix_norm(A)
    assert rel < 1e-5


def test_batched_equals_per_matrix():
    A = torch.stack([make_matrix(120, 90, 0.85 ** torch.arange(90.0), seed=i).float() for i in range(4)])
    Ub, Sb, Vhb = rsvd(A, 10, generator=torch.Generator().manual_seed(3))
    assert Ub.shape == (4, 120, 10) and Sb.shape == (4, 10) and Vhb.shape == (4, 10, 90)
    for i in range(4):
        U, S, Vh = rsvd(A[i], 10, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(Sb[i], S, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((Ub[i] * Sb[i]) @ Vhb[i], (U * S) @ Vh, rtol=1e-4, atol=1e-5)


def test_same_generator_same_result_and_seed_matters():
    A = torch.randn(100, 80)
    first = rsvd(A, 8, niter=0, generator=torch.Generator().manual_seed(7))
    again = rsvd(A, 8, niter=0, generator=torch.Generator().manual_seed(7))
    other = rsvd(A, 8, niter=0, generator=torch.Generator().manual_seed(8))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(5)
    g1 = rsvd(A, 8)
    torch.manual_seed(5)
    g2 = rsvd(A, 8)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_any_float_dtype(dtype):
    A = make_matrix(64, 48, 0.8 ** torch.arange(48.0)).to(dtype)
    U, S, Vh = rsvd(A, 5, generator=torch.Generator().manual_seed(0))
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert U.dtype == S.dtype == Vh.dtype == expected
    ref = torch.linalg.svdvals(A.double())[:5]
    torch.testing.assert_close(S.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ortho", ["householder", "cholqr2"])
def test_both_orthonormalisations_agree(ortho):
    A = make_matrix(150, 100, 0.9 ** torch.arange(100.0)).float()
    omega = rsvd_ops.draw_sketch(100, 18, torch.Generator().manual_seed(0), A.device)
    U, S, Vh = rsvd_ops.rsvd_reference(A, omega, 10, 2, ortho)
    Uh, Sh, Vhh = rsvd_ops.rsvd_reference(A, omega, 10, 2, "householder")
    torch.testing.assert_close(S, Sh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((U * S) @ Vh, (Uh * Sh) @ Vhh, rtol=1e-4, atol=1e-5)


def test_cholqr2_falls_back_when_orthogonality_is_lost():
    # Rank-3 columns in a 5-column block: the Gram matrix is singular, CholeskyQR breaks down,
    # and the entry must come back orthonormal from the Householder fallback.
    g = torch.Generator().manual_seed(0)
    good = torch.randn(1, 50, 5, generator=g)
    bad = torch.randn(1, 50, 3, generator=g) @ torch.randn(3, 5, generator=g)
    Y = torch.cat([good, bad])
    Q, R = rsvd_ops.cholesky_qr2(Y)
    eye = torch.eye(5)
    for i in range(2):
        torch.testing.assert_close(Q[i].T @ Q[i], eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(Q[i].double() @ R[i], Y[i].double(), atol=1e-4, rtol=1e-4)


def test_exactly_low_rank_matrix_is_recovered():
    A = make_matrix(80, 60, torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64))
    for ortho in ("householder", "cholqr2"):
        U, S, Vh = rsvd_ops.rsvd(A.float(), 3, oversample=8, niter=2, ortho=ortho)
        assert torch.linalg.matrix_norm(A - (U.double() * S.double()) @ Vh.double()) < 1e-4


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("shape", [(10,), (2, 3, 4, 5)])
def test_bad_ndim_names_A(shape):
    with pytest.raises(ValueError, match=r"A must be 2-D \[m, n\] or 3-D"):
        rsvd(torch.randn(shape), 1)


def test_rank_out_of_range():
    with pytest.raises(ValueError, match=r"rank must be <= min\(m, n\) = 20"):
        rsvd(torch.randn(30, 20), 21)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        rsvd(torch.randn(30, 20), 0)
    with pytest.raises(TypeError, match="rank must be an int"):
        rsvd(torch.randn(30, 20), 2.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rejected(bad):
    A = torch.randn(3, 20, 10)
    A[1, 4, 2] = bad
    with pytest.raises(ValueError, match="A must be finite"):
        rsvd(A, 2)


def test_other_bad_arguments():
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        rsvd([[1.0, 2.0]], 1)
    with pytest.raises(TypeError, match="A must be floating point"):
        rsvd(torch.ones(4, 4, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="A must not be empty"):
        rsvd(torch.ones(0, 4, 4), 1)
    with pytest.raises(ValueError, match="oversample must be >= 0"):
        rsvd(torch.randn(8, 8), 1, oversample=-1)
    with pytest.raises(ValueError, match="niter must be >= 0"):
        rsvd(torch.randn(8, 8), 1, niter=-1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        rsvd(torch.randn(8, 8), 1, generator=0)
