"""Measured latency of low-rank and dense linear layers, for the latency-budgeted rank allocator.

:func:`measure_latency_table` times, for every layer shape ``(K, N)`` (``K = in_features``,
``N = out_features``), the forward pass of :class:`~lrcomp.layers.LowRankLinear` at a grid of
ranks and of the dense ``nn.Linear``, on ``tokens`` rows of input (``x: [M, K]``, ``M = tokens``)
on this machine's kernels. :class:`LatencyTable` holds the medians and answers

    lowrank_us(K, N, r)   piecewise-linear interpolation in r of the (cumulative-max) timings,
                          hence non-decreasing in r
    dense_us(K, N)        the dense layer's time

so :func:`lrcomp.compression.allocate.allocate_ranks` (``cost="latency"``) can charge a direction
its marginal time ``lowrank_us(K, N, r + 1) - lowrank_us(K, N, r) >= 0`` and find the rank at
which the low-rank layer stops being faster than the dense one (its break-even rank).

The low-rank layer is timed with the pure-PyTorch reference op (backend "torch": two GEMMs
``((x V^T) * d) U^T + b``) under ``torch.no_grad()``; each time is the median over ``repeats``
timed runs after warm-up, a run being a loop of enough forward calls to last about a
millisecond, so timer resolution and Python overhead do not dominate the small shapes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from lrcomp import atomic
from lrcomp.backend import get_backend, set_backend
from lrcomp.layers.lowrank_linear import LowRankLinear

FORMAT = "lrcomp.latency_table"
FORMAT_VERSION = 1
DEFAULT_GRID_POINTS = 8

# One timed run lasts at least this long (seconds): at ~10-50 us per call on the MiniLM shapes,
# a single call is within a few timer ticks / Python-overhead jitters of its own length.
_MIN_RUN_SECONDS = 1e-3
_MAX_INNER = 1000


def _check_shape(shape: object, argname: str) -> tuple[int, int]:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape)):
        raise ValueError(f"{argname} must be a pair of positive ints (in_features, out_features), got {shape!r}")
    return int(shape[0]), int(shape[1])


def break_even_rank(K: int, N: int) -> int:
    """Smallest rank with ``r (K + N) >= K N`` (parameters and FLOPs of low-rank >= dense): ``ceil(KN/(K+N))``."""
    return -(-K * N // (K + N))


def default_ranks(K: int, N: int, points: int = DEFAULT_GRID_POINTS) -> list[int]:
    """``points`` ranks evenly spread over ``[1, min(K, N)]`` plus the break-even rank, sorted, unique."""
    full = min(K, N)
    grid = {max(1, min(full, round(1 + i * (full - 1) / max(points - 1, 1)))) for i in range(points)}
    grid.add(min(full, break_even_rank(K, N)))
    return sorted(grid)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "cpu"
    return f"{name} ({torch.get_num_threads()} threads)"


class LatencyTable:
    """Forward-pass times (microseconds) of low-rank and dense linear layers per shape ``(K, N)``.

    Args:
        entries: ``{(K, N): {"ranks": [r_1 < r_2 < ...], "lowrank_us": [t_1, ...], "dense_us": t}}``,
            the raw medians (the monotone envelope is derived here).
        meta: free-form provenance (``device``, ``torch``, ``dtype``, ``tokens``, ``repeats``, ``backend``).

    ``lowrank_us(K, N, r)`` interpolates linearly between the grid ranks on the running maximum
    ``T_j = max(t_1..t_j)`` of the measured times, so it is non-decreasing in r; outside the grid it
    extends the nearest segment's slope (>= 0), clipped at 0.
    """

    def __init__(self, entries: dict[tuple[int, int], dict], meta: dict | None = None) -> None:
        if not isinstance(entries, dict) or not entries:
            raise ValueError("entries must be a non-empty dict (K, N) -> {'ranks', 'lowrank_us', 'dense_us'}")
        self._entries: dict[tuple[int, int], dict] = {}
        for shape, entry in entries.items():
            K, N = _check_shape(tuple(shape) if isinstance(shape, list) else shape, "entries key")
            ranks = [int(r) for r in entry["ranks"]]
            times = [float(t) for t in entry["lowrank_us"]]
            dense = float(entry["dense_us"])
            if not ranks or len(ranks) != len(times):
                raise ValueError(f"entries[{(K, N)}]: ranks and lowrank_us must be non-empty and of equal length")
            if any(b <= a for a, b in zip(ranks, ranks[1:], strict=False)) or ranks[0] < 1:
                raise ValueError(f"entries[{(K, N)}]: ranks must be positive and strictly increasing, got {ranks}")
            if not all(math.isfinite(t) and t >= 0 for t in [*times, dense]):
                raise ValueError(f"entries[{(K, N)}]: times must be finite and >= 0")
            envelope, running = [], 0.0
            for t in times:
                running = max(running, t)
                envelope.append(running)
            self._entries[(K, N)] = {"ranks": ranks, "lowrank_us": times, "dense_us": dense, "envelope": envelope}
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ queries
    @property
    def shapes(self) -> list[tuple[int, int]]:
        return list(self._entries)

    def __contains__(self, shape: object) -> bool:
        return tuple(shape) in self._entries if isinstance(shape, (tuple, list)) else False

    def _entry(self, K: int, N: int) -> dict:
        entry = self._entries.get((K, N))
        if entry is None:
            raise ValueError(f"cost_table has no timings for shape (K, N) = ({K}, {N}); measured shapes: "
                             f"{self.shapes}")
        return entry

    def lowrank_us(self, K: int, N: int, r: int | float) -> float:
        """Interpolated, monotone time of a rank-``r`` low-rank ``K -> N`` layer (microseconds)."""
        entry = self._entry(K, N)
        ranks, env = entry["ranks"], entry["envelope"]
        if len(ranks) == 1:
            return env[0]
        # Segment containing r (the edge segments extend beyond the grid).
        j = 1
        while j < len(ranks) - 1 and r > ranks[j]:
            j += 1
        r0, r1, t0, t1 = ranks[j - 1], ranks[j], env[j - 1], env[j]
        t = t0 + (t1 - t0) * (r - r0) / (r1 - r0)
        if r > ranks[-1]:
            t = max(t, env[-1])
        return max(t, 0.0)

    def dense_us(self, K: int, N: int) -> float:
        """Time of the dense ``nn.Linear(K, N)`` (microseconds)."""
        return self._entry(K, N)["dense_us"]

    def break_even_rank(self, K: int, N: int) -> int | None:
        """Smallest rank in ``[1, min(K, N)]`` whose low-rank time reaches the dense time, or None."""
        dense = self.dense_us(K, N)
        for r in range(1, min(K, N) + 1):
            if self.lowrank_us(K, N, r) >= dense:
                return r
        return None

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "meta": self.meta,
            "shapes": [{"in_features": K, "out_features": N, "ranks": e["ranks"], "lowrank_us": e["lowrank_us"],
                        "dense_us": e["dense_us"]} for (K, N), e in self._entries.items()],
        }

    @classmethod
    def from_dict(cls, data: dict) -> LatencyTable:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a latency table: expected format {FORMAT!r}")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported latency table version {data.get('version')!r} (expected {FORMAT_VERSION})")
        entries = {(int(s["in_features"]), int(s["out_features"])): s for s in data["shapes"]}
        return cls(entries, data.get("meta"))

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the table as JSON atomically (temporary file in the same folder, then ``os.replace``)."""
        atomic.write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LatencyTable:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LatencyTable) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        shapes = ", ".join(f"{K}x{N}" for K, N in self.shapes)
        return f"LatencyTable(shapes=[{shapes}], device={self.meta.get('device')!r}, tokens={self.meta.get('tokens')})"


# ---------------------------------------------------------------------- measurement
def resolve_cost_table(table):
    """``config.cost_table`` as the allocator takes it: a path (str, bytes, PathLike) is read as a
    :class:`LatencyTable` JSON file; a table or None is returned as it is."""
    if isinstance(table, (str, bytes)) or hasattr(table, "__fspath__"):
        return LatencyTable.from_json(table)
    return table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_us(fn, device: torch.device, repeats: int) -> float:
    """Median time of one ``fn()`` call in microseconds (warm-up, then ``repeats`` timed runs)."""
    for _ in range(3):
        fn()
    _sync(device)
    # Calibrate the inner loop so one timed run lasts >= _MIN_RUN_SECONDS.
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(_MAX_INNER, math.ceil(_MIN_RUN_SECONDS / once)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(samples)


def _collect_shapes(shapes: Iterable | nn.Module) -> list[tuple[int, int]]:
    if isinstance(shapes, nn.Module):
        found = [(m.in_features, m.out_features) for m in shapes.modules() if isinstance(m, (nn.Linear, LowRankLinear))]
        if not found:
            raise ValueError(f"shapes: the model {type(shapes).__name__} holds no nn.Linear or LowRankLinear")
        return list(dict.fromkeys(found))
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Iterable):
        raise TypeError(f"shapes must be an iterable of (in_features, out_features) pairs or an nn.Module, "
                        f"got {type(shapes).__name__}")
    out = list(dict.fromkeys(_check_shape(tuple(s) if isinstance(s, list) else s, "shapes[i]") for s in shapes))
    if not out:
        raise ValueError("shapes is empty")
    return out


@torch.no_grad()
def measure_latency_table(
    shapes: Iterable[tuple[int, int]] | nn.Module,
    ranks: Iterable[int] | None = None,
    *,
    tokens: int = 128,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    repeats: int = 20,
    progress: bool = True,
) -> LatencyTable:
    """Time low-rank and dense linear layers of each shape on this machine.

    Args:
        shapes: ``(in_features K, out_features N)`` pairs, or a model (every ``nn.Linear`` /
            ``LowRankLinear`` shape in it).
        ranks: the rank grid for every shape (clipped to ``[1, min(K, N)]``); None = 8 ranks evenly
            spread over ``[1, min(K, N)]`` plus the break-even rank ``ceil(KN / (K + N))``.
        tokens: rows M of the input ``x: [M, K]`` (the batch x sequence the model will run).
        dtype, device: of the layers and the input.
        repeats: timed runs per configuration; the median is kept.
        progress: show a tqdm bar over the configurations.

    Returns:
        A :class:`LatencyTable` recording the device name, torch version, dtype, tokens and repeats.
        The three MiniLM shapes (384x384, 384x1536, 1536x384) take a few seconds on a 2-core CPU.
    """
    shape_list = _collect_shapes(shapes)
    for name, value, minimum in (("tokens", tokens, 1), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device(device)
    grid_override = None
    if ranks is not None:
        grid_override = sorted({int(r) for r in ranks})
        if not grid_override or grid_override[0] < 1:
            raise ValueError(f"ranks must be positive ints, got {ranks!r}")
    plan = []
    for K, N in shape_list:
        full = min(K, N)
        grid = default_ranks(K, N) if grid_override is None else sorted({min(r, full) for r in grid_override})
        plan.append((K, N, grid))
    total = sum(len(g) + 1 for _, _, g in plan)
    entries = {}
    previous = get_backend()
    set_backend("torch")
    try:
        with tqdm(total=total, desc="latency table", disable=not progress, leave=False) as bar:
            for K, N, grid in plan:
                x = torch.randn(tokens, K, device=device, dtype=dtype)
                dense = nn.Linear(K, N, device=device, dtype=dtype)
                bar.set_postfix_str(f"{K}x{N} dense")
                dense_us = _median_us(lambda dense=dense, x=x: dense(x), device, repeats)
                bar.update(1)
                times = []
                for r in grid:
                    layer = LowRankLinear(K, N, r, device=device, dtype=dtype).eval()
                    bar.set_postfix_str(f"{K}x{N} r={r}")
                    times.append(_median_us(lambda layer=layer, x=x: layer(x), device, repeats))
                    bar.update(1)
                entries[(K, N)] = {"ranks": grid, "lowrank_us": times, "dense_us": dense_us}
    finally:
        set_backend(previous)
    meta = {
        "device": _device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "repeats": repeats,
        "backend": "torch",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return LatencyTable(entries, meta)
