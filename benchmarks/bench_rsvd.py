"""Benchmark of lrcomp.linalg.rsvd (CUDA extension) vs torch.svd_lowrank vs torch.linalg.svd (GPU lane).

Cases: 4096x4096, 4096x11008 and a batch of 32 4096x4096 (all layers of one shape in one
call) at r in {64, 256, 1024}; fp32 matrices with a power-law spectrum ``s_i ~ (i+1)^-0.5``
(a stand-in for trained weights). Every method gets ``oversample=8, niter=2`` (svd_lowrank:
``q=r+8, niter=2``). Reported per case: median time (``triton.testing.do_bench``; a single
timed call for baselines slower than 2 s), relative Frobenius error ``||A - U S Vh|| / ||A||``
and that error over the Eckart-Young optimum (from torch.linalg.svd's singular values).

Targets (issue): >= 3x torch.svd_lowrank at equal or better error; >= 20x torch.linalg.svd at
r <= 256.

    python benchmarks/bench_rsvd.py            # -> benchmarks/results/rsvd_<gpu>.json

Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402  (benchmarks/utils.py)

CASES = [(1, 4096, 4096), (1, 4096, 11008), (32, 4096, 4096)]
RANKS = (64, 256, 1024)
OVERSAMPLE, NITER = 8, 2


def make_matrix(B: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    p = min(m, n)
    s = torch.arange(1, p + 1, device="cuda", dtype=torch.float32).pow(-0.5)
    left = torch.randn(B, m, p, device="cuda", generator=g) / m**0.5
    right = torch.randn(B, p, n, device="cuda", generator=g) / n**0.5
    return (left * s) @ right


def timed(fn) -> float:
    """Seconds per call: do_bench median, or one event-timed call when a call takes > 2 s."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if first > 2.0:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e-3
    return utils.time_gpu(fn, warmup=3, rep=max(50, int(first * 5e3)))


def rel_error(A: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> float:
    err = torch.linalg.matrix_norm(A - (U * S.unsqueeze(-2)) @ Vh)
    return float((err / torch.linalg.matrix_norm(A)).max())


def run(ranks=RANKS, cases=CASES, on_row=None) -> list[dict]:
    """One row per (case, rank); ``on_row(rows)`` after each (the script saves the file there)."""
    import lrcomp
    from lrcomp import _ext
    from lrcomp.linalg import rsvd

    if not _ext.load(jit=True):
        print(f"warning: CUDA extension not loaded ({_ext.load_error()}); timing the PyTorch reference on the GPU")
    rows = []
    for B, m, n in cases:
        A = make_matrix(B, m, n)
        A2 = A if B > 1 else A[0]
        svd_time = timed(lambda A2=A2: torch.linalg.svd(A2, full_matrices=False))
        U_full, S_full, Vh_full = torch.linalg.svd(A2, full_matrices=False)
        norm = torch.linalg.matrix_norm(A2)
        for r in ranks:
            optimum = float((S_full[..., r:].square().sum(-1).sqrt() / norm).max())
            g = torch.Generator().manual_seed(0)
            ours_time = timed(lambda A2=A2, r=r, g=g: rsvd(A2, r, oversample=OVERSAMPLE, niter=NITER, generator=g))
            ours = rsvd(A2, r, oversample=OVERSAMPLE, niter=NITER, generator=torch.Generator().manual_seed(0))
            lowrank_time = timed(lambda A2=A2, r=r: torch.svd_lowrank(A2, q=r + OVERSAMPLE, niter=NITER))
            U, S, V = torch.svd_lowrank(A2, q=r + OVERSAMPLE, niter=NITER)
            lowrank = (U[..., :r], S[..., :r], V[..., :r].mT)
            full = (U_full[..., :r], S_full[..., :r], Vh_full[..., :r, :])
            row = {
                "batch": B, "m": m, "n": n, "rank": r, "dtype": "float32", "ext": lrcomp.has_cuda_ext(),
                "ours_s": ours_time, "svd_lowrank_s": lowrank_time, "linalg_svd_s": svd_time,
                "ours_err": rel_error(A2, *ours), "svd_lowrank_err": rel_error(A2, *lowrank),
                "linalg_svd_err": rel_error(A2, *full), "optimal_err": optimum,
            }
            row["ours_err_over_opt"] = row["ours_err"] / optimum
            row["speedup_vs_svd_lowrank"] = lowrank_time / ours_time
            row["speedup_vs_linalg_svd"] = svd_time / ours_time
            row["target_svd_lowrank_met"] = row["speedup_vs_svd_lowrank"] >= 3 and \
                row["ours_err"] <= row["svd_lowrank_err"] * (1 + 1e-3)
            row["target_linalg_svd_met"] = row["speedup_vs_linalg_svd"] >= 20 if r <= 256 else None
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            print(utils.format_table([row], ["batch", "m", "n", "rank", "ours_s", "svd_lowrank_s", "linalg_svd_s",
                                             "ours_err", "svd_lowrank_err", "optimal_err",
                                             "speedup_vs_svd_lowrank", "speedup_vs_linalg_svd"]), flush=True)
        del A, A2, U_full, S_full, Vh_full
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/rsvd_<gpu>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_rsvd: no CUDA device; this benchmark has only a GPU lane. Nothing to do.")
        return 0
    out = args.out or utils.RESULTS_DIR / f"rsvd_{utils.slug(utils.gpu_name())}.json"
    meta = {"oversample": OVERSAMPLE, "niter": NITER, "spectrum": "s_i ~ (i+1)^-0.5",
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    run(tuple(args.ranks), on_row=lambda rows: utils.write_results(out, rows, kind="rsvd", meta=meta))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
