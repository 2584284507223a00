"""Benchmark of covariance accumulation ``C += X^T X`` (GPU lane).

dim 4096 and 11008, 8 x 2048 = 16384 bf16 tokens per update: lrcomp's
``CovarianceAccumulator.update`` (CUDA extension: one triangle, tensor cores, fp32 per chunk,
fp64 master) vs an fp32 ``addmm`` (upcast included, TF32 off) vs an fp64 ``addmm``.
Error: relative Frobenius error of one update against fp64 arithmetic on the same bf16
inputs. Target (issue): >= 1.5x the fp32 ``addmm`` at an error no larger than its.

    python benchmarks/bench_covariance.py      # -> benchmarks/results/covariance_<gpu>.json

Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402  (benchmarks/utils.py)

DIMS = (4096, 11008)
TOKENS = 8 * 2048


def run(dims=DIMS, tokens=TOKENS) -> list[dict]:
    import lrcomp
    from lrcomp import _ext
    from lrcomp.calib import CovarianceAccumulator

    if not _ext.load(jit=True):
        print(f"warning: CUDA extension not loaded ({_ext.load_error()}); timing the PyTorch reference on the GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # an honest fp32 baseline
    rows = []
    for d in dims:
        x = torch.randn(tokens, d, device="cuda").add_(0.25).to(torch.bfloat16)
        exact = torch.zeros(d, d, dtype=torch.float64, device="cuda").addmm_(x.double().T, x.double())
        acc = CovarianceAccumulator(d, device="cuda")
        C32 = torch.zeros(d, d, device="cuda")
        C64 = torch.zeros(d, d, dtype=torch.float64, device="cuda")

        def ours(acc=acc, x=x):
            acc.update(x)

        def fp32(C32=C32, x=x):
            xf = x.float()
            C32.addmm_(xf.T, xf)

        def fp64(C64=C64, x=x):
            xd = x.double()
            C64.addmm_(xd.T, xd)

        times = {name: utils.time_gpu(fn, warmup=5, rep=200) for name, fn in
                 (("ours", ours), ("addmm_fp32", fp32), ("addmm_fp64", fp64))}

        def err(C, exact=exact):
            return float(torch.linalg.matrix_norm(C.double() - exact) / torch.linalg.matrix_norm(exact))

        acc.reset()
        acc.update(x)
        xf = x.float()
        errors = {"ours": err(acc.covariance(normalize=False)),
                  "addmm_fp32": err(xf.T @ xf),
                  "addmm_fp64": err(x.double().T @ x.double())}
        row = {"dim": d, "tokens": tokens, "dtype": "bfloat16", "ext": lrcomp.has_cuda_ext(),
               **{f"{k}_s": v for k, v in times.items()}, **{f"{k}_err": v for k, v in errors.items()},
               "speedup_vs_fp32": times["addmm_fp32"] / times["ours"],
               "speedup_vs_fp64": times["addmm_fp64"] / times["ours"],
               "tflops_ours_full_equiv": 2 * tokens * d * d / times["ours"] / 1e12}
        row["target_met"] = row["speedup_vs_fp32"] >= 1.5 and errors["ours"] <= errors["addmm_fp32"]
        rows.append(row)
        print(utils.format_table([row], ["dim", "tokens", "ours_s", "addmm_fp32_s", "addmm_fp64_s", "ours_err",
                                         "addmm_fp32_err", "speedup_vs_fp32", "target_met"]), flush=True)
        del x, exact, acc, C32, C64
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/covariance_<gpu>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_covariance: no CUDA device; this benchmark has only a GPU lane. Nothing to do.")
        return 0
    rows = run(tuple(args.dims), args.tokens)
    out = args.out or utils.RESULTS_DIR / f"covariance_{utils.slug(utils.gpu_name())}.json"
    print("wrote", utils.write_results(out, rows, kind="covariance", meta={"allow_tf32": False}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
