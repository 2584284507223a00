"""lrcomp.has_cuda_ext() on a machine without the extension: False, silent, never raises."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lrcomp
from lrcomp import _ext


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch behaviour")
def test_has_cuda_ext_is_false_without_raising_or_warning():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('error')\n"
        "import lrcomp\n"
        "assert lrcomp.has_cuda_ext() is False\n"
        "assert lrcomp.has_cuda_ext() is False\n"
        "from lrcomp import _ext\n"
        "assert _ext.load_error()\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_disabled_extension_is_reported_not_raised(monkeypatch):
    monkeypatch.setenv("LRCOMP_DISABLE_CUDA_EXT", "1")
    loaded, error = _ext._try_load(jit=False, verbose=False)
    assert loaded is False and "LRCOMP_DISABLE_CUDA_EXT" in error


def test_failed_jit_build_warns_once(monkeypatch):
    if torch.version.cuda is not None:
        pytest.skip("a CUDA torch could really JIT-build the extension")
    monkeypatch.setattr(_ext, "_loaded", None)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setattr(_ext, "_warned", False)
    with pytest.warns(RuntimeWarning, match="lrcomp CUDA extension not loaded"):
        assert _ext.load(jit=True) is False
    assert "not a CUDA build" in _ext.load_error()
    assert _ext.load(jit=True) is False  # no second warning (pytest.warns is not active here)
    assert lrcomp.has_cuda_ext() is False


def test_cpu_tensors_never_try_the_extension(monkeypatch):
    from lrcomp.ops import rsvd as rsvd_ops

    def boom():
        raise AssertionError("has_cuda_ext must not be consulted for CPU tensors")

    monkeypatch.setattr(_ext, "has_cuda_ext", boom)
    assert rsvd_ops.use_extension(torch.zeros(1)) is False
