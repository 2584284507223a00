"""Backend selection: set_backend / get_backend / LRCOMP_BACKEND and the Triton guard on the CPU."""

from __future__ import annotations

import pytest
import torch

import lrcomp
from lrcomp import backend
from lrcomp.ops import lowrank_linear


def _fresh(monkeypatch, env=None):
    """Forget the current selection so the next get_backend() reads LRCOMP_BACKEND again."""
    monkeypatch.setattr(backend, "_backend", None)
    if env is None:
        monkeypatch.delenv("LRCOMP_BACKEND", raising=False)
    else:
        monkeypatch.setenv("LRCOMP_BACKEND", env)


def _inputs():
    return torch.randn(3, 8), torch.randn(2, 8), torch.randn(2), torch.randn(5, 2)


def test_default_is_auto(monkeypatch):
    _fresh(monkeypatch)
    assert lrcomp.get_backend() == "auto"
    assert backend.resolve(torch.device("cpu")) == "torch"


@pytest.mark.parametrize("name", ["auto", "torch", "triton", "TORCH", "Auto"])
def test_set_and_get(name):
    lrcomp.set_backend(name)
    assert lrcomp.get_backend() == name.lower()


@pytest.mark.parametrize("name", ["torch", "triton", "auto", "Triton"])
def test_env_gives_the_initial_value(monkeypatch, name):
    _fresh(monkeypatch, name)
    assert lrcomp.get_backend() == name.lower()
    lrcomp.set_backend("torch")  # set_backend wins over the environment
    assert lrcomp.get_backend() == "torch"


@pytest.mark.parametrize("name", ["cuda", "", "reference", None, 1])
def test_bad_backend_name(name):
    lrcomp.set_backend("torch")
    with pytest.raises(ValueError, match=r"^backend must be one of \('auto', 'torch', 'triton'\), got"):
        lrcomp.set_backend(name)
    assert lrcomp.get_backend() == "torch"  # unchanged


@pytest.mark.parametrize("value", ["cuda", "", "none"])
def test_bad_env_backend(monkeypatch, value):
    _fresh(monkeypatch, value)
    msg = rf"^LRCOMP_BACKEND must be one of \('auto', 'torch', 'triton'\), got '{value}'"
    with pytest.raises(ValueError, match=msg):
        lrcomp.get_backend()
    with pytest.raises(ValueError, match=r"^LRCOMP_BACKEND must be one of"):
        lowrank_linear(*_inputs())


@pytest.mark.parametrize("interp", [None, "0", ""])
def test_triton_on_cpu_without_interpreter_raises(monkeypatch, interp):
    if interp is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interp)
    lrcomp.set_backend("triton")
    msg = r"backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for tensors on cpu; got tensors on cpu"
    with pytest.raises(RuntimeError, match=msg):
        backend.resolve(torch.device("cpu"))
    with pytest.raises(RuntimeError, match=msg):
        lowrank_linear(*_inputs())


def test_triton_not_installed_raises(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    lrcomp.set_backend("triton")
    with pytest.raises(RuntimeError, match="backend 'triton' was selected but triton is not installed"):
        backend.resolve(torch.device("cuda"))
    lrcomp.set_backend("auto")
    assert backend.resolve(torch.device("cuda")) == "torch"


def test_resolve_rules(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    lrcomp.set_backend("auto")
    assert backend.resolve(torch.device("cuda", 0)) == "torch"  # Triton measured slower than eager on CUDA
    monkeypatch.setattr(backend, "AUTO_TRITON_ON_CUDA", True)
    assert backend.resolve(torch.device("cuda", 0)) == "triton"
    monkeypatch.setattr(backend, "AUTO_TRITON_ON_CUDA", False)
    assert backend.resolve(torch.device("cpu")) == "torch"
    lrcomp.set_backend("torch")
    assert backend.resolve(torch.device("cuda", 0)) == "torch"
    lrcomp.set_backend("triton")
    assert backend.resolve(torch.device("cuda", 0)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.resolve(torch.device("cpu")) == "triton"


def test_torch_backend_runs_the_reference():
    lrcomp.set_backend("torch")
    x, V, d, U = _inputs()
    torch.testing.assert_close(lowrank_linear(x, V, d, U), ((x @ V.t()) * d) @ U.t())


def test_backend_is_read_at_call_time_inside_a_compiled_graph(monkeypatch):
    """A compiled graph follows a later set_backend (the choice is made inside the op)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()
    x, V, d, U = _inputs()
    fn = torch.compile(lambda *a: lowrank_linear(*a), fullgraph=True, backend="aot_eager")
    lrcomp.set_backend("torch")
    torch.testing.assert_close(fn(x, V, d, U), ((x @ V.t()) * d) @ U.t())
    lrcomp.set_backend("triton")
    with pytest.raises(RuntimeError, match="backend 'triton' needs CUDA tensors"):
        fn(x, V, d, U)


# The conftest fixture must undo what these tests do; the two tests below check it, in order.
def test_fixture_restore_part1_changes_the_backend():
    pytest._lrcomp_backend_before = backend._backend
    lrcomp.set_backend("triton" if backend._backend != "triton" else "torch")


def test_fixture_restore_part2_sees_the_old_backend():
    assert backend._backend == pytest._lrcomp_backend_before
    del pytest._lrcomp_backend_before
