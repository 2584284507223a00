"""``torch.compile(fullgraph=True)`` through LowRankLinear: forward and backward equal eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lrcomp import LowRankLinear


class TwoLayer(nn.Module):
    """Every feature of the op in one graph: pruned STE mask, LoRA branch, dense branch, 3-D input."""

    def __init__(self):
        super().__init__()
        self.a = LowRankLinear.from_linear(nn.Linear(23, 31), 7, mask_fn="ste")
        with torch.no_grad():
            self.a.scores.copy_(torch.tensor([1.0, -1.0, 0.5, 2.0, 0.0, 0.3, 1.2]))
        self.a.prune_(4)
        self.a.add_lora(3, alpha=6.0)
        with torch.no_grad():
            self.a.lora_B.normal_()
        self.b = LowRankLinear.from_linear(nn.Linear(31, 13), mask_fn="sigmoid", temperature=0.5,
                                           keep_dense=True)
        self.b.dense_scale = 0.3

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _run(call, module, x):
    x = x.detach().clone().requires_grad_()
    y = call(x)
    y.square().mean().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def _compare_compiled_with_eager(backend):
    torch._dynamo.reset()
    eager = TwoLayer()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=backend)
    for shape in ((2, 5, 23), (1, 23)):
        x = torch.randn(*shape)
        eager.zero_grad(set_to_none=True)
        compiled_module.zero_grad(set_to_none=True)
        y_e, dx_e, g_e = _run(eager, eager, x)
        y_c, dx_c, g_c = _run(compiled, compiled_module, x)
        torch.testing.assert_close(y_c, y_e)
        torch.testing.assert_close(dx_c, dx_e)
        assert set(g_c) == set(g_e)
        # Every trainable tensor that should learn gets a gradient (b.scores via the sigmoid mask).
        assert {"a.U", "a.S", "a.V", "a.scores", "a.lora_A", "a.lora_B", "b.scores", "b.U", "b.bias"} <= set(g_e)
        for name in g_e:
            torch.testing.assert_close(g_c[name], g_e[name], msg=lambda m, n=name: f"{n}: {m}")


def test_compile_fullgraph_aot_eager():
    """Dynamo + AOT autograd with the fake implementations; fast, so it runs by default."""
    _compare_compiled_with_eager("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    """The real compiler (C++ codegen on the CPU, ~30 s on 2 cores)."""
    _compare_compiled_with_eager("inductor")
