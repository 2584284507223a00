"""``LowRankLinear``: SVD construction, pruning, compaction, densification, branches, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lrcomp import LowRankLinear


def make_linear(K=123, N=431, *, bias=True, dtype=torch.float32):
    return nn.Linear(K, N, bias=bias, dtype=dtype)


def explicit_output(layer: LowRankLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's formula written out in fp64 from its parameters (LoRA and dense branch included)."""
    x = x.double()
    y = ((x @ layer.V.double().t()) * layer.d.double()) @ layer.U.double().t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    if layer.lora_A is not None:
        y = y + layer.lora_scale * (x @ layer.lora_A.double().t()) @ layer.lora_B.double().t()
    if layer.dense_weight is not None:
        y = y + layer.dense_scale * x @ layer.dense_weight.double().t()
    return y


# ----------------------------------------------------------------------------- from_linear


@pytest.mark.parametrize(("K", "N"), [(123, 431), (64, 40), (1, 5)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_full_rank_from_linear_reproduces_the_linear_fp32(K, N, bias):
    linear = make_linear(K, N, bias=bias)
    layer = LowRankLinear.from_linear(linear)
    assert layer.rank == layer.active_rank == min(K, N)
    assert (layer.in_features, layer.out_features) == (K, N)
    x = torch.randn(2, 7, K)
    with torch.no_grad():
        # Default fp32 tolerances of assert_close (rtol 1.3e-6, atol 1e-5): fp32 round-off.
        torch.testing.assert_close(layer(x), linear(x))
        torch.testing.assert_close(layer.to_linear().weight, linear.weight)


def test_full_rank_from_linear_reproduces_the_linear_fp64():
    linear = make_linear(dtype=torch.float64)
    layer = LowRankLinear.from_linear(linear)
    assert layer.V.dtype == layer.U.dtype == layer.S.dtype == torch.float64
    x = torch.randn(5, 123, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("rank", [1, 7, 60, 122])
def test_truncated_svd_is_the_eckart_young_optimum(rank, dtype, rtol):
    linear = make_linear(dtype=dtype)
    W = linear.weight.detach().double()
    s = torch.linalg.svdvals(W)
    layer = LowRankLinear.from_linear(linear, rank)
    assert layer.rank == rank
    torch.testing.assert_close(layer.S.detach().double(), s[:rank], rtol=rtol, atol=0)
    W_r = (layer.U.detach().double() * layer.S.detach().double()) @ layer.V.detach().double()
    residual = ((W - W_r) ** 2).sum()
    optimum = (s[rank:] ** 2).sum()
    assert torch.isclose(residual, optimum, rtol=rtol, atol=0), (residual.item(), optimum.item())
    # The factors are orthonormal, as singular vectors must be.
    eye = torch.eye(rank, dtype=torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(layer.U.detach().double().t() @ layer.U.detach().double(), eye, rtol=0, atol=tol)
    torch.testing.assert_close(layer.V.detach().double() @ layer.V.detach().double().t(), eye, rtol=0, atol=tol)


def test_from_linear_copies_bias_and_flags():
    linear = make_linear(20, 30)
    layer = LowRankLinear.from_linear(linear, 5, mask_fn="sigmoid", temperature=0.5, keep_dense=True)
    torch.testing.assert_close(layer.bias, linear.bias, rtol=0, atol=0)
    assert layer.mask_fn == "sigmoid" and layer.temperature == 0.5
    torch.testing.assert_close(layer.dense_weight, linear.weight.detach(), rtol=0, atol=0)
    assert layer.dense_scale == 0.0
    # The dense copy is a buffer (frozen), not a parameter, and independent of the source.
    assert "dense_weight" in dict(layer.named_buffers())
    assert "dense_weight" not in dict(layer.named_parameters())
    with torch.no_grad():
        linear.weight.zero_()
    assert layer.dense_weight.abs().sum() > 0


# ----------------------------------------------------------------------------- prune_ / compact


def _layer_with_distinct_d(rank=12, K=40, N=30, mask_fn="sigmoid", dtype=torch.float64):
    """A layer whose |d| order differs from its S order (scores reorder it)."""
    layer = LowRankLinear.from_linear(make_linear(K, N, dtype=dtype), rank, mask_fn=mask_fn)
    with torch.no_grad():
        layer.scores.copy_(torch.randn(rank, dtype=dtype) * 3)
    return layer


@pytest.mark.parametrize("k", [0, 1, 5, 12])
def test_prune_int_keeps_the_top_k_by_abs_d(k):
    layer = _layer_with_distinct_d()
    d = layer.d.detach().abs()
    assert not torch.equal(torch.argsort(d, descending=True), torch.arange(12)), "scores must reorder |d|"
    out = layer.prune_(k)
    assert out is layer
    expected = torch.zeros(12, dtype=torch.bool)
    expected[torch.topk(d, k).indices] = True
    assert torch.equal(layer.active, expected)
    assert layer.active_rank == k


def test_prune_int_twice_keeps_the_top_among_the_still_active():
    layer = _layer_with_distinct_d()
    d = layer.d.detach().abs()
    layer.prune_(6)
    first = layer.active.clone()
    layer.prune_(8)  # more than are active: nothing comes back
    assert torch.equal(layer.active, first)
    layer.prune_(3)
    expected = torch.zeros(12, dtype=torch.bool)
    expected[torch.topk(d, 3).indices] = True
    assert torch.equal(layer.active, expected)


def test_prune_bool_mask_and_pruned_directions_have_zero_d():
    layer = _layer_with_distinct_d()
    keep = torch.tensor([True, False] * 6)
    layer.prune_(keep)
    assert torch.equal(layer.active, keep)
    assert torch.all(layer.d.detach()[~keep] == 0)
    assert torch.all(layer.d.detach()[keep] != 0)
    layer.prune_(torch.tensor([True] * 4 + [False] * 8))  # masks accumulate (logical and)
    assert torch.equal(layer.active, torch.tensor([True, False, True, False] + [False] * 8))


def _compact_cases():
    def pruned_int(layer):
        return layer.prune_(5)

    def pruned_mask(layer):
        return layer.prune_(torch.arange(layer.rank) % 3 != 0)

    def scores_le_zero(layer):
        with torch.no_grad():
            layer.scores.copy_(torch.tensor([1.0, -1.0, 0.0, 2.0, -0.5, 0.3, 0.0, 4.0, -2.0, 1.5, 0.1, -3.0]))
        return layer

    return [("int", "sigmoid", pruned_int), ("mask", "none", pruned_mask), ("hard", "hard", scores_le_zero),
            ("ste", "ste", scores_le_zero), ("ste+int", "ste", lambda m: scores_le_zero(m).prune_(3))]


@pytest.mark.parametrize(("mask_fn", "setup"), [c[1:] for c in _compact_cases()], ids=[c[0] for c in _compact_cases()])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_compact_keeps_the_output_and_drops_pruned_directions(mask_fn, setup, dtype):
    layer = setup(_layer_with_distinct_d(mask_fn=mask_fn, dtype=dtype))
    active = layer.active_rank
    assert 0 < active < layer.rank, "the case must actually prune something"
    compact = layer.compact()
    assert compact is not layer
    assert compact.rank == active == compact.active_rank
    assert compact.mask_fn == mask_fn and compact.temperature == layer.temperature
    assert torch.all(compact.active)
    # The kept directions are the nonzero ones, in their original order.
    kept = layer.d.detach() != 0
    torch.testing.assert_close(compact.d.detach(), layer.d.detach()[kept], rtol=0, atol=0)
    x = torch.randn(3, 4, 40, dtype=dtype)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    with torch.no_grad():
        torch.testing.assert_close(compact(x), layer(x), **tol)
    assert compact.num_parameters() == layer.num_parameters()
    assert compact.num_parameters(compact=False) < layer.num_parameters(compact=False)


def test_compact_keeps_lora_dense_training_mode_and_requires_grad():
    layer = _layer_with_distinct_d(dtype=torch.float64)
    layer.add_lora(3, alpha=6.0)
    layer.attach_dense(torch.randn(30, 40, dtype=torch.float64), scale=0.3)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.V.requires_grad_(False)
    layer.U.requires_grad_(False)
    layer.eval().prune_(4)
    compact = layer.compact()
    assert compact.rank == 4 and not compact.training
    assert not compact.V.requires_grad and not compact.U.requires_grad and compact.S.requires_grad
    assert compact.lora_scale == layer.lora_scale == 2.0
    assert compact.dense_scale == 0.3
    x = torch.randn(6, 40, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), layer(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(compact(x), explicit_output(layer, x), rtol=1e-12, atol=1e-12)


def test_compact_of_a_fully_pruned_layer_raises():
    layer = _layer_with_distinct_d().prune_(0)
    with pytest.raises(ValueError, match="every direction of this layer is pruned"):
        layer.compact()


# ----------------------------------------------------------------------------- to_linear


@pytest.mark.parametrize("branch", ["plain", "pruned", "lora", "dense", "lora+dense+pruned"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_to_linear_keeps_the_output(branch, dtype):
    layer = LowRankLinear.from_linear(make_linear(50, 70, dtype=dtype), 9, mask_fn="sigmoid")
    with torch.no_grad():
        layer.scores.normal_()
    if "pruned" in branch:
        layer.prune_(5)
    if "lora" in branch:
        layer.add_lora(4, alpha=2.0)
        with torch.no_grad():
            layer.lora_B.normal_()
        assert layer.lora_B.abs().sum() > 0
    if "dense" in branch:
        layer.attach_dense(torch.randn(70, 50, dtype=dtype) / 7, scale=0.3)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear
    assert linear.weight.dtype == dtype and linear.weight.shape == (70, 50)
    x = torch.randn(2, 3, 50, dtype=dtype)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    with torch.no_grad():
        torch.testing.assert_close(linear(x), layer(x), **tol)
        torch.testing.assert_close(linear(x), explicit_output(layer, x).to(dtype), **tol)


# ----------------------------------------------------------------------------- counts, repr


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_num_parameters_both_modes(bias):
    K, N, r, q = 40, 30, 12, 3
    layer = LowRankLinear.from_linear(make_linear(K, N, bias=bias), r, keep_dense=True)
    b = N if bias else 0
    assert layer.num_parameters() == r * (K + N) + b
    # Not compact: U, S, V, scores, bias and the dense copy, whatever its scale.
    assert layer.num_parameters(compact=False) == N * r + r + r * K + r + b + N * K
    layer.prune_(5)
    assert layer.num_parameters() == 5 * (K + N) + b
    assert layer.num_parameters(compact=False) == N * r + r + r * K + r + b + N * K
    layer.add_lora(q)
    assert layer.num_parameters() == 5 * (K + N) + b + q * (K + N)
    layer.dense_scale = 0.5
    assert layer.num_parameters() == 5 * (K + N) + b + q * (K + N) + N * K
    assert layer.num_parameters(compact=False) == N * r + 2 * r + r * K + b + N * K + q * (K + N)
    layer.drop_dense()
    assert layer.num_parameters(compact=False) == N * r + 2 * r + r * K + b + q * (K + N)
    assert layer.num_parameters(compact=False) == sum(p.numel() for p in layer.parameters())


def test_extra_repr_shows_shape_rank_and_active_rank():
    layer = LowRankLinear.from_linear(make_linear(123, 431), 7, mask_fn="ste").prune_(5)
    text = repr(layer)
    for part in ("in_features=123", "out_features=431", "rank=7", "active_rank=5", "bias=True",
                 "mask_fn='ste'"):
        assert part in text, (part, text)
    layer.add_lora(2)
    layer.attach_dense(torch.zeros(431, 123), scale=0.25)
    assert "lora_rank=2" in repr(layer) and "dense_scale=0.25" in repr(layer)


# ----------------------------------------------------------------------------- forward


@pytest.fixture(scope="module")
def layer_123_431():
    torch.manual_seed(1)
    return LowRankLinear.from_linear(make_linear(123, 431), 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("lead", [(), (1,), (5,), (2, 3), (2, 1, 3)], ids=["1D", "M1", "M5", "BT", "BxT"])
def test_forward_dtype_and_leading_dims(dtype, lead, layer_123_431):
    layer = copy.deepcopy(layer_123_431).to(dtype)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(*lead, 123).to(dtype)
    with torch.no_grad():
        y = layer(x)
        assert y.shape == (*lead, 431) and y.dtype == dtype
        exact = explicit_output(layer, x)
        # The same formula in plain PyTorch at the same dtype: the op may not be worse than twice it.
        plain = ((x @ layer.V.t()) * layer.d) @ layer.U.t() + layer.bias
    err = (y.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    assert plain_err > 0  # 431 rounded outputs are never all exact, so no absolute epsilon is needed
    assert err <= 2 * plain_err, (err, plain_err)


def test_lora_branch_equals_explicit_formula_and_gradients():
    K, N, r, q, alpha = 24, 18, 5, 3, 7.5
    layer = LowRankLinear.from_linear(make_linear(K, N, dtype=torch.float64), r, mask_fn="sigmoid")
    x = torch.randn(4, 2, K, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
    layer.add_lora(q, alpha=alpha)
    assert layer.lora_A.shape == (q, K) and layer.lora_B.shape == (N, q)
    assert layer.lora_scale == alpha / q
    with torch.no_grad():
        # B starts at zero (only the GEMM's summation order changes)
        torch.testing.assert_close(layer(x), before, rtol=1e-13, atol=1e-13)
        layer.lora_B.normal_()
        layer.scores.normal_()

    y = layer(x)
    base = ((x @ layer.V.t()) * (layer.S * torch.sigmoid(layer.scores))) @ layer.U.t() + layer.bias
    explicit = base + (x @ layer.lora_A.t()) @ layer.lora_B.t() * (alpha / q)
    torch.testing.assert_close(y, explicit, rtol=1e-12, atol=1e-12)

    dy = torch.randn_like(y)
    params = [layer.U, layer.S, layer.V, layer.scores, layer.bias, layer.lora_A, layer.lora_B]
    got = torch.autograd.grad(y, params, dy)
    want = torch.autograd.grad(explicit, params, dy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_dense_branch_equals_explicit_formula():
    K, N = 24, 18
    linear = make_linear(K, N, dtype=torch.float64)
    layer = LowRankLinear.from_linear(linear, 4, keep_dense=True)
    x = torch.randn(5, K, dtype=torch.float64)
    low = ((x @ layer.V.t()) * layer.S) @ layer.U.t() + layer.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), low, rtol=1e-12, atol=1e-12)  # scale starts at 0
    for scale in (0.3, 1.0):
        layer.dense_scale = scale
        y = layer(x)
        torch.testing.assert_close(y, low + scale * x @ linear.weight.t(), rtol=1e-12, atol=1e-12)
    y.sum().backward()
    assert layer.V.grad is not None and layer.dense_weight.grad is None  # the dense branch is frozen
    layer.drop_dense()
    assert layer.dense_weight is None and layer.dense_scale == 0.0
    with torch.no_grad():
        torch.testing.assert_close(layer(x), low, rtol=1e-12, atol=1e-12)


def test_layer_backward_matches_autograd_of_the_formula():
    layer = LowRankLinear.from_linear(make_linear(31, 17, dtype=torch.float64), 6, mask_fn="ste",
                                      keep_dense=True)
    layer.dense_scale = 0.4
    with torch.no_grad():
        layer.scores.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -0.1], dtype=torch.float64))
    x = torch.randn(3, 2, 31, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.relu(layer.scores)
    g = g + ((layer.scores > 0).double() - g).detach()
    explicit = (((x @ layer.V.t()) * (layer.S * g)) @ layer.U.t() + layer.bias
                + 0.4 * x @ layer.dense_weight.t())
    dy = torch.randn_like(y)
    params = [x, layer.U, layer.S, layer.V, layer.scores, layer.bias]
    for got, want in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(explicit, params, dy),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- bad input


def test_forward_wrong_input_width():
    layer = LowRankLinear(16, 8, 4)
    with pytest.raises(ValueError, match=r"x has width 15 .* last dim of x must be 16"):
        layer(torch.randn(3, 15))


def test_forward_dtype_mismatch_names_x():
    layer = LowRankLinear(16, 8, 4)
    with pytest.raises(ValueError, match=r"has dtype torch\.float32 but x has torch\.float16"):
        layer(torch.randn(3, 16, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"^x must be floating point"):
        layer(torch.ones(3, 16, dtype=torch.int32))


def test_forward_device_mismatch_names_x():
    layer = LowRankLinear(16, 8, 4)
    with pytest.raises(ValueError, match=r"is on cpu but x is on meta"):
        layer(torch.randn(3, 16, device="meta"))
    meta_layer = LowRankLinear(16, 8, 4, device="meta")
    with pytest.raises(ValueError, match=r"is on meta but x is on cpu"):
        meta_layer(torch.randn(3, 16))


@pytest.mark.parametrize("rank", [0, -1, 9, 17])
def test_rank_out_of_range(rank):
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(in_features, out_features\)\] = \[1, 8\]"):
        LowRankLinear(16, 8, rank)
    with pytest.raises(ValueError, match=r"rank must be in \[1, .*\] = \[1, 8\]"):
        LowRankLinear.from_linear(nn.Linear(16, 8), rank)


@pytest.mark.parametrize("rank", [2.0, True, "4"])
def test_rank_wrong_type(rank):
    with pytest.raises(TypeError, match="rank must be an int"):
        LowRankLinear(16, 8, rank)
    with pytest.raises(TypeError, match="rank must be an int"):
        LowRankLinear.from_linear(nn.Linear(16, 8), rank)


@pytest.mark.parametrize(("name", "args"), [("in_features", (0, 8, 1)), ("out_features", (8, -2, 1)),
                                            ("in_features", (8.0, 8, 1))])
def test_bad_features(name, args):
    with pytest.raises(ValueError, match=f"^{name} must be a positive int"):
        LowRankLinear(*args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_from_linear_rejects_non_finite_weights(bad):
    linear = nn.Linear(8, 6)
    with torch.no_grad():
        linear.weight[2, 3] = bad
    with pytest.raises(ValueError, match=r"^linear\.weight has non-finite values"):
        LowRankLinear.from_linear(linear)
    linear = nn.Linear(8, 6)
    with torch.no_grad():
        linear.bias[1] = bad
    with pytest.raises(ValueError, match=r"^linear\.bias has non-finite values"):
        LowRankLinear.from_linear(linear)


def test_from_linear_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"^linear must be an nn\.Linear, got Conv1d"):
        LowRankLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match=r"^init must be 'svd'"):
        LowRankLinear.from_linear(nn.Linear(4, 4), init="random")


@pytest.mark.parametrize("mask_fn", ["relu", "Hard", None, 1])
def test_bad_mask_fn(mask_fn):
    with pytest.raises(ValueError, match=r"^mask_fn must be one of \('none', 'hard', 'ste', 'sigmoid'\)"):
        LowRankLinear(8, 8, 2, mask_fn=mask_fn)
    with pytest.raises(ValueError, match=r"^mask_fn must be one of"):
        LowRankLinear.from_linear(nn.Linear(8, 8), mask_fn=mask_fn)


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), "1"])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match=r"^temperature must be a positive number"):
        LowRankLinear(8, 8, 2, mask_fn="sigmoid", temperature=temperature)


@pytest.mark.parametrize(
    "keep",
    [-1, 5, True, 2.0, torch.ones(4), torch.ones(3, dtype=torch.bool), torch.ones(4, 1, dtype=torch.bool)],
    ids=["negative", "above-rank", "bool", "float", "float-mask", "short-mask", "2D-mask"],
)
def test_bad_keep_in_prune(keep):
    layer = LowRankLinear(8, 8, 4)
    with pytest.raises(ValueError, match=r"^keep must be"):
        layer.prune_(keep)
    assert torch.all(layer.active)  # nothing changed


def test_bad_branch_arguments():
    layer = LowRankLinear(8, 6, 3)
    with pytest.raises(ValueError, match=r"^dense_scale is nonzero but no dense weight is attached"):
        layer.dense_scale = 0.5
    with pytest.raises(ValueError, match=r"^weight must be \[6, 8\], got \(8, 6\)"):
        layer.attach_dense(torch.zeros(8, 6))
    layer.attach_dense(torch.zeros(6, 8), scale=0.0)
    with pytest.raises(ValueError, match=r"^dense_scale must be a finite float"):
        layer.dense_scale = float("nan")
    with pytest.raises(ValueError, match=r"^rank must be a positive int"):
        layer.add_lora(0)
    layer.add_lora(2)
    with pytest.raises(ValueError, match="already has a LoRA branch"):
        layer.add_lora(2)
