"""Kernel tests: Triton under its interpreter on the CPU, or on CUDA when present.

The interpreter must be switched on before triton is imported, so the lane is chosen by
the environment (``TRITON_INTERPRET=1 pytest tests/kernels``); without it and without a
GPU every test here skips.
"""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_devices() -> list[str]:
    devices = ["cpu"] if INTERPRET else []
    if torch.cuda.is_available() and not INTERPRET:
        devices.append("cuda")
    return devices


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.kernels)
            if not kernel_devices():
                item.add_marker(pytest.mark.skip(reason="needs TRITON_INTERPRET=1 or a CUDA GPU"))


@pytest.fixture
def triton_backend():
    import lrcomp

    previous = lrcomp.get_backend()
    lrcomp.set_backend("triton")
    yield
    lrcomp.set_backend(previous)
