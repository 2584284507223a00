"""The CUDA extension's ops against the PyTorch references (GPU only; skipped cleanly without CUDA).

The extension is loaded (JIT-built from csrc/ when no prebuilt lrcomp._C exists) inside the
tests, never at collection time.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from lrcomp import _ext

    if not _ext.load(jit=True, verbose=False):
        pytest.fail(f"CUDA extension did not load: {_ext.load_error()}")
    return torch.ops.lrcomp


def _decaying(B, m, n, decay=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(B, m, p, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(B, n, p, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(p, dtype=torch.float64)
    return (U * s) @ V.mT


@pytest.mark.parametrize("ortho", ["cholqr2", "householder"])
@pytest.mark.parametrize(("B", "m", "n", "rank"), [(1, 300, 200, 20), (3, 123, 431, 7), (2, 256, 256, 64)])
def test_rsvd_extension_matches_reference(ext, ortho, B, m, n, rank):
    from lrcomp.ops import rsvd as rsvd_ops

    A = _decaying(B, m, n).float()
    omega = rsvd_ops.draw_sketch(n, min(rank + 8, m, n), torch.Generator().manual_seed(0), "cpu")
    U, S, Vh = ext.rsvd(A.cuda(), omega.cuda(), rank, 2, ortho)
    Ur, Sr, Vhr = rsvd_ops.rsvd_reference(A, omega, rank, 2, "householder")
    torch.testing.assert_close(S.cpu(), Sr, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(((U * S.unsqueeze(-2)) @ Vh).cpu(), (Ur * Sr.unsqueeze(-2)) @ Vhr,
                               rtol=1e-3, atol=1e-5)
    # Within 1.02x of Eckart-Young, as on the CPU.
    err = torch.linalg.matrix_norm(A.double() - ((U * S.unsqueeze(-2)) @ Vh).double().cpu())
    opt = torch.linalg.svdvals(A.double())[..., rank:].square().sum(-1).sqrt()
    assert bool((err / opt <= 1.02).all())


def test_public_rsvd_dispatches_to_extension_and_is_deterministic(ext):
    from lrcomp.linalg import rsvd

    A = _decaying(4, 200, 150).float().cuda()
    a = rsvd(A, 10, generator=torch.Generator().manual_seed(1))
    b = rsvd(A, 10, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for i in range(4):  # batched equals per-matrix
        U, S, Vh = rsvd(A[i], 10, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(S, a[1][i], rtol=1e-5, atol=1e-6)


def test_rsvd_opcheck_and_checks(ext):
    from lrcomp.ops import rsvd as rsvd_ops

    A = torch.randn(2, 64, 48, device="cuda")
    omega = rsvd_ops.draw_sketch(48, 12, None, "cuda")
    torch.library.opcheck(ext.rsvd.default, (A, omega, 4, 1, "cholqr2"))
    with pytest.raises(RuntimeError, match="rsvd: A must be 2-D"):
        ext.rsvd(A[0, 0], omega, 4, 1)
    with pytest.raises(RuntimeError, match="rsvd: rank must be in"):
        ext.rsvd(A, omega, 13, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("M", "d"), [(20000, 96), (1, 7), (300, 131), (513, 1100)])
def test_covariance_kernel_matches_fp64(ext, dtype, M, d):
    from lrcomp.calib import CovarianceAccumulator

    x = (torch.randn(M, d) + 0.5).to(dtype)
    acc = CovarianceAccumulator(d, device="cuda")
    acc.update(x.cuda())
    C = acc.covariance(normalize=False).cpu()
    ref = x.double().T @ x.double()
    assert float(torch.linalg.matrix_norm(C - ref) / torch.linalg.matrix_norm(ref)) <= 1e-6
    assert torch.count_nonzero(acc.state_dict()["sum"].tril(-1)) == 0


def test_covariance_kernel_misaligned_and_strided_inputs(ext):
    from lrcomp.calib import CovarianceAccumulator

    base = torch.randn(1000, 129).to(torch.bfloat16).cuda()
    x = base[:, 1:]  # not contiguous, not 16-byte aligned
    acc = CovarianceAccumulator(128, device="cuda")
    acc.update(x)
    ref = x.double().T @ x.double()
    C = acc.covariance(normalize=False)
    assert float(torch.linalg.matrix_norm(C - ref) / torch.linalg.matrix_norm(ref)) <= 1e-6


def test_covariance_op_checks(ext):
    master = torch.zeros(8, 8, dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="x must have width d = 8"):
        ext.covariance_update_(master, torch.randn(4, 7, device="cuda"))
    with pytest.raises(RuntimeError, match="master must be float64"):
        ext.covariance_update_(master.float(), torch.randn(4, 8, device="cuda"))
    torch.library.opcheck(ext.covariance_update_.default, (master, torch.randn(4, 8, device="cuda")))
