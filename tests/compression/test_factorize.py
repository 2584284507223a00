"""Tests of lrcomp.compression.factorizations: every method against its closed form or definition (fp64)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lrcomp.compression import factorizations as fz
from lrcomp.compression.factorizations import FACTORIZATIONS, REQUIRED_STATS, factorize, jactus_union_bases
from lrcomp.layers import LowRankLinear
from lrcomp.linalg import whiten

F64 = torch.float64


# ---------------------------------------------------------------------------- fixtures / helpers
def _linear(K: int, N: int, dtype=torch.float32, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(K, N, bias=bias, dtype=dtype)
    with torch.no_grad():  # a spread spectrum, so every rank is a distinct, well-separated problem
        W = torch.randn(N, K, dtype=F64) @ torch.diag(torch.logspace(0, -1, K, dtype=F64))
        lin.weight.copy_(W)
    return lin


def _anisotropic_acts(T: int, K: int, decay: float = 3.0, seed: int = 1) -> torch.Tensor:
    """Correlated activations: a random rotation of channels with RMS spanning 10^decay."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(K, K, generator=g, dtype=F64))
    scales = torch.logspace(0, -decay, K, dtype=F64)
    mix = Q @ torch.diag(scales) @ torch.linalg.qr(torch.randn(K, K, generator=g, dtype=F64))[0]
    return torch.randn(T, K, generator=g, dtype=F64) @ mix + 0.3 * torch.randn(K, generator=g, dtype=F64)


def _stats_from(X: torch.Tensor, N: int, seed: int = 2) -> dict[str, torch.Tensor]:
    """All four statistics, spec format, from activations X [T, K] (gradients made up, seeded)."""
    g = torch.Generator().manual_seed(seed)
    T, K = X.shape
    G = torch.randn(T, N, generator=g, dtype=F64) @ torch.diag(torch.logspace(0, -2, N, dtype=F64))
    return {
        "input_cov": X.T @ X / T,
        "grad_cov": G.T @ G / T,
        "input_abs_mean": X.abs().mean(0),
        "fisher": (G.T @ X).square().sum(0) / T**2,
    }


def _product(layer: LowRankLinear) -> torch.Tensor:
    return (layer.U.detach().double() * layer.S.detach().double()) @ layer.V.detach().double()


def _out_err(X: torch.Tensor, W: torch.Tensor, Wr: torch.Tensor) -> float:
    return float((X @ (W - Wr).T).square().sum())


def _trunc(A: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(A, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.fixture
def fresh_shift_warning(monkeypatch):
    monkeypatch.setattr(whiten, "_SHIFT_WARNED", False)


# ---------------------------------------------------------------------------- common contract
def test_registry_is_consistent():
    assert set(REQUIRED_STATS) == set(FACTORIZATIONS) == set(fz.OPTIONAL_STATS) == set(fz.METHOD_OPTIONS)
    assert FACTORIZATIONS == ("svd", "asvd", "svd_llm", "fwsvd", "sparsity_aware", "jactus_union")


@pytest.mark.parametrize("method", FACTORIZATIONS)
@pytest.mark.parametrize("shape", [(23, 17), (17, 31)])
def test_full_rank_reproduces_weight_for_every_method(method, shape):
    K, N = shape
    lin = _linear(K, N)
    X = _anisotropic_acts(300, K, decay=2.0)
    layer = factorize(lin, None, method=method, stats=_stats_from(X, N))
    W = lin.weight.detach().double()
    assert isinstance(layer, LowRankLinear) and layer.rank == min(K, N)
    assert layer.U.dtype == layer.S.dtype == layer.V.dtype == torch.float32
    # fp32 round-off of the factors (eps32 = 6e-8), amplified at most by the weighting's conditioning
    rel = float((_product(layer) - W).norm() / W.norm())
    assert rel < 2e-6, rel
    x = torch.randn(5, K)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias, lin.bias)
    imp = layer.importance
    assert imp.dtype == torch.float32 and imp.shape == (layer.rank,)
    assert bool((imp >= 0).all()) and bool((imp[:-1] >= imp[1:]).all())
    S = layer.S.detach()
    assert bool((S >= 0).all()) and bool((S[:-1] >= S[1:]).all())  # prune_ by |d| follows importance


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_output_dtype_follows_linear_and_no_bias(dtype):
    lin = _linear(12, 9, dtype=dtype, bias=False)
    X = _anisotropic_acts(100, 12)
    layer = factorize(lin, 4, method="svd_llm", stats={"input_cov": X.T @ X / 100})
    assert layer.U.dtype == layer.V.dtype == layer.S.dtype == dtype
    assert layer.bias is None and layer.importance.dtype == torch.float32
    full = factorize(lin, method="svd_llm", stats={"input_cov": X.T @ X / 100})
    tol = 1e-12 if dtype == torch.float64 else 3e-2
    W = lin.weight.detach().double()
    assert float((_product(full) - W).norm() / W.norm()) < tol


def test_layer_options_pass_through():
    layer = factorize(_linear(10, 8), 3, mask_fn="sigmoid", temperature=0.5)
    assert layer.mask_fn == "sigmoid" and layer.temperature == 0.5


# ---------------------------------------------------------------------------- svd
def test_svd_is_eckart_young_with_energy_importance():
    lin = _linear(19, 13, dtype=F64)
    W = lin.weight.detach()
    s = torch.linalg.svdvals(W)
    for r in (1, 5, 13):
        layer = factorize(lin, r)
        err = float((W - _product(layer)).square().sum())
        assert err == pytest.approx(float(s[r:].square().sum()), rel=1e-9, abs=1e-20)
        torch.testing.assert_close(layer.importance, s[:r].square().float())
        torch.testing.assert_close(_product(layer), _product(LowRankLinear.from_linear(lin, r)), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- svd_llm
def test_svd_llm_equals_closed_form_minimiser_at_every_rank():
    K, N, T = 16, 11, 200
    lin = _linear(K, N, dtype=F64)
    W = lin.weight.detach()
    X = _anisotropic_acts(T, K)
    C = X.T @ X / T
    _, R = torch.linalg.qr(X)  # X = Q R, R invertible (T > K, full column rank)
    sig = torch.linalg.svdvals(R @ W.T)
    prev = _out_err(X, W, torch.zeros_like(W))
    for r in range(1, min(K, N) + 1):
        layer = factorize(lin, r, method="svd_llm", stats={"input_cov": C})
        Wr = _product(layer)
        closed = torch.linalg.solve_triangular(R, _trunc(R @ W.T, r), upper=True).T  # R^{-1} [R W^T]_r
        assert float((Wr - closed).norm() / closed.norm()) < 1e-9, r
        err = _out_err(X, W, Wr)
        best = float(sig[r:].square().sum())
        assert err == pytest.approx(best, rel=1e-9, abs=1e-18 * prev)
        # importance = exact reduction of the per-token output error E||x W^T - x W_r^T||^2
        assert (prev - err) / T == pytest.approx(float(layer.importance[-1]), rel=1e-6)
        prev = err


def test_svd_llm_beats_svd_on_anisotropic_inputs():
    K, N, T = 32, 24, 500
    lin = _linear(K, N, dtype=F64)
    W = lin.weight.detach()
    X = _anisotropic_acts(T, K, decay=3.0)
    C = X.T @ X / T
    for r in (2, 6, 12, 20):
        e_llm = _out_err(X, W, _product(factorize(lin, r, method="svd_llm", stats={"input_cov": C})))
        e_svd = _out_err(X, W, _product(factorize(lin, r, method="svd")))
        assert e_llm < 0.7 * e_svd, (r, e_llm, e_svd)


@pytest.mark.parametrize("case", ["few_tokens", "duplicated_column", "dead_channel"])
def test_svd_llm_shifts_non_pd_covariance_and_stays_near_optimal(case, fresh_shift_warning):
    K, N = 20, 14
    lin = _linear(K, N, dtype=F64)
    W = lin.weight.detach()
    g = torch.Generator().manual_seed(5)
    if case == "few_tokens":
        X = torch.randn(12, K, generator=g, dtype=F64)  # rank 12 < K
    else:
        X = _anisotropic_acts(300, K, decay=1.0)
        if case == "duplicated_column":
            X[:, 7] = X[:, 3]
        else:
            X[:, 5] = 0.0
    T = X.shape[0]
    C = X.T @ X / T
    sig = torch.linalg.svdvals(X @ W.T)  # min over rank-r W_r of ||X (W - W_r)^T||^2 = sum_{i>r} sig_i^2
    scale = float(sig.square().sum())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for r in (1, 4, 9, 12, 14):
            layer = factorize(lin, r, method="svd_llm", stats={"input_cov": C})
            Wr = _product(layer)
            assert bool(torch.isfinite(Wr).all()) and float(Wr.abs().max()) < 10 * float(W.abs().max())
            best = float(sig[r:].square().sum())
            assert _out_err(X, W, Wr) <= (1 + 1e-6) * best + 1e-12 * scale, r
    shifts = [w for w in caught if issubclass(w.category, RuntimeWarning) and "shift" in str(w.message)]
    assert len(shifts) == 1, [str(w.message) for w in caught]  # once per process, not once per call
    assert "input_cov" in str(shifts[0].message)


def test_shift_warning_only_when_not_positive_definite(fresh_shift_warning):
    X = _anisotropic_acts(200, 10, decay=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a PD covariance must not warn
        L, delta = whiten.shifted_cholesky(X.T @ X / 200)
    assert delta == 0.0
    torch.testing.assert_close(L @ L.T, X.T @ X / 200)
    indefinite = torch.diag(torch.tensor([1.0, 0.5, -0.2], dtype=F64))
    with pytest.warns(RuntimeWarning, match="shift"):
        L, delta = whiten.shifted_cholesky(indefinite, eps=1e-8)
    assert delta == pytest.approx(0.2 + 1e-8 * 1.3 / 3, rel=1e-12)
    torch.testing.assert_close(L @ L.T, indefinite + delta * torch.eye(3, dtype=F64))
    L, delta = whiten.shifted_cholesky(torch.zeros(4, 4, dtype=F64))  # already warned: silent, identity
    assert delta == 1.0


# ---------------------------------------------------------------------------- asvd
def test_asvd_matches_its_definition_and_alpha_limits():
    K, N = 18, 15
    lin = _linear(K, N, dtype=F64)
    W = lin.weight.detach()
    a = torch.rand(K, dtype=F64) * 4 + 0.01
    for alpha in (0.5, 1.0):
        Sa = a.pow(alpha)
        for r in (1, 6, 15):
            layer = factorize(lin, r, method="asvd", stats={"input_abs_mean": a}, alpha=alpha)
            expect = _trunc(W * Sa, r) / Sa  # [W S_a]_r S_a^{-1}
            torch.testing.assert_close(_product(layer), expect, rtol=0, atol=1e-12)
            torch.testing.assert_close(layer.importance, torch.linalg.svdvals(W * Sa)[:r].square().float())
    # alpha = 0: no scaling, plain svd
    torch.testing.assert_close(_product(factorize(lin, 5, method="asvd", stats={"input_abs_mean": a}, alpha=0.0)),
                               _product(factorize(lin, 5)), rtol=0, atol=1e-12)


def test_asvd_alpha_one_is_optimal_for_independent_channels():
    # Independent Gaussian channels of RMS d: input_abs_mean = sqrt(2/pi) d, input_cov = diag(d^2).
    # Then ASVD with alpha = 1 weights columns exactly like the whitening: both are the optimum.
    K, N = 14, 10
    lin = _linear(K, N, dtype=F64)
    d = torch.logspace(0, -2, K, dtype=F64)[torch.randperm(K)]
    for r in (2, 7):
        asvd = factorize(lin, r, method="asvd", stats={"input_abs_mean": math.sqrt(2 / math.pi) * d}, alpha=1.0)
        llm = factorize(lin, r, method="svd_llm", stats={"input_cov": torch.diag(d.square())})
        torch.testing.assert_close(_product(asvd), _product(llm), rtol=0, atol=1e-11)


def test_asvd_guards_zero_channels():
    K, N = 12, 9
    lin = _linear(K, N)
    a = torch.rand(K, dtype=F64)
    a[[0, 4]] = 0.0
    full = factorize(lin, method="asvd", stats={"input_abs_mean": a})
    W = lin.weight.detach().double()
    assert bool(torch.isfinite(_product(full)).all())
    assert float((_product(full) - W).norm() / W.norm()) < 1e-5
    low = factorize(lin, 3, method="asvd", stats={"input_abs_mean": a})
    assert bool(torch.isfinite(_product(low)).all()) and bool(torch.isfinite(low.importance).all())
    zeros = factorize(lin, 3, method="asvd", stats={"input_abs_mean": torch.zeros(K, dtype=F64)})
    torch.testing.assert_close(_product(zeros), _product(factorize(lin, 3)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("alpha", [2.0, 4.0])
def test_asvd_alpha_above_one_still_gives_the_weight_back(alpha, dtype):
    """Regression (found by tests/test_properties.py): the zero-clamped activation scale was raised to alpha after
    the clamp, so a dead channel weighed min_scale^alpha (1e-24 at alpha 4) and the full-rank factors gave W back
    with a relative error of 1e8. Clamped again after the power, the weighting spans at most 1 / min_scale."""
    K, N = 8, 10
    lin = _linear(K, N, dtype=dtype)
    a = torch.rand(K, dtype=F64) + 0.1
    a[3] = 0.0
    layer = factorize(lin, None, method="asvd", stats={"input_abs_mean": a}, alpha=alpha)
    W = lin.weight.detach().double()
    rel = float((_product(layer) - W).norm() / W.norm())
    assert rel < (1e-9 if dtype == F64 else 2e-6), rel
    if dtype != F64:
        return
    # channels within the clamp keep the exact definition D(a^alpha): a rank-r optimum of ||(W - W_r) D||
    a[3] = 0.5
    Sa = a.pow(alpha)
    for r in (2, 5):
        expect = _trunc(W * Sa, r) / Sa
        torch.testing.assert_close(_product(factorize(lin, r, method="asvd", stats={"input_abs_mean": a},
                                                      alpha=alpha)), expect, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match=r"^alpha=400\.0: input_abs_mean \*\* alpha overflows float64"):
        factorize(lin, 2, method="asvd", stats={"input_abs_mean": torch.full((K,), 10.0, dtype=F64)}, alpha=400.0)


@pytest.mark.filterwarnings("ignore:input_cov .* is not positive definite")
def test_fp16_factors_are_rescaled_to_fit_or_refused():
    """Regression (found by tests/test_properties.py): an fp16 layer whitened by a covariance with a dead channel got
    V entries of 1e5 (V = V'^T L^{-1}), cast to inf: its output was NaN. U's column and V's row of such a direction
    are now rescaled by reciprocal factors (U diag(S) V, S, importance unchanged); what still cannot fit in fp16 is
    a ValueError, never an inf factor."""
    g = torch.Generator().manual_seed(0)
    K, N = 6, 8
    lin = nn.Linear(K, N, dtype=torch.float16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g))
    X = torch.randn(200, K, generator=g, dtype=F64) * 0.1
    X[:, 3] = 0.0
    C = X.T @ X / 200
    layer = factorize(lin, None, method="svd_llm", stats={"input_cov": C})
    assert all(bool(torch.isfinite(p).all()) for p in layer.parameters())
    W = lin.weight.detach().double()
    assert float((_product(layer) - W).norm() / W.norm()) < 1e-3  # fp16 round-off of the factors
    lin32 = nn.Linear(K, N)
    with torch.no_grad():
        lin32.weight.copy_(lin.weight)
        lin32.bias.copy_(lin.bias)
    ref = factorize(lin32, None, method="svd_llm", stats={"input_cov": C})  # fp32: not rescaled
    torch.testing.assert_close(layer.S.float(), ref.S, rtol=1e-3, atol=0)
    torch.testing.assert_close(layer.importance, ref.importance)
    assert float(ref.V.detach().abs().max()) > torch.finfo(torch.float16).max  # the case overflowed fp16 as it was
    x = torch.randn(3, K, generator=g).half()
    assert bool(torch.isfinite(layer(x)).all())
    a = X.abs().mean(0)
    with pytest.raises(ValueError, match=r"^method 'asvd': the factors of this 6->8 layer overflow torch\.float16"):
        factorize(lin, None, method="asvd", stats={"input_abs_mean": a}, alpha=1.0, min_scale=1e-12)


# ---------------------------------------------------------------------------- fwsvd
def test_fwsvd_minimises_fisher_weighted_error():
    K, N = 21, 16
    lin = _linear(K, N, dtype=F64)
    W = lin.weight.detach()
    f = torch.logspace(-3, 2, K, dtype=F64)[torch.randperm(K)]
    f[2] = 0.0  # a column with no gradient: guarded, still finite
    fw = f.clamp(min=1e-6 * float(f.max()))
    weighted = lambda Wr: float(((W - Wr).square() * fw).sum())
    sig = torch.linalg.svdvals(W * fw.sqrt())
    for r in (1, 4, 10):
        layer = factorize(lin, r, method="fwsvd", stats={"fisher": f})
        Wr = _product(layer)
        torch.testing.assert_close(Wr, _trunc(W * fw.sqrt(), r) / fw.sqrt(), rtol=0, atol=1e-12)
        assert weighted(Wr) == pytest.approx(float(sig[r:].square().sum()), rel=1e-9)
        assert weighted(Wr) < 0.9 * weighted(_product(factorize(lin, r)))
        torch.testing.assert_close(layer.importance, sig[:r].square().float())


# ---------------------------------------------------------------------------- sparsity_aware (LPAF)
def _lpaf_reference(W: torch.Tensor, M: torch.Tensor, r: int) -> torch.Tensor:
    a, b, tot = M.sum(1), M.sum(0), M.sum()
    ra, cb = a.sqrt(), (b / tot).sqrt()
    return _trunc(ra[:, None] * W * cb[None, :], r) / ra[:, None] / cb[None, :]


def test_sparsity_aware_matches_rank_one_importance_formula():
    K, N = 16, 13
    lin = _linear(K, N, dtype=F64)
    W = lin.weight.detach()
    f = torch.logspace(-2, 2, K, dtype=F64)
    dW = torch.randn(N, K, dtype=F64)
    cases = [({}, {}, W.abs()),
             ({"fisher": f}, {}, W.abs() * (f / N).sqrt()),
             ({}, {"weight_grad": dW}, (W * dW).abs())]
    for stats, opts, M in cases:
        for r in (1, 5, 13):
            layer = factorize(lin, r, method="sparsity_aware", stats=stats, **opts)
            torch.testing.assert_close(_product(layer), _lpaf_reference(W, M, r), rtol=0, atol=1e-12)
    # rank-1 importance: the approximation is exact, so the result is the weighted optimum
    a, b = torch.rand(N, dtype=F64) + 0.1, torch.logspace(-2, 2, K, dtype=F64)
    M = torch.outer(a, b)
    layer = factorize(lin, 4, method="sparsity_aware", importance=M)
    werr = float((M * (W - _product(layer)).square()).sum())
    best = float(torch.linalg.svdvals(a.sqrt()[:, None] * W * b.sqrt()[None, :])[4:].square().sum())
    assert werr == pytest.approx(best, rel=1e-9)
    assert float(layer.importance.sum()) == pytest.approx(
        float(torch.linalg.svdvals(a.sqrt()[:, None] * W * b.sqrt()[None, :])[:4].square().sum()), rel=1e-6)


@pytest.mark.parametrize("source", ["fisher", "noisy_rank_one"])
def test_sparsity_aware_weighted_error_not_above_svd(source):
    K, N = 40, 30
    lin = _linear(K, N, dtype=F64)
    W = lin.weight.detach()
    g = torch.Generator().manual_seed(3)
    if source == "fisher":
        f = torch.logspace(-4, 2, K, dtype=F64)[torch.randperm(K, generator=g)]
        stats, opts, M = {"fisher": f}, {}, W.abs() * (f / N).sqrt()
    else:
        a = torch.logspace(-2, 1, N, dtype=F64)[torch.randperm(N, generator=g)]
        b = torch.logspace(-2, 2, K, dtype=F64)[torch.randperm(K, generator=g)]
        M = torch.outer(a, b) * torch.exp(0.5 * torch.randn(N, K, generator=g, dtype=F64))
        stats, opts = {}, {"importance": M}
    for r in (2, 8, 16):
        w_lpaf = float((M * (W - _product(factorize(lin, r, method="sparsity_aware", stats=stats, **opts)))
                        .square()).sum())
        w_svd = float((M * (W - _product(factorize(lin, r))).square()).sum())
        assert w_lpaf < 0.8 * w_svd, (r, w_lpaf, w_svd)


def test_sparsity_aware_input_metric_is_the_row_weighted_whitened_optimum():
    """input_metric: min sum_n a_n (W - W_r)_n C' (W - W_r)_n^T (C' = C / tr C), by an independent route
    (the QR of the activations), its importance the exact reduction, and the plain method back for a
    diagonal C proportional to the column sums b."""
    K, N, T = 24, 18, 500
    lin = _linear(K, N, dtype=F64)
    W = lin.weight.detach()
    X = _anisotropic_acts(T, K)
    C = X.T @ X / T
    g = torch.Generator().manual_seed(4)
    M = torch.rand(N, K, generator=g, dtype=F64) * torch.logspace(-1, 1, N, dtype=F64)[:, None]
    a = M.sum(1)
    Xs = X / math.sqrt(float(torch.trace(X.T @ X)))   # Xs^T Xs = C / tr C
    _, Rx = torch.linalg.qr(Xs)                       # C' = Rx^T Rx
    ra = a.sqrt()[:, None]

    def werr(Wr):
        return float((ra * (W - Wr) @ Rx.T).square().sum())

    for r in (1, 6, 12):
        layer = factorize(lin, r, method="sparsity_aware", importance=M, input_metric=True, stats={"input_cov": C})
        oracle = _trunc(ra * W @ Rx.T, r)             # best rank-r D(sqrt a) W_r Rx^T
        best = torch.linalg.solve_triangular(Rx.T, oracle, upper=False, left=False) / ra  # Y Rx^T = oracle
        torch.testing.assert_close(_product(layer), best, rtol=0, atol=1e-9)
        plain = factorize(lin, r, method="sparsity_aware", importance=M)
        assert werr(_product(layer)) < 0.9 * werr(_product(plain)), r
        assert float(layer.importance.sum()) == pytest.approx(werr(torch.zeros_like(W)) - werr(_product(layer)),
                                                              rel=1e-6)
    b = M.sum(0)
    for r in (3, 9):
        whitened = factorize(lin, r, method="sparsity_aware", importance=M, input_metric=True,
                             stats={"input_cov": torch.diag(7.0 * b)})
        torch.testing.assert_close(_product(whitened), _lpaf_reference(W, M, r), rtol=0, atol=1e-9)
    ignored = factorize(lin, 5, method="sparsity_aware", importance=M, stats={"input_cov": C})  # off: C unused
    torch.testing.assert_close(_product(ignored), _lpaf_reference(W, M, 5), rtol=0, atol=1e-12)


def test_sparsity_aware_input_metric_needs_input_cov_and_a_bool():
    lin = _linear(8, 6)
    with pytest.raises(ValueError, match="input_cov"):
        factorize(lin, 2, method="sparsity_aware", input_metric=True)
    with pytest.raises(ValueError, match="all zeros"):
        factorize(lin, 2, method="sparsity_aware", input_metric=True, stats={"input_cov": torch.zeros(8, 8)})
    with pytest.raises(ValueError, match="input_metric"):
        factorize(lin, 2, method="sparsity_aware", input_metric=1, stats={"input_cov": torch.eye(8)})
    with pytest.raises(TypeError, match="input_metric"):
        factorize(lin, 2, method="svd_llm", input_metric=True, stats={"input_cov": torch.eye(8)})
    assert fz.required_stats("sparsity_aware") == ()
    assert fz.required_stats("sparsity_aware", {"input_metric": True}) == ("input_cov",)
    assert fz.required_stats("svd_llm", {"input_metric": True}) == ("input_cov",)


# ---------------------------------------------------------------------------- jactus_union
def _jactus_oracle(W, C, H, P_out, P_in, r):
    """min_A ||R^T (W - P_out A P_in^T) L||_F with H = R R^T, C = L L^T, by QR on both sides (independent route)."""
    R, L = torch.linalg.cholesky(H), torch.linalg.cholesky(C)
    Q1, R1 = torch.linalg.qr(R.T @ P_out)          # R^T P_out = Q1 R1
    Q2, R2 = torch.linalg.qr((P_in.T @ L).T)       # (P_in^T L)^T = Q2 R2
    core = _trunc(Q1.T @ (R.T @ W @ L) @ Q2, r)    # R1 A R2^T = [Q1^T B Q2]_r
    A = torch.linalg.solve_triangular(R1, torch.linalg.solve_triangular(R2.T, core, upper=False, left=False),
                                      upper=True)
    return P_out @ A @ P_in.T


def test_jactus_union_lives_in_the_union_and_is_optimal_there():
    K, N, T = 30, 22, 400
    lin = _linear(K, N, dtype=F64)
    W = lin.weight.detach()
    X = _anisotropic_acts(T, K, decay=3.0)
    stats = _stats_from(X, N)
    C = stats["input_cov"]
    for r in (2, 5, 9):
        layer = factorize(lin, r, method="jactus_union", stats=stats)
        P_out, P_in = jactus_union_bases(W, r, C, stats["grad_cov"])
        # union sizes: r weight vectors + ceil(r / 2) covariance eigenvectors on each side (generic position)
        assert P_in.shape[1] == P_out.shape[1] == r + math.ceil(r / 2)
        torch.testing.assert_close(P_in.T @ P_in, torch.eye(P_in.shape[1], dtype=F64), rtol=0, atol=1e-12)
        V, U = layer.V.detach(), layer.U.detach()
        assert float((V - V @ P_in @ P_in.T).norm() / V.norm()) < 1e-12
        assert float((U - P_out @ P_out.T @ U).norm() / U.norm()) < 1e-12
        # the grad_cov / input_cov eigenvectors are in the unions
        top_g = whiten.top_eigenvectors(stats["grad_cov"], math.ceil(r / 2))
        top_c = whiten.top_eigenvectors(C, math.ceil(r / 2))
        assert float((top_g - P_out @ (P_out.T @ top_g)).norm()) < 1e-10
        assert float((top_c - P_in @ (P_in.T @ top_c)).norm()) < 1e-10
        Wr = _product(layer)
        oracle = _jactus_oracle(W, C, torch.eye(N, dtype=F64), P_out, P_in, r)
        assert float((Wr - oracle).norm() / oracle.norm()) < 1e-9
        e_j = _out_err(X, W, Wr)
        e_svd = _out_err(X, W, _product(factorize(lin, r)))
        e_llm = _out_err(X, W, _product(factorize(lin, r, method="svd_llm", stats=stats)))
        # svd_llm is the unconstrained optimum; the union holds svd's subspaces, so svd is feasible
        assert e_llm * (1 - 1e-9) <= e_j <= e_svd, (r, e_llm, e_j, e_svd)
        if r >= 5:  # the covariance directions pay off once the union has a few of them (measured 0.83, 0.74)
            assert e_j < 0.9 * e_svd, (r, e_j, e_svd)


def test_jactus_union_importance_is_output_error_reduction_and_grad_cov_optional():
    K, N, T = 24, 18, 300
    lin = _linear(K, N, dtype=F64)
    W = lin.weight.detach()
    X = _anisotropic_acts(T, K, decay=2.0)
    C = X.T @ X / T
    r = 6
    layer = factorize(lin, r, method="jactus_union", stats={"input_cov": C})  # no grad_cov: weight-only outputs
    P_out, P_in = jactus_union_bases(W, r, C)
    assert P_out.shape[1] == r
    assert float((layer.U.detach() - P_out @ (P_out.T @ layer.U.detach())).norm()) < 1e-10
    # dropping kept directions raises the per-token output error by exactly their importance
    Wr = _product(layer)
    for keep in (r - 1, 2):
        Wr_minus = (layer.U.detach()[:, :keep] * layer.S.detach()[:keep]) @ layer.V.detach()[:keep]
        delta = (_out_err(X, W, Wr_minus) - _out_err(X, W, Wr)) / T
        assert delta == pytest.approx(float(layer.importance[keep:].sum()), rel=1e-6)
    with_grad = factorize(lin, r, method="jactus_union", stats={"input_cov": C, "grad_cov": torch.eye(N, dtype=F64)})
    assert float((_product(with_grad) - Wr).norm()) > 1e-6  # grad_cov enlarges the output union


def test_jactus_union_grad_metric_is_optimal_in_the_gradient_weighted_error():
    K, N, T = 26, 20, 400
    lin = _linear(K, N, dtype=F64)
    W = lin.weight.detach()
    X = _anisotropic_acts(T, K, decay=2.5)
    G = torch.randn(T, N, dtype=F64) * torch.logspace(0, -1.5, N, dtype=F64)
    stats = {"input_cov": X.T @ X / T, "grad_cov": G.T @ G / T}
    C, Gc = stats["input_cov"], stats["grad_cov"]
    r = 5
    P_out, P_in = jactus_union_bases(W, r, C, Gc)
    plain = _product(factorize(lin, r, method="jactus_union", stats=stats))
    torch.testing.assert_close(_product(factorize(lin, r, method="jactus_union", stats=stats, grad_metric=0.0)),
                               plain, rtol=0, atol=0)

    def h_err(Wr, H):  # tr((W - Wr) C (W - Wr)^T H): the gradient-weighted output error per token
        E = W - Wr
        return float(torch.trace(E @ C @ E.T @ H))

    for beta in (0.3, 1.0):
        H = (1 - beta) * torch.eye(N, dtype=F64) + beta * Gc / (torch.trace(Gc) / N)
        layer = factorize(lin, r, method="jactus_union", stats=stats, grad_metric=beta)
        U = layer.U.detach()
        assert float((U - P_out @ (P_out.T @ U)).norm() / U.norm()) < 1e-12  # still in the union
        Wr = _product(layer)
        oracle = _jactus_oracle(W, C, H, P_out, P_in, r)
        assert float((Wr - oracle).norm() / oracle.norm()) < 1e-9
        # the plain solution lies in the union too, so it is never better; by G alone much worse (measured 0.48)
        assert h_err(Wr, H) <= h_err(plain, H) * (1 + 1e-12), (beta, h_err(Wr, H), h_err(plain, H))
        if beta == 1.0:
            assert h_err(Wr, H) < 0.6 * h_err(plain, H), (h_err(Wr, H), h_err(plain, H))
        # dropping directions raises the weighted error by exactly their importance
        for keep in (r - 1, 2):
            Wr_minus = (U[:, :keep] * layer.S.detach()[:keep]) @ layer.V.detach()[:keep]
            assert h_err(Wr_minus, H) - h_err(Wr, H) == pytest.approx(float(layer.importance[keep:].sum()), rel=1e-6)
        # full rank: the whole space, W back; importance = squared singular values of R^T W L
        full = factorize(lin, None, method="jactus_union", stats=stats, grad_metric=beta)
        R, L = torch.linalg.cholesky(H), torch.linalg.cholesky(C)
        # round-off of W = R^{-T} (R^T W L) L^{-1}: eps_64 times the condition numbers of both weightings
        bound = 1e-15 * float(torch.linalg.cond(R) * torch.linalg.cond(L)) * 100
        assert float((_product(full) - W).norm() / W.norm()) < bound
        sv = torch.linalg.svdvals(R.T @ W @ L)
        torch.testing.assert_close(full.importance, sv.square().float(), rtol=1e-5, atol=0)


def test_jactus_union_grad_metric_needs_grad_cov_and_a_weight_in_0_1():
    lin = _linear(12, 10)
    C = torch.eye(12, dtype=F64)
    with pytest.raises(ValueError, match="grad_cov"):
        factorize(lin, 3, method="jactus_union", stats={"input_cov": C}, grad_metric=0.5)
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="grad_metric"):
            factorize(lin, 3, method="jactus_union", stats={"input_cov": C, "grad_cov": torch.eye(10, dtype=F64)},
                      grad_metric=bad)


def test_jactus_union_rank_deficient_covariance_still_works(fresh_shift_warning):
    K, N = 20, 15
    lin = _linear(K, N, dtype=F64)
    W = lin.weight.detach()
    X = torch.randn(4, K, dtype=F64)  # rank 4 < 5 + 3 = the input union's dimension: C_p is singular
    with pytest.warns(RuntimeWarning, match="shift"):
        layer = factorize(lin, 5, method="jactus_union", stats={"input_cov": X.T @ X / 4})
    Wr = _product(layer)
    assert bool(torch.isfinite(Wr).all())
    assert _out_err(X, W, Wr) <= _out_err(X, W, _product(factorize(lin, 5))) * (1 + 1e-6)


def test_jactus_union_too_small_raises():
    lin = _linear(12, 10)
    C = torch.eye(12, dtype=F64)
    with pytest.raises(ValueError, match="weight_frac"):
        factorize(lin, 6, method="jactus_union", stats={"input_cov": C}, weight_frac=0.3, input_frac=0.3)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("method", [m for m in FACTORIZATIONS if REQUIRED_STATS[m]])
def test_missing_stats_name_stat_and_method(method):
    lin = _linear(8, 6)
    for stats in (None, {"grad_cov": torch.eye(6, dtype=F64)}):
        with pytest.raises(ValueError) as info:
            factorize(lin, 2, method=method, stats=stats)
        msg = str(info.value)
        assert method in msg and REQUIRED_STATS[method][0] in msg


def test_whole_model_stats_get_a_hint():
    lin = _linear(8, 6)
    with pytest.raises(ValueError, match="one layer"):
        factorize(lin, 2, method="svd_llm", stats={"layer.0": {"input_cov": torch.eye(8, dtype=F64)}})
    with pytest.raises(TypeError, match="stats"):
        factorize(lin, 2, method="svd_llm", stats=[torch.eye(8)])


@pytest.mark.parametrize(("method", "name", "bad"), [
    ("svd_llm", "input_cov", torch.eye(7, dtype=F64)),
    ("asvd", "input_abs_mean", torch.ones(6, dtype=F64)),
    ("fwsvd", "fisher", torch.ones(8, 1, dtype=F64)),
    ("jactus_union", "grad_cov", torch.eye(8, dtype=F64)),
])
def test_wrong_stat_shape_names_the_stat(method, name, bad):
    stats = {"input_cov": torch.eye(8, dtype=F64), name: bad}
    with pytest.raises(ValueError, match=name):
        factorize(_linear(8, 6), 2, method=method, stats=stats)


@pytest.mark.parametrize(("name", "value"), [
    ("input_cov", torch.full((8, 8), float("nan"), dtype=F64)),
    ("input_cov", torch.triu(torch.ones(8, 8, dtype=F64))),  # not symmetric
    ("fisher", -torch.ones(8, dtype=F64)),
    ("input_abs_mean", torch.tensor([float("inf")] * 8, dtype=F64)),
])
def test_bad_stat_values_name_the_stat(name, value):
    method = {"input_cov": "svd_llm", "fisher": "fwsvd", "input_abs_mean": "asvd"}[name]
    with pytest.raises(ValueError, match=name):
        factorize(_linear(8, 6), 2, method=method, stats={name: value})


def test_argument_errors():
    lin = _linear(8, 6)
    for rank in (0, 7, -1):
        with pytest.raises(ValueError, match="rank"):
            factorize(lin, rank)
    with pytest.raises(TypeError, match="rank"):
        factorize(lin, 2.0)
    with pytest.raises(ValueError) as info:
        factorize(lin, 2, method="pca")
    assert "method" in str(info.value) and all(m in str(info.value) for m in FACTORIZATIONS)
    with pytest.raises(TypeError, match="linear"):
        factorize(nn.Conv1d(3, 3, 1), 2)
    with pytest.raises(TypeError, match="alpha"):
        factorize(lin, 2, method="svd", alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        factorize(lin, 2, method="asvd", stats={"input_abs_mean": torch.ones(8, dtype=F64)}, alpha=float("nan"))
    with pytest.raises(ValueError, match="shift_eps"):
        factorize(lin, 2, method="svd_llm", stats={"input_cov": torch.eye(8, dtype=F64)}, shift_eps=0.0)
    with pytest.raises(ValueError, match="importance"):
        factorize(lin, 2, method="sparsity_aware", importance=torch.ones(8, 6))
    with pytest.raises(ValueError, match="importance"):
        factorize(lin, 2, method="sparsity_aware", importance=-torch.ones(6, 8))
    bad = _linear(8, 6)
    with torch.no_grad():
        bad.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="weight"):
        factorize(bad, 2)
    bad = _linear(8, 6)
    with torch.no_grad():
        bad.bias[0] = float("nan")
    with pytest.raises(ValueError, match="bias"):
        factorize(bad, 2)
