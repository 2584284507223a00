// Schemas of lrcomp's C++ ops: torch.ops.lrcomp.rsvd and torch.ops.lrcomp.covariance_update_.
//
// The implementations are registered per dispatch key next to their code (rsvd.cpp: CPU and
// CUDA, both ATen; covariance.cu: CUDA only; other devices use the Python reference in
// lrcomp.ops). Fake (meta) implementations are registered from Python when the extension loads
// (lrcomp/_ext.py), so the ops trace under torch.compile.
//
// TORCH_LIBRARY(lrcomp, m) owns the namespace; the Python custom ops
// (lrcomp::lowrank_linear_fwd/bwd, torch.library.custom_op) are FRAGMENTs of the same
// namespace, and a fragment coexists with the one TORCH_LIBRARY in either load order.

#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(lrcomp, m) {
  // A: [m, n] or [B, m, n], any float dtype; omega: [n, k] Gaussian sketch shared by the batch,
  // rank <= k <= min(m, n); ortho: "cholqr2" (CholeskyQR2, Householder fallback) or "householder".
  // Returns U [..., m, rank], S [..., rank], Vh [..., rank, n] in fp32 (fp64 for fp64 A).
  m.def("rsvd(Tensor A, Tensor omega, int rank, int niter, str ortho=\"cholqr2\") -> (Tensor, Tensor, Tensor)");
  // master: [d, d] fp64, upper triangle only (strict lower part stays zero); x: [M, d]
  // bf16/fp16/fp32. Adds the upper triangle of x^T x, accumulated in fp32 over at most
  // 8192 rows at a time, into master in fp64.
  m.def("covariance_update_(Tensor(a!) master, Tensor x) -> ()");
}

#ifdef TORCH_EXTENSION_NAME
// Importable as a Python module (lrcomp._C) when built by setup.py; the ops register on load.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "lrcomp CUDA extension: torch.ops.lrcomp.rsvd, torch.ops.lrcomp.covariance_update_";
}
#endif
