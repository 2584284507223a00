"""GPU-only checks of the Triton path: bf16 training step, torch.compile and CUDA graphs.

They carry the ``gpu`` marker and skip cleanly without CUDA (nothing touches CUDA at
collection time).
"""

import pytest
import torch

import lrcomp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _model(dtype):
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    lrcomp.replace_linears(dense, 64, target_modules=["0", "2"])
    return dense.to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_torch_backend_in_training(dtype, triton_backend):
    model = _model(dtype)
    x = torch.randn(8, 33, 256, device="cuda", dtype=dtype)
    grads = {}
    for name in ("triton", "torch"):
        lrcomp.set_backend(name)
        model.zero_grad()
        y = model(x)
        y.float().square().mean().backward()
        # parameters the loss does not reach (the scores when mask_fn="none") keep grad None
        grads[name] = {"y": y.detach().float()} | {n: p.grad.float() for n, p in model.named_parameters()
                                                   if p.grad is not None}
    assert grads["triton"].keys() == grads["torch"].keys()
    assert {"0.U", "0.V", "0.S", "2.U", "2.V", "2.S"} <= grads["torch"].keys()
    for key, b in grads["torch"].items():
        a = grads["triton"][key]
        assert ((a - b).norm() / b.norm()).item() < 2e-2, key


def test_compile_fullgraph_and_cuda_graphs(triton_backend):
    model = _model(torch.bfloat16).eval()
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # warm-up, record, replay
            out = compiled(x)
    assert ((out.float() - eager.float()).norm() / eager.float().norm()).item() < 1e-2
