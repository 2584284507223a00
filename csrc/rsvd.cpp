// Randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 with re-orthonormalisation after
// every multiply), batched over a leading dimension, entirely in ATen: no Python loop over the
// batch or the power iterations. The same code serves CPU and CUDA tensors (cuBLAS batched
// GEMMs through at::matmul on the GPU); lrcomp.ops.rsvd.rsvd_reference is its PyTorch twin.
//
//   Y = A Omega;  Q = orth(Y)
//   repeat niter: Z = orth(A^T Q); Q = orth(A Z)
//   A^T Q = P R  (orth with R)  =>  Q^T A = R^T P^T
//   R^T = Ur S Vr^T  (fp64 SVD of a k x k matrix)  =>  A ~ (Q Ur) S (P Vr)^T
//
// Factoring A^T Q first keeps the fp64 SVD at k x k even when n is large (11008), and is exact
// in exact arithmetic: Q^T A = (A^T Q)^T = R^T P^T.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace lrcomp {
namespace {

using at::Tensor;

// Threshold on max|Q1^T Q1 - I| after CholeskyQR's first pass: beyond it the second pass no
// longer repairs orthogonality to working precision, and the batch entry falls back to
// Householder QR.
constexpr double kCholQR2Tolerance = 0.1;

struct QR {
  Tensor Q;  // [B, m, k], fp32
  Tensor R;  // [B, k, k], fp64, upper triangular
};

QR householder(const Tensor& Y) {
  auto [Q, R] = at::linalg_qr(Y, "reduced");
  return {Q, R.to(at::kDouble)};
}

// One CholeskyQR pass in fp64: G = Y^T Y = L L^T, Q = Y L^{-T}, R = L^T. info != 0 marks a
// Gram matrix that is not numerically positive definite.
std::tuple<Tensor, Tensor, Tensor, Tensor> cholqr_pass(const Tensor& Y64) {
  Tensor G = at::matmul(Y64.transpose(-2, -1), Y64);
  auto [L, info] = at::linalg_cholesky_ex(G, /*upper=*/false, /*check_errors=*/false);
  Tensor R = L.transpose(-2, -1);
  Tensor Q = at::linalg_solve_triangular(R, Y64, /*upper=*/true, /*left=*/false);
  return {Q, R, info, G};
}

// CholeskyQR2 (Fukaya et al. 2014): two CholeskyQR passes in fp64. Mostly GEMMs, so it is far
// faster on a GPU than Householder QR of a tall matrix. Entries whose Gram matrix is not
// positive definite, or whose first pass lost orthogonality beyond kCholQR2Tolerance, are
// redone with Householder QR.
QR cholqr2(const Tensor& Y) {
  Tensor Y64 = Y.to(at::kDouble);
  auto [Q1, R1, info1, G1] = cholqr_pass(Y64);
  auto [Q2, R2, info2, G2] = cholqr_pass(Q1);
  const int64_t k = Y.size(-1);
  Tensor eye = at::eye(k, G2.options());
  Tensor deviation = (G2 - eye).abs().amax({-2, -1});
  // NaN-safe: a NaN deviation is not <= tolerance and so counts as a failure.
  Tensor bad = (info1 != 0).logical_or(info2 != 0).logical_or(deviation.le(kCholQR2Tolerance).logical_not());
  Tensor Q = Q2.to(at::kFloat);
  Tensor R = at::matmul(R2, R1);
  if (bad.any().item<bool>()) {
    Tensor idx = bad.nonzero().squeeze(-1);
    QR fallback = householder(Y.index_select(0, idx));
    Q = Q.index_copy(0, idx, fallback.Q);
    R = R.index_copy(0, idx, fallback.R);
  }
  return {Q, R};
}

QR orthonormalize(const Tensor& Y, bool use_cholqr2) {
  return use_cholqr2 ? cholqr2(Y) : householder(Y);
}

std::tuple<Tensor, Tensor, Tensor> rsvd(const Tensor& A, const Tensor& omega, int64_t rank, int64_t niter,
                                        c10::string_view ortho) {
  TORCH_CHECK(A.dim() == 2 || A.dim() == 3, "rsvd: A must be 2-D [m, n] or 3-D [B, m, n], got ", A.dim(),
              "-D with shape ", A.sizes());
  TORCH_CHECK(at::isFloatingType(A.scalar_type()), "rsvd: A must be a floating-point tensor, got ",
              A.scalar_type());
  TORCH_CHECK(omega.dim() == 2, "rsvd: omega must be 2-D [n, k], got shape ", omega.sizes());
  TORCH_CHECK(omega.scalar_type() == at::kFloat, "rsvd: omega must be float32, got ", omega.scalar_type());
  TORCH_CHECK(omega.device() == A.device(), "rsvd: omega must be on A's device (", A.device(), "), got ",
              omega.device());
  const int64_t m = A.size(-2);
  const int64_t n = A.size(-1);
  const int64_t k = omega.size(1);
  TORCH_CHECK(m > 0 && n > 0, "rsvd: A must have non-empty matrix dims, got shape ", A.sizes());
  TORCH_CHECK(omega.size(0) == n, "rsvd: omega must have n = ", n, " rows (A's last dim), got ", omega.size(0));
  TORCH_CHECK(rank >= 1 && rank <= k, "rsvd: rank must be in [1, k = ", k, "] (omega's width), got ", rank);
  TORCH_CHECK(k <= std::min(m, n), "rsvd: omega's width k must be <= min(m, n) = ", std::min(m, n), ", got ", k);
  TORCH_CHECK(niter >= 0, "rsvd: niter must be >= 0, got ", niter);
  TORCH_CHECK(ortho == "cholqr2" || ortho == "householder", "rsvd: ortho must be \"cholqr2\" or \"householder\", got \"",
              std::string(ortho), "\"");
  const bool use_cholqr2 = ortho == "cholqr2";
  const bool batched = A.dim() == 3;

  // fp32 GEMMs whatever the input dtype: bf16/fp16 weights are upcast once.
  Tensor Af = (batched ? A : A.unsqueeze(0)).to(at::kFloat).contiguous();
  Tensor At = Af.transpose(-2, -1);

  Tensor Q = orthonormalize(at::matmul(Af, omega), use_cholqr2).Q;  // [B, m, k]
  for (int64_t i = 0; i < niter; ++i) {
    Tensor Z = orthonormalize(at::matmul(At, Q), use_cholqr2).Q;  // [B, n, k]
    Q = orthonormalize(at::matmul(Af, Z), use_cholqr2).Q;         // [B, m, k]
  }
  QR pr = orthonormalize(at::matmul(At, Q), use_cholqr2);  // A^T Q = P R
  auto [Ur, S, Vrh] = at::linalg_svd(pr.R.transpose(-2, -1), /*full_matrices=*/false);  // R^T, fp64
  Tensor U = at::matmul(Q.to(at::kDouble), Ur.narrow(-1, 0, rank));                      // [B, m, rank]
  Tensor Vh = at::matmul(pr.Q.to(at::kDouble), Vrh.narrow(-2, 0, rank).transpose(-2, -1)).transpose(-2, -1);
  S = S.narrow(-1, 0, rank);

  const auto out_dtype = A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  U = U.to(out_dtype).contiguous();
  S = S.to(out_dtype).contiguous();
  Vh = Vh.to(out_dtype).contiguous();
  if (!batched) {
    U = U.squeeze(0);
    S = S.squeeze(0);
    Vh = Vh.squeeze(0);
  }
  return {U, S, Vh};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrcomp, CPU, m) { m.impl("rsvd", &rsvd); }
TORCH_LIBRARY_IMPL(lrcomp, CUDA, m) { m.impl("rsvd", &rsvd); }

}  // namespace lrcomp
