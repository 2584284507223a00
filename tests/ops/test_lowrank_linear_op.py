"""The ``lrcomp::lowrank_linear`` op (reference backend) against explicit formulas.

    y   = ((x V^T) * d) U^T + b + lam x W0^T
    dU  = dy^T (t * d)      dt~ = dy U      dd = sum_rows(t * dt~)      dt = dt~ * d
    dV  = dt^T x            dx  = dt V + lam dy W0                      db = sum_rows(dy)
"""

from __future__ import annotations

import pytest
import torch

import lrcomp
from lrcomp.ops import lowrank_linear, reference

FWD = torch.ops.lrcomp.lowrank_linear_fwd.default
BWD = torch.ops.lrcomp.lowrank_linear_bwd.default

# (leading dims of x, K, N, r): odd sizes, M = 1, 3-D input [B, T, K], r = min(K, N), N < K.
SHAPES = [
    ((1,), 123, 431, 7),
    ((17,), 123, 431, 7),
    ((2, 5, ), 123, 431, 7),
    ((3, 4), 16, 24, 16),
    ((9,), 40, 13, 13),
]
SHAPE_IDS = ["M1-K123-N431-r7", "M17-K123-N431-r7", "B2T5-K123-N431-r7", "B3T4-full-rank", "N<K-full-rank"]


def make_inputs(lead, K, N, r, *, dtype=torch.float64, bias=True, dense=True, d_dtype=None):
    """Random op inputs; made in fp64 then rounded, so an fp64 copy holds the exact same values."""
    x = torch.randn(*lead, K, dtype=torch.float64)
    V = torch.randn(r, K, dtype=torch.float64) / K**0.5
    d = torch.rand(r, dtype=torch.float64) * 2 + 0.5
    U = torch.randn(N, r, dtype=torch.float64) / r**0.5
    b = torch.randn(N, dtype=torch.float64) if bias else None
    W0 = torch.randn(N, K, dtype=torch.float64) / K**0.5 if dense else None
    cast = [t.to(dtype) if t is not None else None for t in (x, V, d, U, b, W0)]
    if d_dtype is not None:
        cast[2] = d.to(d_dtype)
    return cast


def explicit_forward(x, V, d, U, b, W0, lam):
    """The op's formula written out with plain PyTorch ops, in the inputs' dtype."""
    t = x @ V.t()
    y = (t * d.to(t.dtype)) @ U.t()
    if b is not None:
        y = y + b
    if W0 is not None:
        y = y + lam * (x @ W0.t())
    return y


def explicit_grads(dy, x, V, d, U, W0, lam):
    """(dx, dV, dd, dU, db) from the formulas of the design, on 2-D x and dy."""
    t = x @ V.t()
    dU = dy.t() @ (t * d)
    dt_scaled = dy @ U
    dd = (t * dt_scaled).sum(0)
    dt = dt_scaled * d
    dV = dt.t() @ x
    dx = dt @ V
    if W0 is not None:
        dx = dx + lam * dy @ W0
    db = dy.sum(0)
    return dx, dV, dd, dU, db


def _leaves(tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "nodense"])
@pytest.mark.parametrize(("lead", "K", "N", "r"), SHAPES, ids=SHAPE_IDS)
def test_forward_and_gradients_match_explicit_formulas_fp64(lead, K, N, r, bias, dense):
    lam = 0.3
    x, V, d, U, b, W0 = _leaves(make_inputs(lead, K, N, r, bias=bias, dense=dense))
    y = lowrank_linear(x, V, d, U, b, dense_weight=W0, dense_scale=lam)
    assert y.shape == (*lead, N)
    assert y.dtype == torch.float64

    x2 = x.detach().reshape(-1, K)
    y_expected = explicit_forward(x2, V.detach(), d.detach(), U.detach(),
                                  None if b is None else b.detach(), None if W0 is None else W0.detach(), lam)
    torch.testing.assert_close(y.reshape(-1, N), y_expected, rtol=1e-12, atol=1e-12)

    dy = torch.randn_like(y)
    y.backward(dy)
    dx, dV, dd, dU, db = explicit_grads(dy.reshape(-1, N), x2, V.detach(), d.detach(), U.detach(),
                                        None if W0 is None else W0.detach(), lam)
    tol = {"rtol": 1e-12, "atol": 1e-11}
    torch.testing.assert_close(x.grad, dx.reshape(x.shape), **tol)
    torch.testing.assert_close(V.grad, dV, **tol)
    torch.testing.assert_close(d.grad, dd, **tol)
    torch.testing.assert_close(U.grad, dU, **tol)
    if bias:
        torch.testing.assert_close(b.grad, db, **tol)
    if dense:
        # The dense weight is meant to be frozen, but its gradient, when asked for, is lam * dy^T x.
        torch.testing.assert_close(W0.grad, lam * dy.reshape(-1, N).t() @ x2, **tol)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "nodense"])
@pytest.mark.parametrize("lead", [(1,), (4,), (2, 3)], ids=["M1", "M4", "B2T3"])
def test_gradcheck_fp64(lead, bias, dense):
    x, V, d, U, b, W0 = _leaves(make_inputs(lead, 7, 5, 3, bias=bias, dense=dense))
    inputs = tuple(t for t in (x, V, d, U, b, W0) if t is not None)

    def fn(*args):
        it = iter(args)
        x_, V_, d_, U_ = next(it), next(it), next(it), next(it)
        b_ = next(it) if bias else None
        W_ = next(it) if dense else None
        return lowrank_linear(x_, V_, d_, U_, b_, dense_weight=W_, dense_scale=0.7)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_fp64_only_some_inputs_require_grad():
    x, V, d, U, b, _ = make_inputs((3,), 6, 5, 4)
    d.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda d_, b_: lowrank_linear(x, V, d_, U, b_), (d, b), atol=1e-8)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x_: lowrank_linear(x_, V, d, U, b), (x,), atol=1e-8)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("lead", [(4,), (2, 3)], ids=["M4", "B2T3"])
def test_output_is_not_a_view(lead, grad):
    """Like F.linear, the output owns its tensor: FSDP2 warns about a module that returns a view (an in-place
    op on it would skip the backward hook), and an in-place op on the output must still backpropagate."""
    x, V, d, U, b, _ = make_inputs(lead, 6, 5, 4)
    if grad:
        V.requires_grad_()
    y = lowrank_linear(x, V, d, U, b)
    assert y._base is None and y.shape == (*lead, 5)
    if grad:
        y.mul_(2.0).sum().backward()
        torch.testing.assert_close(V.grad, 2.0 * (d[:, None] * (U.sum(0)[:, None] * x.reshape(-1, 6).sum(0))))


# ----------------------------------------------------------------------------- precision


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize(
    ("dtype", "d_dtype"),
    [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None),
     (torch.float16, torch.float32), (torch.bfloat16, torch.float32)],
    ids=["fp32", "fp16", "bf16", "fp16-d32", "bf16-d32"],
)
@pytest.mark.parametrize(("bias", "dense"), [(True, True), (False, False), (True, False), (False, True)],
                         ids=["bias-dense", "plain", "bias", "dense"])
@pytest.mark.parametrize(("lead", "K", "N", "r"), SHAPES, ids=SHAPE_IDS)
def test_low_precision_forward_error_within_2x_of_plain_pytorch(lead, K, N, r, bias, dense, dtype, d_dtype):
    lam = 0.3
    low = make_inputs(lead, K, N, r, dtype=dtype, bias=bias, dense=dense, d_dtype=d_dtype)
    # The fp64 truth is computed from the *rounded* inputs, so only arithmetic error is measured.
    exact = explicit_forward(*[t.double() if t is not None else None for t in low], lam)
    y = lowrank_linear(*low[:5], dense_weight=low[5], dense_scale=lam)
    assert y.dtype == dtype
    assert y.shape == (*lead, N)
    plain = explicit_forward(*low, lam)
    err, plain_err = _max_err(y, exact), _max_err(plain, exact)
    # No absolute epsilon is needed: rounding the [M, N] output of random data to fp32 or less is
    # never exact everywhere, so the plain error is strictly positive (checked, not assumed).
    assert plain_err > 0
    assert err <= 2 * plain_err, f"op error {err:.3g} > 2 x plain PyTorch error {plain_err:.3g}"


# ----------------------------------------------------------------------------- needs flags

NEEDS_CASES = {
    "d-only": ("d",),
    "x-only": ("x",),
    "factors": ("V", "U"),
    "bias-only": ("b",),
    "all": ("x", "V", "d", "U", "b"),
}


@pytest.mark.parametrize("case", list(NEEDS_CASES), ids=list(NEEDS_CASES))
def test_backward_computes_only_the_needed_gradients(case, monkeypatch):
    lrcomp.set_backend("torch")  # the reference is what this test spies on
    wanted = NEEDS_CASES[case]
    names = ("x", "V", "d", "U", "b")
    tensors = dict(zip(names, make_inputs((6,), 11, 9, 5, dense=False)[:5], strict=True))
    for name in wanted:
        tensors[name].requires_grad_()

    seen = []
    original = reference.lowrank_linear_backward

    def spy(*args):
        grads = original(*args)
        seen.append((args[-1], grads))
        return grads

    monkeypatch.setattr(reference, "lowrank_linear_backward", spy)
    y = lowrank_linear(*(tensors[n] for n in names))
    dy = torch.randn_like(y)
    y.backward(dy)

    assert len(seen) == 1
    needs, grads = seen[0]
    assert needs == tuple(n in wanted for n in names)
    # Gradients not asked for are never computed (None inside the reference) ...
    for name, g in zip(names, grads, strict=True):
        assert (g is None) == (name not in wanted), name
    # ... and the ones asked for are still right.
    expected = dict(zip(names, explicit_grads(dy, *(tensors[n].detach() for n in ("x", "V", "d", "U")),
                                              None, 0.0), strict=True))
    for name in names:
        if name in wanted:
            torch.testing.assert_close(tensors[name].grad, expected[name], rtol=1e-12, atol=1e-11)
        else:
            assert tensors[name].grad is None


def test_bwd_op_returns_empty_tensors_for_gradients_not_needed():
    x, V, d, U, b, W0 = make_inputs((4,), 10, 8, 3)
    y, t = FWD(x, V, d, U, b, W0, 0.5)
    torch.testing.assert_close(t, x @ V.t(), rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    dx, dV, dd, dU, db = BWD(dy, x, t, V, d, U, W0, 0.5, [False, False, True, False, False])
    for g in (dx, dV, dU, db):
        assert g.numel() == 0
    torch.testing.assert_close(dd, explicit_grads(dy, x, V, d, U, W0, 0.5)[2], rtol=1e-12, atol=1e-11)


def test_dd_in_fp32_for_fp16_inputs_with_fp32_d():
    """dd comes back in d's dtype (fp32) and is summed in fp32, not fp16."""
    x, V, d, U, b, _ = make_inputs((64,), 32, 16, 4, dtype=torch.float16, d_dtype=torch.float32)
    d.requires_grad_()
    y = lowrank_linear(x, V, d, U, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert d.grad.dtype == torch.float32
    t = (x @ V.t()).double()
    dd = (t * (dy @ U).double()).sum(0)
    # Products are fp16-rounded (t, dy @ U), but the 64-term sum is not: relative error ~ fp16 eps.
    torch.testing.assert_close(d.grad.double(), dd, rtol=2e-3, atol=1e-3)


# ----------------------------------------------------------------------------- opcheck

OPCHECK_CASES = [
    # (dtype, d dtype, bias, dense, lead)
    (torch.float64, None, True, True, (5,)),
    (torch.float64, None, False, False, (1,)),
    (torch.float32, None, True, False, (7,)),
    (torch.float32, None, False, True, (1,)),
    (torch.float32, None, True, True, (3,)),
    (torch.float16, torch.float32, True, True, (4,)),
    (torch.bfloat16, torch.float32, False, True, (4,)),
]
OPCHECK_IDS = [f"{str(c[0])[6:]}-d{str(c[1] or c[0])[6:]}-{'b' if c[2] else 'nob'}-{'W0' if c[3] else 'noW0'}"
               f"-M{c[4][0]}" for c in OPCHECK_CASES]


@pytest.mark.parametrize(("dtype", "d_dtype", "bias", "dense", "lead"), OPCHECK_CASES, ids=OPCHECK_IDS)
def test_opcheck_fwd(dtype, d_dtype, bias, dense, lead):
    x, V, d, U, b, W0 = make_inputs(lead, 13, 9, 5, dtype=dtype, bias=bias, dense=dense, d_dtype=d_dtype)
    for t in (x, V, d, U, b):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(FWD, (x, V, d, U, b, W0, 0.25))
    # Without any input requiring grad as well (the inference path).
    torch.library.opcheck(FWD, (x.detach(), V.detach(), d.detach(), U.detach(),
                                None if b is None else b.detach(), W0, 0.0))


@pytest.mark.parametrize(
    "needs",
    [[True] * 5, [False, False, True, False, False], [True, False, False, False, True],
     [False, True, False, True, False]],
    ids=["all", "d-only", "x-and-bias", "factors"],
)
@pytest.mark.parametrize(("dtype", "d_dtype", "bias", "dense", "lead"), OPCHECK_CASES, ids=OPCHECK_IDS)
def test_opcheck_bwd(dtype, d_dtype, bias, dense, lead, needs):
    x, V, d, U, b, W0 = make_inputs(lead, 13, 9, 5, dtype=dtype, bias=bias, dense=dense, d_dtype=d_dtype)
    y, t = FWD(x, V, d, U, b, W0, 0.25)
    dy = torch.randn_like(y)
    torch.library.opcheck(BWD, (dy, x, t, V, d, U, W0, 0.25, needs))


# ----------------------------------------------------------------------------- bad input


def _good():
    x, V, d, U, b, W0 = make_inputs((4,), 8, 6, 3, dtype=torch.float32)
    return {"x": x, "V": V, "d": d, "U": U, "bias": b, "dense_weight": W0}


def _call(**kw):
    a = _good()
    a.update(kw)
    return lowrank_linear(a["x"], a["V"], a["d"], a["U"], a["bias"], dense_weight=a["dense_weight"],
                          dense_scale=a.get("dense_scale", 0.5))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"x": [[1.0] * 8]}, TypeError, r"^x must be a torch\.Tensor"),
        ({"x": torch.ones(4, 8, dtype=torch.int64)}, TypeError, r"^x must be floating point"),
        ({"x": torch.tensor(1.0)}, ValueError, r"^x must have at least one dimension"),
        ({"x": torch.randn(4, 9)}, ValueError, r"^x has width 9 .* must be 8"),
        ({"V": None}, TypeError, r"^V must be a torch\.Tensor"),
        ({"V": torch.randn(3, 8, 1)}, ValueError, r"^V must be 2-D"),
        ({"d": torch.randn(3, 1)}, ValueError, r"^d must be 1-D"),
        ({"d": torch.randn(4)}, ValueError, r"^d must be \[r=3\]"),
        ({"d": torch.randn(3, dtype=torch.float64)}, ValueError, r"^d must have x's dtype"),
        ({"U": torch.randn(6, 4)}, ValueError, r"^U must be \[N, r=3\]"),
        ({"U": "U"}, TypeError, r"^U must be a torch\.Tensor"),
        ({"bias": torch.randn(7)}, ValueError, r"^bias must be \[N=6\]"),
        ({"dense_weight": torch.randn(6, 7)}, ValueError, r"^dense_weight must be \[N=6, K=8\]"),
        ({"V": torch.randn(3, 8, dtype=torch.float64)}, ValueError, r"^V has dtype torch\.float64 but x has"),
        ({"U": torch.randn(6, 3, dtype=torch.float16)}, ValueError, r"^U has dtype torch\.float16 but x has"),
        ({"bias": torch.randn(6, dtype=torch.bfloat16)}, ValueError, r"^bias has dtype"),
        ({"dense_weight": torch.randn(6, 8, dtype=torch.float64)}, ValueError, r"^dense_weight has dtype"),
        ({"dense_scale": torch.tensor(0.5)}, TypeError, r"^dense_scale must be a Python float"),
        ({"V": torch.randn(3, 8, device="meta")}, ValueError, r"^V is on meta but x is on cpu"),
        ({"x": torch.randn(4, 8, device="meta")}, ValueError, r"^V is on cpu but x is on meta"),
        ({"bias": torch.randn(6, device="meta")}, ValueError, r"^bias is on meta"),
    ],
)
def test_bad_input_raises_naming_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _call(**kwargs)


def test_good_input_of_the_bad_input_table_runs():
    """The table above starts from a valid call: make sure it really is valid."""
    a = _good()
    y = _call(**a)
    torch.testing.assert_close(y, explicit_forward(a["x"], a["V"], a["d"], a["U"], a["bias"],
                                                   a["dense_weight"], 0.5))
