"""Mask functions g of ``d = S * g(scores)``: values, gradients, and their effect in the layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrcomp import LowRankLinear
from lrcomp.layers.masks import MASK_FNS, apply_mask_fn, validate_mask_fn

SCORES = [1.5, -0.5, 0.0, 0.25, -3.0, 2.0, 1e-3, -1e-3]


def _scores(dtype=torch.float64):
    return torch.tensor(SCORES, dtype=dtype, requires_grad=True)


def test_mask_fns_listed():
    assert MASK_FNS == ("none", "hard", "ste", "sigmoid")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_fn", MASK_FNS)
def test_mask_keeps_shape_and_dtype(mask_fn, dtype):
    s = torch.randn(5, 3).to(dtype)
    g = apply_mask_fn(s, mask_fn, 0.7)
    assert g.shape == s.shape and g.dtype == dtype


def test_none_is_one_and_ignores_scores():
    s = _scores()
    g = apply_mask_fn(s, "none")
    assert torch.equal(g, torch.ones(len(SCORES), dtype=torch.float64))
    assert not g.requires_grad


def test_hard_forward_and_no_gradient():
    s = _scores()
    g = apply_mask_fn(s, "hard")
    expected = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0], dtype=torch.float64)  # strictly > 0: 0 is off
    assert torch.equal(g, expected)
    assert not g.requires_grad  # no gradient ever reaches the scores


def test_ste_forward_is_hard_and_gradient_is_relu():
    s = _scores()
    g = apply_mask_fn(s, "ste")
    assert torch.equal(g.detach(), apply_mask_fn(s.detach(), "hard"))
    upstream = torch.randn(len(SCORES), dtype=torch.float64)
    (grad,) = torch.autograd.grad(g, s, upstream)
    # d relu(s) / ds = 1[s > 0] (PyTorch's relu gradient at exactly 0 is 0).
    torch.testing.assert_close(grad, upstream * (s.detach() > 0).double(), rtol=0, atol=0)
    (relu_grad,) = torch.autograd.grad(torch.relu(s), s, upstream)
    torch.testing.assert_close(grad, relu_grad, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 3.0])
def test_sigmoid_with_temperature_values_and_gradient(temperature):
    s = _scores()
    g = apply_mask_fn(s, "sigmoid", temperature)
    sig = 1.0 / (1.0 + torch.exp(-s.detach() / temperature))
    torch.testing.assert_close(g.detach(), sig, rtol=1e-14, atol=1e-15)
    upstream = torch.randn(len(SCORES), dtype=torch.float64)
    (grad,) = torch.autograd.grad(g, s, upstream)
    torch.testing.assert_close(grad, upstream * sig * (1 - sig) / temperature, rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(lambda x: apply_mask_fn(x, "sigmoid", temperature), (s,))


def test_sigmoid_temperature_sharpens_toward_hard():
    s = _scores().detach()
    cold = apply_mask_fn(s, "sigmoid", 1e-4)
    nonzero = s != 0
    torch.testing.assert_close(cold[nonzero], apply_mask_fn(s, "hard")[nonzero], rtol=0, atol=1e-4)
    assert torch.all(cold[~nonzero] == 0.5)


@pytest.mark.parametrize("mask_fn", ["relu", "", None, "STE"])
def test_bad_mask_fn(mask_fn):
    with pytest.raises(ValueError, match=r"^mask_fn must be one of"):
        validate_mask_fn(mask_fn, 1.0)
    with pytest.raises(ValueError, match=r"^mask_fn must be one of"):
        apply_mask_fn(torch.ones(3), mask_fn)


@pytest.mark.parametrize("temperature", [0, -0.5, float("nan"), None, "2"])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match=r"^temperature must be a positive number"):
        validate_mask_fn("sigmoid", temperature)


# ----------------------------------------------------------------------------- in the layer


def _layer(mask_fn, temperature=1.0):
    layer = LowRankLinear.from_linear(nn.Linear(20, 14, dtype=torch.float64), len(SCORES), mask_fn=mask_fn,
                                      temperature=temperature)
    with torch.no_grad():
        layer.scores.copy_(torch.tensor(SCORES, dtype=torch.float64))
    return layer


def _dd(layer, x, dy):
    """dL/dd for the layer's op: sum_rows(t * (dy @ U)), t = x V^T."""
    t = x @ layer.V.detach().t()
    return (t * (dy @ layer.U.detach())).sum(0)


@pytest.mark.parametrize(("mask_fn", "temperature"), [("none", 1.0), ("hard", 1.0), ("ste", 1.0),
                                                     ("sigmoid", 0.5), ("sigmoid", 2.0)])
def test_layer_d_and_score_gradients(mask_fn, temperature):
    layer = _layer(mask_fn, temperature)
    s = layer.scores.detach()
    S = layer.S.detach()
    g = {
        "none": torch.ones_like(s),
        "hard": (s > 0).double(),
        "ste": (s > 0).double(),
        "sigmoid": torch.sigmoid(s / temperature),
    }[mask_fn]
    torch.testing.assert_close(layer.d.detach(), S * g, rtol=1e-14, atol=0)
    assert layer.active_rank == int((S * g != 0).sum())

    x = torch.randn(6, 20, dtype=torch.float64)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    dd = _dd(layer, x, dy)
    torch.testing.assert_close(layer.S.grad, dd * g, rtol=1e-12, atol=1e-12)
    if mask_fn in ("none", "hard"):
        assert layer.scores.grad is None
    elif mask_fn == "ste":
        torch.testing.assert_close(layer.scores.grad, dd * S * (s > 0).double(), rtol=1e-12, atol=1e-12)
    else:
        sig = torch.sigmoid(s / temperature)
        torch.testing.assert_close(layer.scores.grad, dd * S * sig * (1 - sig) / temperature,
                                   rtol=1e-12, atol=1e-12)


def test_pruned_directions_are_masked_for_every_mask_fn():
    for mask_fn in MASK_FNS:
        layer = _layer(mask_fn)
        keep = torch.tensor([True, True, False, True, False, True, False, True])
        layer.prune_(keep)
        assert torch.all(layer.mask().detach()[~keep] == 0)
        assert torch.all(layer.d.detach()[~keep] == 0)
