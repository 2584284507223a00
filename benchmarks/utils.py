"""Shared helpers of the benchmark scripts: environment record, timers, results files, shapes.

Nothing here touches CUDA or imports triton at import time: the GPU helpers import on use.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from lrcomp import atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# (K, N) = (in_features, out_features) of the linear layers of each model.
MINILM_SHAPES = [(384, 384), (384, 1536), (1536, 384)]
LLAMA2_7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]

# Peak dense bf16 tensor-core FLOP/s (no sparsity) and HBM bandwidth in B/s, from the vendor
# data sheets; matched against torch.cuda.get_device_name() in order (first hit wins).
GPU_PEAKS = [
    # (substrings that must all appear in the name, peak B/s, peak bf16 FLOP/s)
    (("H200",), 4.8e12, 989e12),
    (("H100", "PCIE"), 2.0e12, 756e12),
    (("H100",), 3.35e12, 989e12),  # SXM5 (name "NVIDIA H100 80GB HBM3")
    (("A100",), 2.039e12, 312e12),
]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def gpu_name() -> str | None:
    """Name of CUDA device 0, or None without CUDA (only checks availability; no context is made)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def environment() -> dict:
    """Where and with what a benchmark ran: CPU/GPU names, versions, git commit and dirtiness."""
    status = _git("status", "--porcelain")
    gpu = gpu_name()
    return {
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": gpu,
        "device": gpu if gpu is not None else _cpu_name(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": _git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": None if status is None else bool(status),
        # Other work on the machine skews CPU timings; the 1-minute load average says how much there was.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (for file names)."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in name)
    return "-".join(part for part in out.split("-") if part) or "unknown"


def gpu_peaks(name: str | None) -> tuple[float | None, float | None]:
    """(peak bytes/s, peak bf16 FLOP/s) for a GPU name from :data:`GPU_PEAKS`, (None, None) if unknown."""
    if name is None:
        return None, None
    upper = name.upper()
    for keys, bandwidth, flops in GPU_PEAKS:
        if all(k in upper for k in keys):
            return bandwidth, flops
    return None, None


def cpu_samples(fn: Callable[[], object], *, repeats: int = 50, warmup: int = 5,
                min_time: float = 0.0) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` in seconds (``time.perf_counter``), after ``warmup`` calls.

    The thread count is left as the process has it. If ``min_time`` > 0, calls continue past
    ``repeats`` until that many seconds were spent.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def time_cpu(fn: Callable[[], object], *, repeats: int = 50, warmup: int = 5, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` (see :func:`cpu_samples`)."""
    return statistics.median(cpu_samples(fn, repeats=repeats, warmup=warmup, min_time=min_time))


def time_gpu(fn: Callable[[], object], *, grad_to_none: Iterable[torch.Tensor] | None = None,
             warmup: int = 25, rep: int = 100) -> float:
    """Median time of ``fn()`` on the GPU in seconds with ``triton.testing.do_bench`` (L2 flushed)."""
    from triton.testing import do_bench  # imported on use: triton is optional and may not see a GPU

    ms = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none) if grad_to_none else None,
                  return_mode="median")
    return ms * 1e-3


def rank_at_param_fraction(K: int, N: int, frac: float) -> int:
    """Rank whose factors hold ``frac`` of a ``K x N`` layer's weights: ``max(1, floor(frac*K*N/(K+N)))``."""
    if not 0 < frac:
        raise ValueError(f"frac must be positive, got {frac}")
    return max(1, math.floor(frac * K * N / (K + N)))


def write_results(path: str | os.PathLike, rows: list[dict], *, kind: str | None = None,
                  env: dict | None = None, meta: dict | None = None) -> Path:
    """Write ``rows`` to ``path`` as JSON atomically (temp file in the same folder + ``os.replace``).

    File layout: ``{"kind", "created", "environment", "meta", "rows"}``; every row also
    carries the environment's fields (a row keeps its own value where both have a key).
    ``kind`` defaults to the file name's stem.
    """
    path = Path(path)
    env = environment() if env is None else env
    payload = {
        "kind": kind or path.stem,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": env,
        "meta": meta or {},
        "rows": [{**env, **row} for row in rows],
    }
    atomic.write_json(path, payload, default=str)
    return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def format_table(rows: list[dict], columns: list[str], floatfmt: str = ".3g") -> str:
    """A plain-text table of ``rows`` restricted to ``columns`` (for the console)."""
    def cell(value):
        if isinstance(value, float):
            return format(value, floatfmt)
        return "" if value is None else str(value)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)
