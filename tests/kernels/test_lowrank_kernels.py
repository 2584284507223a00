"""Triton kernels of the low-rank linear op against the fp64 reference.

Criterion (DESIGN.md): the kernel's error against fp64 is at most twice the error of the
same-dtype PyTorch computation (the reference run in that dtype). Errors are relative
Frobenius norms. Two floors keep the ratio meaningful on tiny tensors (t at M=1 has 7
entries, whose error is a few ulps either way): the dtype's epsilon (rounding the result
alone costs eps/2), and the expected rounding error of the fp32 accumulation the kernels
promise, u32 * sqrt(R) for a reduction of length R (Higham & Mary 2019). The second is
about 1e-6 at these sizes: far below fp16/bf16 errors, and far below what a wrong
accumulator dtype or TF32 (1e-3) would give.
"""

import pytest
import torch
from conftest import kernel_devices

import lrcomp
from lrcomp.ops import reference

SHAPES = [  # (M, K, N, r): odd sizes, M=1, decode (M <= 16, split-K) and tiled sizes
    (1, 123, 431, 7),
    (5, 64, 48, 16),
    (16, 40, 72, 24),
    (37, 123, 431, 7),
    (70, 96, 80, 33),
]


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


CASES = [(dev, dt) for dev in kernel_devices() for dt in _dtypes(dev)] or [("cpu", torch.float32)]


def _inputs(M, K, N, r, dtype, device, bias, dense, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = rnd(M, K)
    V = rnd(r, K, scale=K ** -0.5)
    d = (torch.rand(r, generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    U = rnd(N, r, scale=r ** -0.5)
    b = rnd(N) if bias else None
    W0 = rnd(N, K, scale=K ** -0.5) if dense else None
    return x, V, d, U, b, W0


def _rel(a, ref):
    a, ref = a.double().cpu(), ref.double().cpu()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


U32 = torch.finfo(torch.float32).eps / 2


def _assert_close_to_oracle(name, got, same_dtype, oracle, dtype, reduction):
    err, err_torch = _rel(got, oracle), _rel(same_dtype, oracle)
    bound = max(2 * err_torch, torch.finfo(dtype).eps, U32 * reduction ** 0.5)
    assert err <= bound, f"{name}: kernel error {err:.3g} > bound {bound:.3g} (torch {dtype}: {err_torch:.3g})"


def _kernels():
    from lrcomp.kernels import lowrank_linear

    return lowrank_linear


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
@pytest.mark.parametrize("bias,dense", [(True, False), (False, False), (True, True)])
def test_forward_matches_reference(device, dtype, shape, bias, dense):
    x, V, d, U, b, W0 = _inputs(*shape, dtype, device, bias, dense)
    lam = 0.3 if dense else 0.0
    y, t = _kernels().lowrank_linear_forward(x, V, d, U, b, W0, lam)
    assert y.dtype == dtype and t.dtype == dtype and y.shape == (shape[0], shape[2])
    cpu = [a.cpu() if a is not None else None for a in (x, V, d, U, b, W0)]
    y_same, t_same = reference.lowrank_linear_forward(*cpu, lam)
    y64, t64 = reference.lowrank_linear_forward(*[a.double() if a is not None else None for a in cpu], lam)
    M, K, N, r = shape
    _assert_close_to_oracle("t", t, t_same, t64, dtype, K)
    _assert_close_to_oracle("y", y, y_same, y64, dtype, max(K, r))


NEEDS = [(True,) * 5, (False, False, True, False, False), (True, False, False, False, True),
         (False, True, False, True, False)]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "".join("xVdUb"[i] for i in range(5) if n[i]))
def test_backward_matches_reference(device, dtype, shape, needs):
    M, K, N, r = shape
    dense = needs[0]  # exercise the fused dense term of dx whenever dx is computed
    x, V, d, U, b, W0 = _inputs(*shape, dtype, device, bias=True, dense=dense, seed=1)
    lam = 0.7 if dense else 0.0
    dy = _inputs(M, N, 1, 1, dtype, device, False, False, seed=2)[0]
    _, t = _kernels().lowrank_linear_forward(x, V, d, U, b, W0, lam)
    grads = _kernels().lowrank_linear_backward(dy, x, t, V, d, U, W0, lam, needs)
    cpu = [a.cpu() if a is not None else None for a in (dy, x, t, V, d, U, W0)]
    same = reference.lowrank_linear_backward(*cpu, lam, needs)
    # The oracle uses the exact t = x V^T, not the rounded one, so rounding t counts as error.
    dy64, x64, V64, d64, U64 = (a.double() for a in (cpu[0], cpu[1], cpu[3], cpu[4], cpu[5]))
    t64 = x64 @ V64.t()
    W064 = cpu[6].double() if cpu[6] is not None else None
    oracle = reference.lowrank_linear_backward(dy64, x64, t64, V64, d64, U64, W064, lam, needs)
    for name, got, s, o, need in zip(("dx", "dV", "dd", "dU", "db"), grads, same, oracle, needs, strict=True):
        if not need:
            assert got is None, f"{name} was computed although not needed"
            continue
        assert got.shape == o.shape
        _assert_close_to_oracle(name, got, s, o, dtype, max(M, K, N))


@pytest.mark.parametrize("device,dtype", CASES)
def test_op_autograd_through_triton_backend(device, dtype, triton_backend):
    """The public op with backend 'triton' gives the reference's output and gradients."""
    torch.manual_seed(0)
    layer = lrcomp.LowRankLinear(123, 431, 7, device=device, dtype=dtype)
    layer.add_lora(3)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.attach_dense(torch.randn(431, 123, device=device, dtype=dtype) / 123 ** 0.5, scale=0.25)
    x = torch.randn(2, 3, 123, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    got = [y.detach(), x.grad] + [p.grad for p in (layer.U, layer.S, layer.V, layer.bias, layer.lora_A)]

    ref_layer = layer.double().cpu()
    for p in ref_layer.parameters():
        p.grad = None
    x64 = x.detach().double().cpu().requires_grad_(True)
    lrcomp.set_backend("torch")
    y64 = ref_layer(x64)
    y64.square().sum().backward()
    want = [y64.detach(), x64.grad] + [p.grad for p in (ref_layer.U, ref_layer.S, ref_layer.V, ref_layer.bias,
                                                        ref_layer.lora_A)]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert _rel(a, b) < tol, f"output/grad {i}: {_rel(a, b):.3g}"


def test_split_k_heuristic():
    from lrcomp.kernels.gemm import use_split_k

    assert use_split_k(1, 4096, 4096)  # decode
    assert use_split_k(16, 11008, 4096)
    assert not use_split_k(2048, 4096, 64)  # prefill: plenty of tiles
    assert use_split_k(64, 4096, 8192)  # dV of training: [r, K] output, reduction over tokens


@pytest.mark.parametrize("device,dtype", CASES[:1])
@pytest.mark.parametrize("bias,dense", [(True, True), (False, False)])
def test_opcheck_with_triton_backend(device, dtype, bias, dense, triton_backend):
    x, V, d, U, b, W0 = _inputs(3, 40, 24, 5, dtype, device, bias, dense)
    for a in (x, V, d, U):
        a.requires_grad_(True)
    torch.library.opcheck(torch.ops.lrcomp.lowrank_linear_fwd, (x, V, d, U, b, W0, 0.5 if dense else 0.0))
    dy = torch.randn(3, 24, device=device, dtype=dtype)
    t = x.detach() @ V.detach().t()
    args = (dy, x.detach(), t, V.detach(), d.detach(), U.detach(), W0, 0.5 if dense else 0.0,
            [True, True, True, True, bias])
    torch.library.opcheck(torch.ops.lrcomp.lowrank_linear_bwd, args)
