"""Backend selection for lrcomp's ops.

``auto`` runs the pure-PyTorch reference (eager PyTorch GEMMs, cuBLAS on a GPU) everywhere for
now: on an H100 the Triton path measured 2-30x slower than it (a host-side cost of 300-600 us per
call, see benchmarks/results/lowrank_linear_nvidia-h100-80gb-hbm3.json), so :data:`AUTO_TRITON_ON_CUDA`
is off until the kernels beat eager; ``torch`` always runs the reference; ``triton`` always runs the kernels, on
CPU tensors too when the Triton interpreter is on (``TRITON_INTERPRET=1`` set before
triton is imported), which is how CI tests the kernels.

The choice is read at call time, inside the op, so a compiled graph follows later
changes. The environment variable ``LRCOMP_BACKEND`` gives the initial value.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
# Whether "auto" picks the Triton kernels for CUDA tensors. Off: measured slower than eager on an H100.
AUTO_TRITON_ON_CUDA = False

_backend: str | None = None


def _validate(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: str) -> None:
    """Select the implementation of lrcomp's ops: "auto", "torch" or "triton"."""
    global _backend
    _backend = _validate(name, "backend")


def get_backend() -> str:
    """The selected backend name (``LRCOMP_BACKEND`` until :func:`set_backend` is called)."""
    global _backend
    if _backend is None:
        _backend = _validate(os.environ.get("LRCOMP_BACKEND", "auto"), "LRCOMP_BACKEND")
    return _backend


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    """True when triton can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def resolve(device: torch.device) -> str:
    """The implementation ("torch" or "triton") that runs for tensors on ``device``."""
    name = get_backend()
    if name == "torch":
        return "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was selected but triton is not installed")
        if device.type != "cuda" and not triton_interpreter_on():
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for tensors on "
                f"{device.type}; got tensors on {device}"
            )
        return "triton"
    # auto
    if AUTO_TRITON_ON_CUDA and device.type == "cuda" and triton_available():
        return "triton"
    return "torch"
