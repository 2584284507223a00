"""Benchmark of the low-rank linear op ``y = ((x @ V^T) * d) @ U^T + b`` against dense ``nn.Linear``.

CPU lane (MiniLM shapes, rank at 50% of the layer's parameters, M = 128 tokens, fp32,
``LowRankLinear`` with backend "torch" vs ``nn.Linear``; forward under ``torch.no_grad``
and forward+backward):

    pytest benchmarks/bench_lowrank_linear.py --benchmark-only       # pytest-benchmark
    python benchmarks/bench_lowrank_linear.py --lane cpu             # -> results/lowrank_linear_cpu.json

GPU lane (Llama-2-7B shapes, ranks 64/256/1024/50% params, M = 1..8192, bf16; lrcomp with
backend "triton" vs the reference backend "torch" (PyTorch eager) vs ``torch.compile`` of
the eager two-GEMM function vs dense ``nn.Linear``, plus the roofline):

    python benchmarks/bench_lowrank_linear.py --lane gpu             # -> results/lowrank_linear_<gpu>.json

Roofline per case: ``max(bytes / peak bandwidth, FLOPs / peak FLOP/s)``; for decode
(M <= 16) the bytes term dominates, for prefill the FLOPs term. Bytes count each tensor
read or written once by an ideal fused kernel (the ``t = x V^T`` intermediate stays on
chip in the forward; the backward reads it back once).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402  (benchmarks/utils.py, found through the line above when run as a script)

import lrcomp  # noqa: E402
from lrcomp import LowRankLinear  # noqa: E402
from lrcomp.ops import lowrank_linear  # noqa: E402

try:
    import pytest
except ImportError:  # script mode does not need pytest
    pytest = None

CPU_M = 128
CPU_FRACTION = 0.5
PASSES = ("fwd", "fwd+bwd")

GPU_MS = (1, 4, 16, 128, 2048, 8192)
GPU_FIXED_RANKS = (64, 256, 1024)
GPU_FRACTION = 0.5
DECODE_MAX_M = 16


# ---------------------------------------------------------------------------------------- CPU lane
def flop_ratio(K: int, N: int, r: int) -> float:
    """FLOPs of the two low-rank GEMMs over the dense GEMM: ``r (K + N) / (K N)``."""
    return r * (K + N) / (K * N)


def make_cpu_fns(K: int, N: int, r: int, M: int = CPU_M, seed: int = 0) -> dict[tuple[str, str], Callable]:
    """Timed closures ``{(impl, pass): fn}`` for impl in ("lowrank", "dense"), fp32 on the CPU.

    ``x: [M, K]``; the low-rank layer is the rank-``r`` truncated SVD of the dense layer.
    """
    torch.manual_seed(seed)
    dense = nn.Linear(K, N)
    lowrank = LowRankLinear.from_linear(dense, r)
    x = torch.randn(M, K)
    x_grad = x.clone().requires_grad_(True)
    dy = torch.randn(M, N)

    def forward(layer):
        def fn():
            with torch.no_grad():
                return layer(x)
        return fn

    def forward_backward(layer):
        def fn():
            layer.zero_grad(set_to_none=True)
            x_grad.grad = None
            layer(x_grad).backward(dy)
        return fn

    return {("lowrank", "fwd"): forward(lowrank), ("dense", "fwd"): forward(dense),
            ("lowrank", "fwd+bwd"): forward_backward(lowrank), ("dense", "fwd+bwd"): forward_backward(dense)}


def run_cpu_lane(args) -> list[dict]:
    """Time every MiniLM shape; lowrank and dense alternate in ``args.rounds`` blocks against drift."""
    previous = lrcomp.get_backend()
    lrcomp.set_backend("torch")
    rows = []
    try:
        for K, N in utils.MINILM_SHAPES:
            r = utils.rank_at_param_fraction(K, N, CPU_FRACTION)
            fns = make_cpu_fns(K, N, r, args.m)
            for pass_ in PASSES:
                samples = {"lowrank": [], "dense": []}
                for _ in range(args.rounds):
                    for impl in samples:
                        samples[impl] += utils.cpu_samples(fns[(impl, pass_)], repeats=args.repeats,
                                                           warmup=args.warmup)
                t_low, t_dense = statistics.median(samples["lowrank"]), statistics.median(samples["dense"])
                # The minimum is what an undisturbed run achieves: on a shared machine it is the
                # steadier figure, the median the spec'd one; both are kept.
                m_low, m_dense = min(samples["lowrank"]), min(samples["dense"])
                rows.append({"lane": "cpu", "dtype": "float32", "backend": "torch", "K": K, "N": N, "r": r,
                             "M": args.m, "pass": pass_, "samples": len(samples["dense"]),
                             "t_lowrank_us": t_low * 1e6, "t_dense_us": t_dense * 1e6, "ratio": t_low / t_dense,
                             "t_lowrank_min_us": m_low * 1e6, "t_dense_min_us": m_dense * 1e6,
                             "ratio_min": m_low / m_dense, "flop_ratio": flop_ratio(K, N, r)})
                print(f"  {K}x{N} r={r} {pass_:8s} lowrank {t_low * 1e6:9.1f} us  dense {t_dense * 1e6:9.1f} us"
                      f"  ratio {t_low / t_dense:.3f} (min {m_low / m_dense:.3f})", flush=True)
    finally:
        lrcomp.set_backend(previous)
    return rows


# ------------------------------------------------------------------------------ pytest-benchmark
if pytest is not None:

    @pytest.mark.parametrize("impl", ["lowrank", "dense"])
    @pytest.mark.parametrize("pass_", PASSES)
    @pytest.mark.parametrize("shape", utils.MINILM_SHAPES, ids=[f"{K}x{N}" for K, N in utils.MINILM_SHAPES])
    def test_cpu_lowrank_linear(benchmark, shape, pass_, impl):
        """pytest-benchmark CPU lane: compare rows of one group (same shape and pass)."""
        K, N = shape
        r = utils.rank_at_param_fraction(K, N, CPU_FRACTION)
        previous = lrcomp.get_backend()
        lrcomp.set_backend("torch")
        try:
            fn = make_cpu_fns(K, N, r)[(impl, pass_)]
            benchmark.group = f"{K}x{N} r={r} M={CPU_M} {pass_}"
            benchmark.extra_info.update({"K": K, "N": N, "r": r, "M": CPU_M, "flop_ratio": flop_ratio(K, N, r)})
            benchmark.pedantic(fn, rounds=100, warmup_rounds=10, iterations=1)
        finally:
            lrcomp.set_backend(previous)


# ---------------------------------------------------------------------------------------- GPU lane
def two_gemm(x: torch.Tensor, V: torch.Tensor, d: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """The eager PyTorch low-rank forward ``((x V^T) * d) U^T``: x [M, K], V [r, K], d [r], U [N, r]."""
    return ((x @ V.t()) * d) @ U.t()


def roofline_terms(M: int, K: int, N: int, r: int, pass_: str, elem: int = 2) -> tuple[float, float]:
    """(bytes, FLOPs) an ideal kernel moves / computes for one call.

    Forward: reads x [M,K], V [r,K], d [r], U [N,r]; writes y [M,N]; 2 M r (K + N) FLOPs.
    Backward adds: reads dy [M,N], x, t [M,r] (stored by the forward, written once), V, d, U;
    writes dx [M,K], dV, dd, dU; FLOPs twice the forward's (dx and dV/dU GEMMs).
    """
    fwd_bytes = M * K + r * K + r + N * r + M * N
    fwd_flops = 2 * M * r * (K + N)
    if pass_ == "fwd":
        return float(fwd_bytes * elem), float(fwd_flops)
    bwd_bytes = (M * N + M * K + 2 * M * r + r * K + r + N * r) + (M * K + r * K + r + N * r)
    return float((fwd_bytes + bwd_bytes) * elem), float(3 * fwd_flops)


def gpu_ranks(K: int, N: int, fixed=GPU_FIXED_RANKS, frac: float = GPU_FRACTION) -> list[tuple[str, int]]:
    """(label, rank) pairs: the fixed ranks and the rank at ``frac`` of the parameters, deduplicated."""
    half = utils.rank_at_param_fraction(K, N, frac)
    out: dict[int, str] = {}
    for r in fixed:
        if r <= min(K, N):
            out[r] = str(r)
    pct = f"{frac:.0%} params"
    out[half] = f"{out[half]} = {pct}" if half in out else pct
    return [(label, r) for r, label in sorted(out.items())]


def _gpu_case(K, N, r, M, pass_, impls, compile_mode, dtype=torch.bfloat16, device="cuda") -> dict[str, tuple]:
    """{impl: (fn, grad_to_none, backend)} for one case; tensors on ``device`` (cuda:0 in the GPU lane)."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=dtype, generator=gen)
    V = (torch.randn(r, K, device=dev, dtype=dtype, generator=gen) / math.sqrt(K))
    d = torch.rand(r, device=dev, dtype=dtype, generator=gen) + 0.5
    U = torch.randn(N, r, device=dev, dtype=dtype, generator=gen) / math.sqrt(r)
    dense = nn.Linear(K, N, bias=False, device=dev, dtype=dtype)
    dy = torch.randn(M, N, device=dev, dtype=dtype, generator=gen)
    leaves = [t.requires_grad_(pass_ == "fwd+bwd") for t in (x, V, d, U)]
    compiled = None
    if "compile" in impls:
        torch._dynamo.reset()  # one fresh graph per case: no recompile limits across 100+ shapes
        compiled = torch.compile(two_gemm, dynamic=False, mode=compile_mode)

    def wrap(call, params):
        if pass_ == "fwd":
            def fn():
                with torch.no_grad():
                    return call()
            return fn, None

        def fn():
            call().backward(dy)
        return fn, params

    cases = {}
    for impl in impls:
        if impl in ("triton", "eager"):
            fn, g = wrap(lambda: lowrank_linear(x, V, d, U), leaves)
            cases[impl] = (fn, g, "triton" if impl == "triton" else "torch")
        elif impl == "compile":
            fn, g = wrap(lambda: compiled(x, V, d, U), leaves)
            cases[impl] = (fn, g, None)
        elif impl == "dense":
            fn, g = wrap(lambda: dense(x), [x, dense.weight])
            cases[impl] = (fn, g, None)
    return cases


def _triton_status() -> str | None:
    """None if lrcomp's Triton launchers import, else the reason they don't."""
    try:
        import triton  # noqa: F401
        from lrcomp.kernels import lowrank_linear as _launchers  # noqa: F401
    except Exception as err:  # any import failure means: no triton column
        return f"{type(err).__name__}: {err}"
    return None


def run_gpu_lane(args, on_row: Callable[[list[dict]], None] | None = None) -> list[dict] | None:
    """Time every (shape, rank, M, pass) case on cuda:0; None (with a message) without CUDA.

    ``on_row(rows)`` is called after each case (the script writes the results file there, so
    an interrupted run keeps what it measured).
    """
    if not torch.cuda.is_available():
        print("GPU lane skipped: torch.cuda.is_available() is False (no CUDA device or a CPU-only torch "
              f"{torch.__version__}). Run it on a machine with an NVIDIA GPU.")
        return None
    name = utils.gpu_name()
    bandwidth, peak_flops = utils.gpu_peaks(name)
    bandwidth = args.peak_bw or bandwidth
    peak_flops = args.peak_flops or peak_flops
    if bandwidth is None or peak_flops is None:
        print(f"note: no peak figures for {name!r}; pass --peak-bw and --peak-flops for the roofline column")
    impls = list(args.impls)
    reason = _triton_status() if "triton" in impls else None
    if reason is not None:
        print(f"note: the Triton column is skipped, lrcomp.kernels.lowrank_linear does not import ({reason})")
        impls.remove("triton")
    shapes = [s for s in utils.LLAMA2_7B_SHAPES if args.shapes is None or f"{s[0]}x{s[1]}" in args.shapes]
    cases = [(K, N, label, r, M, p) for K, N in shapes
             for label, r in gpu_ranks(K, N, args.ranks or GPU_FIXED_RANKS)
             for M in (args.ms or GPU_MS) for p in args.passes]
    from tqdm import tqdm

    previous = lrcomp.get_backend()
    rows = []
    try:
        for K, N, label, r, M, pass_ in tqdm(cases, desc="gpu cases", unit="case"):
            row = {"lane": "gpu", "dtype": "bfloat16", "K": K, "N": N, "r": r, "rank": label, "M": M,
                   "pass": pass_, "flop_ratio": flop_ratio(K, N, r)}
            for impl, (fn, grads, backend) in _gpu_case(K, N, r, M, pass_, impls, args.compile_mode).items():
                if backend is not None:
                    lrcomp.set_backend(backend)
                try:
                    fn()  # first call outside the timer: compiles / autotunes
                    row[f"t_{impl}_us"] = utils.time_gpu(fn, grad_to_none=grads) * 1e6
                except Exception as err:  # one failing implementation must not lose the others' numbers
                    row[f"t_{impl}_us"] = None
                    row[f"error_{impl}"] = f"{type(err).__name__}: {str(err)[:200]}"
                    tqdm.write(f"{K}x{N} r={r} M={M} {pass_} {impl}: {row[f'error_{impl}']}")
            nbytes, flops = roofline_terms(M, K, N, r, pass_)
            row.update({"bytes": nbytes, "flops": flops, "regime": "decode" if M <= DECODE_MAX_M else "prefill"})
            if bandwidth and peak_flops:
                t_mem, t_comp = nbytes / bandwidth, flops / peak_flops
                row.update({"t_roofline_us": max(t_mem, t_comp) * 1e6,
                            "bound": "memory" if t_mem >= t_comp else "compute"})
            main = row.get("t_triton_us")
            for other in ("eager", "compile", "dense", "roofline"):
                ref = row.get(f"t_{other}_us")
                row[f"triton/{other}"] = main / ref if main and ref else None
            row.update({"peak_bw_Bps": bandwidth, "peak_bf16_flops": peak_flops, "compile_mode": args.compile_mode})
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            torch.cuda.empty_cache()
    finally:
        lrcomp.set_backend(previous)
    return rows


def profile_gpu_case(args) -> int:
    """Print torch.profiler tables (CPU and CUDA time per op) for each implementation on the first case."""
    if not torch.cuda.is_available():
        print("--profile needs a CUDA device")
        return 0
    from torch.profiler import ProfilerActivity, profile

    K, N = next(s for s in utils.LLAMA2_7B_SHAPES if args.shapes is None or f"{s[0]}x{s[1]}" in args.shapes)
    label, r = gpu_ranks(K, N, args.ranks or GPU_FIXED_RANKS)[0]
    M, pass_ = (args.ms or GPU_MS)[0], args.passes[0]
    previous = lrcomp.get_backend()
    try:
        for impl, (fn, _, backend) in _gpu_case(K, N, r, M, pass_, args.impls, args.compile_mode).items():
            if backend is not None:
                lrcomp.set_backend(backend)
            for _ in range(3):
                fn()  # compile / autotune outside the profile
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
            print(f"\n== {impl}: {K}x{N} rank {label} M={M} {pass_} (20 calls)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    finally:
        lrcomp.set_backend(previous)
    return 0


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lane", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: untouched)")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/lowrank_linear_"
                                                     "<cpu|gpu-slug>.json)")
    cpu = parser.add_argument_group("cpu lane")
    cpu.add_argument("--m", type=int, default=CPU_M, help="tokens per call")
    cpu.add_argument("--rounds", type=int, default=7, help="alternating lowrank/dense timing blocks")
    cpu.add_argument("--repeats", type=int, default=40, help="timed calls per block")
    cpu.add_argument("--warmup", type=int, default=5, help="untimed calls per block")
    gpu = parser.add_argument_group("gpu lane")
    gpu.add_argument("--shapes", nargs="+", default=None, help="subset of KxN, e.g. 4096x4096")
    gpu.add_argument("--ranks", nargs="+", type=int, default=None, help=f"fixed ranks (default {GPU_FIXED_RANKS})"
                     " ; the 50%% parameter rank is always added")
    gpu.add_argument("--ms", nargs="+", type=int, default=None, help=f"token counts (default {GPU_MS})")
    gpu.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    gpu.add_argument("--impls", nargs="+", choices=("triton", "eager", "compile", "dense"),
                     default=["triton", "eager", "compile", "dense"])
    gpu.add_argument("--compile-mode", default="default", help="torch.compile mode for the eager two-GEMM")
    gpu.add_argument("--peak-bw", type=float, default=None, help="override peak memory bandwidth, bytes/s")
    gpu.add_argument("--peak-flops", type=float, default=None, help="override peak bf16 FLOP/s")
    gpu.add_argument("--profile", action="store_true",
                     help="no timing table: torch.profiler of 20 calls of each implementation on the first case "
                          "(host vs device time: where a slow call spends it)")
    args = parser.parse_args(argv)
    for name in ("m", "rounds", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.lane == "cpu":
        print(f"CPU lane: {utils._cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        rows = run_cpu_lane(args)
        out = args.out or utils.RESULTS_DIR / "lowrank_linear_cpu.json"
        columns = ["K", "N", "r", "M", "pass", "t_lowrank_us", "t_dense_us", "ratio", "ratio_min", "flop_ratio"]
    elif args.profile:
        return profile_gpu_case(args)
    else:
        out = args.out or utils.RESULTS_DIR / f"lowrank_linear_{utils.slug(utils.gpu_name() or 'gpu')}.json"
        rows = run_gpu_lane(args, on_row=lambda rows: utils.write_results(out, rows, kind="lowrank_linear_gpu"))
        if rows is None:
            return 0
        columns = ["K", "N", "rank", "M", "pass", "t_triton_us", "t_eager_us", "t_compile_us", "t_dense_us",
                   "t_roofline_us", "bound", "triton/eager", "triton/compile", "triton/dense", "triton/roofline"]
    path = utils.write_results(out, rows, kind=f"lowrank_linear_{args.lane}")
    print()
    print(utils.format_table(rows, columns))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
