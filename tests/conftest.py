"""Shared fixtures: every test starts from a fixed seed and leaves the backend as it found it."""

from __future__ import annotations

import random

import pytest
import torch

from lrcomp import backend


@pytest.fixture(autouse=True)
def _seed_everything():
    """Seed every RNG a test may touch, so each test is reproducible on its own."""
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy as np
    except ImportError:  # numpy is optional
        pass
    else:
        np.random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_backend(monkeypatch):
    """Undo any set_backend() / LRCOMP_BACKEND change a test makes.

    ``backend._backend`` is the module-level selection (None = not read from the
    environment yet); monkeypatch puts the old value back at teardown, whatever the test did.
    """
    monkeypatch.setattr(backend, "_backend", backend._backend)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the CPU
    is shared, and the small forwards and SVDs of tiny models run faster and more predictably on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
