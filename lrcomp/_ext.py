"""Loader of the CUDA extension ``lrcomp._C`` (sources in csrc/).

The extension registers ``torch.ops.lrcomp.rsvd`` and ``torch.ops.lrcomp.covariance_update_``.
It is looked for lazily, on the first :func:`has_cuda_ext` call, never at import time, and a
failed load is reported once (a ``RuntimeWarning``) and never raised: every op has a PyTorch
reference, so lrcomp works without it.

Where it comes from, in order:

1. ``lrcomp._C`` built by ``setup.py`` (CUDA build of torch + nvcc; see setup.py for the
   ``LRCOMP_SKIP_CUDA_BUILD`` / ``LRCOMP_FORCE_CUDA_BUILD`` switches);
2. a just-in-time build of csrc/ with ``torch.utils.cpp_extension.load`` when
   ``LRCOMP_JIT_EXT=1`` is set or :func:`load` is called with ``jit=True`` (a source checkout
   with a CUDA build of torch; the first build takes minutes, later ones hit the cache).

``LRCOMP_DISABLE_CUDA_EXT=1`` turns the extension off. Loading does not initialise CUDA.
"""

from __future__ import annotations

import glob
import importlib
import os
import threading
import warnings
from pathlib import Path

import torch

CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_error: str | None = None
_warned = False


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _ops_registered() -> bool:
    return hasattr(torch.ops.lrcomp, "rsvd") and hasattr(torch.ops.lrcomp, "covariance_update_")


def _jit_build(verbose: bool = False) -> None:
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(str(CSRC_DIR / "*.cpp")) + glob.glob(str(CSRC_DIR / "*.cu")))
    if not sources:
        raise RuntimeError(f"no C++/CUDA sources found in {CSRC_DIR} (JIT build needs a source checkout)")
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is not a CUDA build: cannot JIT-build the CUDA extension")
    cpp_extension.load(
        name="lrcomp_C",
        sources=sources,
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        is_python_module=False,  # only needs the TORCH_LIBRARY registrations to run
        verbose=verbose,
    )


def _register_fakes() -> None:
    """Fake (meta) implementations of the C++ ops, so they trace under torch.compile."""

    @torch.library.register_fake("lrcomp::rsvd")
    def _rsvd_fake(A, omega, rank, niter, ortho="cholqr2"):
        out = torch.float64 if A.dtype == torch.float64 else torch.float32
        lead, m, n = A.shape[:-2], A.shape[-2], A.shape[-1]
        return (
            A.new_empty((*lead, m, rank), dtype=out),
            A.new_empty((*lead, rank), dtype=out),
            A.new_empty((*lead, rank, n), dtype=out),
        )

    @torch.library.register_fake("lrcomp::covariance_update_")
    def _covariance_update_fake(master, x):
        return None


def _try_load(jit: bool, verbose: bool) -> tuple[bool, str | None]:
    if _truthy("LRCOMP_DISABLE_CUDA_EXT"):
        return False, "disabled by LRCOMP_DISABLE_CUDA_EXT"
    errors = []
    if not _ops_registered():
        try:
            importlib.import_module("lrcomp._C")
        except ImportError as exc:  # not built: the normal case on CPU-only installs
            errors.append(f"lrcomp._C: {exc}")
        except Exception as exc:  # noqa: BLE001 - a broken build must not break lrcomp
            errors.append(f"lrcomp._C: {type(exc).__name__}: {exc}")
    if not _ops_registered() and (jit or _truthy("LRCOMP_JIT_EXT")):
        try:
            _jit_build(verbose)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"JIT build: {type(exc).__name__}: {exc}")
    if not _ops_registered():
        return False, "; ".join(errors) or "ops not registered"
    try:
        _register_fakes()
    except Exception as exc:  # noqa: BLE001 - already registered (e.g. loaded twice) is fine
        if "already" not in str(exc).lower():
            return False, f"registering fake implementations: {type(exc).__name__}: {exc}"
    return True, None


def load(*, jit: bool = False, verbose: bool = False) -> bool:
    """Load the extension if it is not loaded yet; True when its ops are available.

    ``jit=True`` builds csrc/ just in time when no prebuilt ``lrcomp._C`` exists (a later call
    with ``jit=True`` retries after an earlier failure without it). Never raises: a failure
    is reported once as a ``RuntimeWarning`` and :func:`load_error` keeps the reason.
    """
    global _loaded, _error, _warned
    with _lock:
        if _loaded or (_loaded is False and not jit):
            return bool(_loaded)
        _loaded, _error = _try_load(jit, verbose)
        if not _loaded and not _warned and _should_warn(_error, jit):
            _warned = True
            warnings.warn(
                f"lrcomp CUDA extension not loaded ({_error}); using the PyTorch reference implementations",
                RuntimeWarning,
                stacklevel=3,
            )
        return _loaded


def _should_warn(error: str | None, jit: bool) -> bool:
    # On a CPU-only torch a missing extension is expected: say nothing. Warn when one could
    # have been used (CUDA torch) or when something was asked for and failed.
    if error and "disabled by" in error:
        return False
    return jit or torch.version.cuda is not None or _truthy("LRCOMP_JIT_EXT")


def has_cuda_ext() -> bool:
    """Whether the CUDA extension ``lrcomp._C`` loaded (tried once, lazily; never raises)."""
    return load()


def load_error() -> str | None:
    """Why the extension did not load (None when it loaded or was not tried yet)."""
    return _error
