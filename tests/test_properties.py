"""Property tests (hypothesis) over the public entry points: shapes, dtypes, ranks, budgets, target patterns,
configs, save / load. Every call either succeeds with a result that satisfies the documented contract or raises
the documented error (type and message); nothing else may come out.

Reproducible: every test runs a fixed, derandomised set of examples (no example database), small enough that the
whole file takes well under a minute on two CPU cores.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import lrcomp
from lrcomp import CompressionConfig, LowRankLinear, allocate_ranks, factorize, replace_linears
from lrcomp.compression.config import JOINT_METHODS, METHODS, ONE_SHOT_METHODS
from lrcomp.compression.factorizations import FACTORIZATIONS, METHOD_OPTIONS, REQUIRED_STATS
from lrcomp.layers.masks import MASK_FNS
from lrcomp.replace import find_target_linears

F64 = torch.float64
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _settings(max_examples: int) -> settings:
    # derandomize: the same examples on every run (CI reproducible); database=None: nothing written to the checkout.
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


seeds = st.integers(0, 2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ============================================================================ LowRankLinear
@_settings(60)
@given(K=st.integers(1, 24), N=st.integers(1, 24), rank=st.integers(-2, 30), bias=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_layer_construction_accepts_exactly_the_documented_ranks(K, N, rank, bias, dtype):
    if not 1 <= rank <= min(K, N):
        msg = re.escape(f"rank must be in [1, min(in_features, out_features)] = [1, {min(K, N)}] for a {K}->{N} "
                        f"layer, got {rank}")
        with pytest.raises(ValueError, match=msg):
            LowRankLinear(K, N, rank, bias=bias, dtype=dtype)
        with pytest.raises(ValueError, match=msg):
            LowRankLinear.from_linear(nn.Linear(K, N, bias=bias, dtype=dtype), rank)
        return
    layer = LowRankLinear(K, N, rank, bias=bias, dtype=dtype)
    assert (layer.U.shape, layer.S.shape, layer.V.shape, layer.scores.shape) == ((N, rank), (rank,), (rank, K), (rank,))
    assert (layer.bias.shape == (N,)) if bias else layer.bias is None
    assert all(p.dtype == dtype and bool(torch.isfinite(p).all()) for p in layer.parameters())
    assert layer.rank == layer.active_rank == rank
    assert layer.num_parameters() == rank * (K + N) + (N if bias else 0)


def _fill_layer(layer: LowRankLinear, gen: torch.Generator, active: list[bool]) -> None:
    """Random factors, scores of both signs, and a random set of pruned directions."""
    with torch.no_grad():
        r, K = layer.V.shape
        for p, value in ((layer.U, torch.randn(layer.U.shape, generator=gen) / math.sqrt(r)),
                         (layer.V, torch.randn(layer.V.shape, generator=gen) / math.sqrt(K)),
                         (layer.S, torch.rand(r, generator=gen) * 2 + 0.1),
                         (layer.scores, torch.randn(r, generator=gen) * 2)):
            p.copy_(value)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    layer.prune_(torch.tensor(active, dtype=torch.bool))


@st.composite
def layers_and_inputs(draw):
    K, N = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    rank = draw(st.integers(1, min(K, N)))
    layer = LowRankLinear(K, N, rank, bias=draw(st.booleans()), mask_fn=draw(st.sampled_from(MASK_FNS)),
                          temperature=draw(st.sampled_from([0.5, 1.0, 3.0])), dtype=torch.float64)
    gen = _gen(draw(seeds))
    _fill_layer(layer, gen, draw(st.lists(st.booleans(), min_size=rank, max_size=rank)))
    dtype = draw(st.sampled_from(DTYPES))
    lead = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))  # () = one 1-D input; 0 = an empty batch
    x = torch.randn(*lead, K, generator=gen, dtype=F64)
    return layer.to(dtype), x.to(dtype)


@_settings(120)
@given(case=layers_and_inputs())
def test_layer_forward_equals_the_dense_product(case):
    """y = x W^T + b with W = U diag(d) V, for every shape (1-D, empty, 3-D inputs) and dtype on the CPU.

    Tolerances as in tests/layers: fp64 1e-12; fp32 the default of assert_close; fp16 / bf16 at most twice the
    error of the same formula computed in plain PyTorch at that dtype (both against the fp64 value), plus the
    rounding of each output itself to the dtype (half an ulp: with one or a few outputs the plain computation may
    land exactly by luck; tests/layers' 431 outputs never all do).
    """
    layer, x = case
    dtype, N = x.dtype, layer.out_features
    with torch.no_grad():
        y = layer(x)
        assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
        W = (layer.U.double() * layer.d.double()) @ layer.V.double()
        exact = x.double() @ W.T + (layer.bias.double() if layer.bias is not None else 0.0)
        if dtype == F64:
            torch.testing.assert_close(y, exact, rtol=1e-12, atol=1e-12)
        elif dtype == torch.float32:
            torch.testing.assert_close(y, exact.float())
        elif y.numel():
            plain = ((x @ layer.V.t()) * layer.d) @ layer.U.t()
            if layer.bias is not None:
                plain = plain + layer.bias
            err = (y.double() - exact).abs()
            plain_err = (plain.double() - exact).abs().max().item()
            half_ulp = exact.abs() * torch.finfo(dtype).eps / 2  # the unit roundoff u times |y|
            assert bool((err <= 2 * plain_err + half_ulp).all()), (err.max().item(), plain_err)
        # densified, the layer is the same map (to_linear computes W in fp64, rounds it once to the dtype)
        if dtype in (F64, torch.float32):
            linear = layer.to_linear()
            tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {}
            torch.testing.assert_close(linear(x), exact.to(dtype), **tol)


@_settings(30)
@given(K=st.integers(1, 12), N=st.integers(1, 12), width=st.integers(1, 14),
       layer_dtype=st.sampled_from(DTYPES), x_dtype=st.sampled_from(DTYPES + (torch.int64, torch.bool)))
def test_layer_forward_rejects_bad_inputs_with_documented_errors(K, N, width, layer_dtype, x_dtype):
    layer = LowRankLinear(K, N, 1, dtype=layer_dtype)
    x = torch.zeros(2, width).to(x_dtype)
    if not x_dtype.is_floating_point:
        with pytest.raises(TypeError, match=r"^x must be floating point"):
            layer(x)
    elif width != K:
        with pytest.raises(ValueError, match=rf"^x has width {width} but V is \[r=1, K={K}\]"):
            layer(x)
    elif x_dtype != layer_dtype:
        with pytest.raises(ValueError, match=rf"has dtype {layer_dtype} but x has {x_dtype}"):
            layer(x)
    else:
        assert layer(x).shape == (2, N)
    with pytest.raises(ValueError, match="at least one dimension"):
        layer(torch.tensor(1.0, dtype=layer_dtype))


# ============================================================================ factorize / from_linear
def _random_stats(gen: torch.Generator, K: int, N: int, tokens: int, dead: list[bool],
                  scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The four statistics of one layer as calibrate returns them, from ``tokens`` random rows of RMS ~``scale``
    (rank-deficient covariances when tokens < K) with some dead input channels (zero statistics)."""
    X = torch.randn(tokens, K, generator=gen, dtype=F64) * torch.logspace(0, -2, K, dtype=F64) * scale
    X[:, torch.tensor(dead[:K], dtype=torch.bool)] = 0.0
    G = torch.randn(tokens, N, generator=gen, dtype=F64)
    return {"input_cov": X.T @ X / tokens, "grad_cov": G.T @ G / tokens, "input_abs_mean": X.abs().mean(0),
            "fisher": (G.T @ X).square().sum(0) / tokens**2}


_VALID_OPTIONS = {
    "alpha": st.sampled_from([0.5, 1.0, 2.0, 4.0]) | st.floats(0.0, 4.0), "min_scale": st.floats(1e-6, 1.0),
    "shift_eps": st.floats(1e-10, 1e-4),
    "weight_frac": st.floats(1.0, 2.0), "input_frac": st.floats(0.0, 1.0), "grad_frac": st.floats(0.0, 1.0),
    "tol": st.floats(1e-10, 1e-6), "grad_metric": st.floats(0.0, 0.5),
}


@st.composite
def factorize_cases(draw):
    method = draw(st.sampled_from(FACTORIZATIONS))
    K, N = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    gen = _gen(draw(seeds))
    dtype = draw(st.sampled_from(DTYPES))
    linear = nn.Linear(K, N, bias=draw(st.booleans()), dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=gen, dtype=F64))
    dead = draw(st.sampled_from(["none", "one", "some"]))  # dead input channels: zero statistics
    dead = ([False] * K if dead == "none" else [i == K // 2 for i in range(K)] if dead == "one" else
            draw(st.lists(st.booleans(), min_size=K, max_size=K)))
    stats = _random_stats(gen, K, N, draw(st.integers(1, 2 * K + 2)), dead,
                          scale=draw(st.sampled_from([1.0, 1e-2, 30.0])))
    options = {name: draw(_VALID_OPTIONS[name]) for name in METHOD_OPTIONS[method]
               if name in _VALID_OPTIONS and draw(st.booleans())}
    return method, linear, stats, options


@pytest.mark.filterwarnings("ignore:.* is not positive definite:RuntimeWarning")  # rank-deficient covariances
@_settings(80)
@given(case=factorize_cases(), rank_choice=st.integers(0, 25))
def test_factorize_every_method_at_any_rank(case, rank_choice):
    """Shapes, dtype, bias copied; S and importance non-negative and descending; rank None gives W back (fp32:
    the tolerance of tests/compression/test_factorize.py, fp64: 1e-9); the rank-r factors of plain SVD are
    the Eckart-Young optimum; methods whose rank-r result is the top r of the full one agree with it.
    fp16 factors of an extreme weighting may not fit in fp16: then the documented ValueError, never inf."""
    method, linear, stats, options = case
    K, N, dtype = linear.in_features, linear.out_features, linear.weight.dtype
    W = linear.weight.detach().double()
    rank = min(rank_choice, min(K, N)) or None
    try:
        full = factorize(linear, None, method=method, stats=stats, **options)
        layer = factorize(linear, rank, method=method, stats=stats, **options) if rank else full
    except ValueError as err:
        assert dtype == torch.float16 and re.match(rf"method '{method}': the factors of this {K}->{N} layer overflow "
                                                   rf"torch\.float16", str(err)), str(err)
        return
    r = rank or min(K, N)
    for lay, rr in ((full, min(K, N)), (layer, r)):
        assert isinstance(lay, LowRankLinear) and (lay.in_features, lay.out_features, lay.rank) == (K, N, rr)
        assert all(p.dtype == dtype and bool(torch.isfinite(p).all()) for p in lay.parameters())
        if linear.bias is None:
            assert lay.bias is None
        else:
            assert torch.equal(lay.bias, linear.bias)
        S, imp = lay.S.detach(), lay.importance
        assert imp.dtype == torch.float32 and imp.shape == (rr,) and bool(torch.isfinite(imp).all())
        assert bool((S >= 0).all()) and bool((S[:-1] >= S[1:]).all())
        assert bool((imp >= 0).all()) and bool((imp[:-1] >= imp[1:]).all())
    product = (full.U.detach().double() * full.S.detach().double()) @ full.V.detach().double()
    rel = float((product - W).norm() / W.norm())
    # jactus_union's exact projection W C~ P_in C~_p^{-1} P_in^T = W amplifies the fp64 round-off of W (I - P P^T)
    # by cond(C~_p), up to 1 / shift_eps for a rank-deficient covariance (measured ~6e-16 / shift_eps).
    amplified = 1e-14 / options.get("shift_eps", METHOD_OPTIONS[method].get("shift_eps", 1.0))
    # grad_metric = b weights the outputs by H = (1 - b) I + b G / mean eig(G): times cond(H) <= 1 + b N / (1 - b)
    b = options.get("grad_metric", 0.0)
    amplified *= 1.0 + b * N / (1.0 - b)
    if dtype == torch.float32:
        assert rel < 2e-6 + (amplified if method == "jactus_union" else 0.0), (method, rel)
    elif dtype == F64:
        assert rel < (amplified if method == "jactus_union" else 1e-9), (method, rel)
    if method == "svd":  # LowRankLinear.from_linear is the same truncated SVD
        direct = LowRankLinear.from_linear(linear, rank)
        assert direct.rank == r and torch.equal(direct.S, layer.S)
        torch.testing.assert_close(direct.to_linear().weight, layer.to_linear().weight)
    if method == "svd" and dtype == F64:
        s = torch.linalg.svdvals(W)
        Wr = (layer.U.detach() * layer.S.detach()) @ layer.V.detach()
        assert math.isclose(float((W - Wr).square().sum()), float(s[r:].square().sum()), rel_tol=1e-9,
                            abs_tol=1e-12 * float(s.square().sum()))
    if method != "jactus_union" and rank:
        torch.testing.assert_close(layer.importance, full.importance[:r])


@_settings(40)
@given(method=st.sampled_from(FACTORIZATIONS), K=st.integers(1, 8), N=st.integers(1, 8),
       rank=st.one_of(st.integers(-3, 12), st.sampled_from([1.0, "2", True])),
       drop=st.sampled_from([None, "input_cov", "input_abs_mean", "fisher"]),
       option=st.sampled_from([None, ("alpha", -1.0), ("alpha", math.nan), ("min_scale", 0.0), ("min_scale", 2.0),
                               ("shift_eps", 0.0), ("tol", math.inf), ("bogus", 1), ("weight_frac", "x")]))
def test_factorize_errors_are_the_documented_ones(method, K, N, rank, drop, option):
    linear = nn.Linear(K, N)
    stats = _random_stats(_gen(0), K, N, 3 * K, [False] * K)
    if drop is not None:
        del stats[drop]
    options = dict([option]) if option is not None else {}
    bad_option = option is not None and (option[0] not in METHOD_OPTIONS[method])
    missing = drop in REQUIRED_STATS[method]
    try:
        layer = factorize(linear, rank, method=method, stats=stats, **options)
    except TypeError as err:
        msg = str(err)
        assert (re.match(r"rank must be an int", msg) and not (isinstance(rank, int) and not isinstance(rank, bool))
                ) or (bad_option and re.match(rf"method '{method}' takes no option", msg)), msg
    except ValueError as err:
        msg = str(err)
        valid_rank = isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= min(K, N)
        assert (not valid_rank and msg.startswith("rank must be in [1, min(in_features, out_features)]")) or (
            missing and re.match(rf"method '{method}' needs the statistics", msg)) or (
            option is not None and msg.startswith(f"{option[0]} must be")) or (
            method == "jactus_union" and "jactus_union subspaces" in msg), msg
    else:
        assert isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= min(K, N)
        assert not missing and option is None  # every option drawn here is bad or unknown
        assert layer.rank == rank


# ============================================================================ replace_linears / target patterns
_NAME = st.sampled_from(["q", "k", "v", "proj", "q_proj", "mlp", "fc1", "fc2", "0", "1", "head", "lm_head",
                         "classifier", "score", "attn", "dense"])


@st.composite
def models(draw):
    """A random tree of containers and nn.Linear / other leaves (names may repeat at different depths)."""
    gen = _gen(draw(seeds))

    def build(depth: int) -> nn.Module:
        children = {}
        for name in draw(st.lists(_NAME, min_size=1, max_size=3, unique=True)):
            kind = draw(st.sampled_from(["linear", "linear", "other", "container"] if depth < 2 else
                                        ["linear", "other"]))
            if kind == "container":
                children[name] = build(depth + 1)
            elif kind == "linear":
                K, N = draw(st.integers(1, 6)), draw(st.integers(1, 6))
                lin = nn.Linear(K, N, bias=draw(st.booleans()))
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(N, K, generator=gen))
                children[name] = lin
            else:
                children[name] = nn.LayerNorm(3)
        return nn.ModuleDict(children)

    return build(0)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


@st.composite
def target_specs(draw, names: list[str]):
    """What users pass as target_modules / exclude_modules: lists of names or name suffixes, regexes (valid or
    not), strings that match nothing; or a wrong type."""
    pieces = [p for n in names for p in n.split(".")] + ["nope", "q_proj"]
    kind = draw(st.sampled_from(["list", "list", "regex", "regex", "text", "all", "bad_type"]))
    if kind == "list":
        return draw(st.lists(st.sampled_from(pieces + names) | st.text(max_size=4), max_size=4))
    if kind == "regex":
        chosen = draw(st.lists(st.sampled_from(names), max_size=3)) if names else []
        parts = [re.escape(n) for n in chosen] + draw(st.lists(st.sampled_from([r".*", r"\d+", r".*\.q", "q|k"]),
                                                               max_size=2))
        return "|".join(parts) or ".*"
    if kind == "text":
        return draw(st.text(alphabet="qkv._*()[]+?|\\0", max_size=6))  # often not a valid regex
    if kind == "all":
        return "all-linear"
    return draw(st.sampled_from([5, 1.5, None, [1, 2], (b"q",)]))


def _spec_error(spec, argname: str) -> type[Exception] | None:
    """The documented error of a target spec by itself: TypeError for a wrong type, ValueError for a bad regex."""
    if isinstance(spec, str):
        if spec == "all-linear" and argname == "target_modules":
            return None
        try:
            re.compile(spec)
        except re.error:
            return ValueError
        return None
    if spec is None and argname == "exclude_modules":
        return None
    if isinstance(spec, (list, tuple)) and all(isinstance(p, str) for p in spec):
        return None
    return TypeError


def _selected(name: str, spec) -> bool:
    """The documented rule: a list entry matches the whole name or its last components; a regex the whole name."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == p or name.endswith("." + p) for p in spec)


@_settings(100)
@given(data=st.data(), model=models(), rank=st.one_of(st.none(), st.integers(-1, 7)))
def test_replace_linears_selects_by_the_documented_rules(data, model, rank):
    names = _linear_names(model)
    target = data.draw(target_specs(names), label="target_modules")
    exclude = data.draw(st.none() | target_specs(names), label="exclude_modules")
    before = {n: m for n, m in model.named_modules()}
    x = {n: torch.randn(2, m.in_features) for n, m in before.items() if type(m) is nn.Linear}
    ref = {n: before[n](x[n]).detach() for n in x}
    errors = [e for e in (_spec_error(target, "target_modules"), _spec_error(exclude, "exclude_modules")) if e]
    if errors:
        with pytest.raises(tuple(errors), match=r"target_modules|exclude_modules"):
            replace_linears(model, rank, target_modules=target, exclude_modules=exclude)
        assert dict(model.named_modules()) == before  # untouched
        return
    if target == "all-linear":
        expected = [n for n in names if n.rsplit(".", 1)[-1] not in ("lm_head", "classifier", "score")]
    else:
        expected = [n for n in names if _selected(n, target)]
    if exclude is not None:
        expected = [n for n in expected if not _selected(n, exclude)]
    assert find_target_linears(model, target, exclude) == expected
    bad_rank = [n for n in expected if rank is not None and not 1 <= rank <= min(before[n].in_features,
                                                                                  before[n].out_features)]
    if not expected:
        with pytest.raises(ValueError, match=r"matches no nn\.Linear .*; its linear layers are: \["):
            replace_linears(model, rank, target_modules=target, exclude_modules=exclude)
    elif bad_rank:
        with pytest.raises(ValueError, match=rf"^module '{re.escape(bad_rank[0])}': rank must be in \[1, "):
            replace_linears(model, rank, target_modules=target, exclude_modules=exclude)
    else:
        assert replace_linears(model, rank, target_modules=target, exclude_modules=exclude) == expected
        for n in expected:
            layer = model.get_submodule(n)
            assert isinstance(layer, LowRankLinear)
            assert layer.rank == (rank if rank is not None else min(layer.in_features, layer.out_features))
            if rank is None:  # full rank: the same map (fp32 tolerance of tests/test_replace.py)
                torch.testing.assert_close(layer(x[n]).detach(), ref[n], rtol=1e-5, atol=1e-5)
        untouched = {n: m for n, m in model.named_modules() if n not in expected}
        assert all(untouched[n] is before[n] for n in untouched if n in before and type(before[n]) is not
                   nn.ModuleDict)
        return
    assert dict(model.named_modules()) == before  # an error leaves the model as it was


# ============================================================================ budgets: allocate_ranks / compress
budgets = st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([1.0, 1e-9]))
bad_budgets = st.sampled_from([0, 0.0, -0.1, -1, 1.0000001, 2, math.nan, math.inf, -math.inf])


@st.composite
def stacks(draw, max_layers: int = 4, max_dim: int = 12):
    """A random stack of nn.Linear (any shapes, including 1-wide and square 2x2 layers past break-even at rank 1)."""
    dims = draw(st.lists(st.integers(1, max_dim), min_size=2, max_size=max_layers + 1))
    gen = _gen(draw(seeds))
    layers = []
    for K, N in zip(dims[:-1], dims[1:], strict=True):
        lin = nn.Linear(K, N)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(N, K, generator=gen) * torch.logspace(0, -1, K))
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers)


def _targets(model: nn.Module) -> list[tuple[str, int, int]]:
    return [(n, m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, LowRankLinear))]


@_settings(60)
@given(model=stacks(), budget=budgets, cost=st.sampled_from(["params", "flops"]), min_rank=st.integers(1, 3),
       exact=st.sampled_from([0, 200_000]))
def test_allocate_ranks_is_at_or_under_budget_by_exact_accounting(model, budget, cost, min_rank, exact):
    targets = _targets(model)
    unit = 2 if cost == "flops" else 1
    total = sum(unit * K * N for _, K, N in targets)
    try:
        alloc = allocate_ranks(model, budget, cost=cost, min_rank=min_rank, exact_max_units=exact)
    except ValueError as err:
        # documented: the budget is below what min_rank already costs (every layer at min_rank, or dense where
        # min_rank is past its break-even); the message gives that fraction
        minimum = sum(unit * (K * N if min(min_rank, K, N) * (K + N) >= K * N else min(min_rank, K, N) * (K + N))
                      for _, K, N in targets)
        assert minimum > math.floor(budget * total), (minimum, budget * total, str(err))
        assert re.match(rf"budget={budget:g} is below what min_rank={min_rank} already costs", str(err)), str(err)
        return
    kept = 0
    for name, K, N in targets:
        if name in alloc:
            r = alloc[name]
            assert min(min_rank, K, N) <= r <= min(K, N) and r * (K + N) < K * N  # below break-even
            kept += unit * r * (K + N)
        else:
            assert name in alloc.dense
            kept += unit * K * N
    assert set(alloc).isdisjoint(alloc.dense) and set(alloc) | set(alloc.dense) == {n for n, _, _ in targets}
    assert alloc.kept_cost == kept and alloc.total_cost == total
    assert kept <= budget * total


@_settings(20)
@given(budget=bad_budgets | st.sampled_from(["0.5", None, True]))
def test_invalid_budgets_are_rejected_everywhere(budget):
    model = nn.Sequential(nn.Linear(8, 8))
    kind = TypeError if isinstance(budget, (str, bool)) or budget is None else ValueError
    with pytest.raises(kind, match=r"^budget must be a"):
        allocate_ranks(model, budget)
    with pytest.raises(ValueError, match=r"^budget must be a fraction in \(0, 1\]"):
        CompressionConfig(method="svd", budget=budget)


@_settings(50)
@given(model=stacks(max_layers=3, max_dim=10), budget=budgets, allocation=st.sampled_from(["global", "uniform"]),
       method=st.sampled_from(["svd", "svd_llm", "asvd"]), seed=seeds)
def test_compress_is_at_or_under_budget_by_exact_parameter_accounting(model, budget, allocation, method, seed):
    """The compressed model's targeted layers keep at most budget x their dense weights (biases excluded), every
    low-rank layer is compacted, and its output stays finite; or the documented error for a budget too small."""
    gen = _gen(seed)
    K0 = model[0].in_features
    data = [torch.randn(5, K0, generator=gen) for _ in range(2)]
    targets = _targets(model)
    dense = sum(K * N for _, K, N in targets)
    config = CompressionConfig(method=method, budget=budget, allocation=allocation)
    before = dict(model.named_modules())
    try:
        out = lrcomp.compress(model, config, data)
    except ValueError as err:
        event(f"error {allocation}")
        # documented: global, the budget is below rank 1 everywhere (dense where rank 1 is past break-even);
        # uniform, some layer can keep neither rank 1 nor its dense weights within its own share
        if allocation == "global":
            minimum = sum(K * N if K + N >= K * N else K + N for _, K, N in targets)
            assert minimum > math.floor(budget * dense) and "is below what min_rank=1 already costs" in str(err)
        else:
            assert any(K + N > budget * K * N and budget < 1 for _, K, N in targets)
            assert re.match(rf"budget={budget:g} leaves layer '\d+' \(\d+ -> \d+\) no rank under allocation="
                            r"'uniform'", str(err)), str(err)
        assert dict(model.named_modules()) == before  # an error leaves the model as it was
        return
    assert out is model
    event(f"ok {allocation} {sorted(type(m).__name__ for m in model.modules())}")
    kept = 0
    for name, K, N in targets:
        m = model.get_submodule(name)
        if isinstance(m, LowRankLinear):
            assert m.active_rank == m.rank and 1 <= m.rank < K * N / (K + N)
            kept += m.rank * (K + N)
        else:
            assert type(m) is nn.Linear
            kept += K * N
    assert kept <= budget * dense, (kept, budget * dense)
    with torch.no_grad():
        assert bool(torch.isfinite(model(data[0])).all())


# ============================================================================ CompressionConfig and method options
def _loss(outputs, batch):
    return outputs.sum()


# field -> (valid values, invalid values); an invalid value must give a ValueError / TypeError naming the field
_CONFIG_FIELDS = {
    "budget": (budgets, bad_budgets | st.sampled_from(["0.5", True])),
    "cost": (st.sampled_from(["params", "flops"]), st.sampled_from(["watts", None, "latency"])),
    "allocation": (st.sampled_from(["global", "uniform"]), st.sampled_from(["random", None, 1])),
    "min_rank": (st.integers(1, 5), st.sampled_from([0, -1, 1.5, True, "2"])),
    "calib_max_batches": (st.none() | st.integers(1, 5), st.sampled_from([0, -2, 1.5, True])),
    "calib_group_size": (st.none() | st.integers(1, 5), st.sampled_from([0, 2.0, False])),
    "total_steps": (st.integers(1, 1000), st.sampled_from([0, -3, 2.0, True, "10"])),
    "distill_weight": (st.none() | st.floats(0, 10), st.sampled_from([-1.0, math.nan, math.inf, True, "1"])),
    "feature_weight": (st.none() | st.floats(0, 10), st.sampled_from([-0.5, math.nan, -math.inf, False])),
    "distill_temperature": (st.floats(0.1, 10), st.sampled_from([0, -1.0, math.nan, math.inf, True, None])),
    "sensitivity": (st.just(False), st.sampled_from([1, "yes", None])),
    "loss_fn": (st.sampled_from([None, _loss]), st.sampled_from([5, "loss"])),
    "method_options": (st.just({}), st.sampled_from([[1], "alpha=1", None])),
    "target_modules": (st.sampled_from(["all-linear", r".*\.q", ["q", "k"], ("fc1",)]),
                       st.sampled_from([5, None, [1, 2], "(unclosed", b"q"])),
    "exclude_modules": (st.sampled_from([None, "lm_head", ["classifier"]]), st.sampled_from([5, [None], "*bad"])),
}


@_settings(150)
@given(data=st.data(), method=st.sampled_from(METHODS), fields=st.lists(st.sampled_from(sorted(_CONFIG_FIELDS)),
                                                                         unique=True, max_size=5),
       n_bad=st.integers(0, 2))
def test_compression_config_accepts_valid_and_names_the_invalid_field(data, method, fields, n_bad):
    bad = set(fields[:n_bad])
    kwargs = {f: data.draw(_CONFIG_FIELDS[f][f in bad], label=f) for f in fields}
    if method in JOINT_METHODS and "total_steps" not in kwargs:
        bad.add("total_steps")  # documented: a joint method needs total_steps
    try:
        config = CompressionConfig(method=method, **kwargs)
    except (ValueError, TypeError) as err:
        assert bad, f"valid config {kwargs} refused: {err}"
        assert any(f in str(err) for f in bad) or ("cost" in bad and "cost_table" in str(err)), (bad, str(err))
        return
    assert not bad, f"invalid {sorted(bad)} accepted: {kwargs}"
    assert config.method == method and isinstance(config.budget, float)
    for f, value in kwargs.items():
        assert getattr(config, f) == value or (f == "budget" and config.budget == float(value))


_OPTION_VALUES = st.sampled_from([0, 1, 2, -1, 0.0, 0.5, 1.0, 1.5, 1e-9, -0.5, math.nan, math.inf, True, False, None,
                                  "svd", "svd_llm", "asvd", "lora", "cosine", "movement", "first_order", "x", [1]])


def _check_options(chosen: list[str], options: dict, build) -> None:
    try:
        build()
    except TypeError as err:
        assert "bogus" in chosen and "bogus" in str(err), (options, str(err))
    except ValueError as err:
        assert any(n in str(err) for n in chosen), (options, str(err))
    else:
        assert "bogus" not in chosen


@_settings(80)
@given(data=st.data(), method=st.sampled_from(ONE_SHOT_METHODS))
def test_factorize_options_are_validated_with_messages_naming_the_option(data, method):
    """Random option names (real and bogus) and values: factorize runs, or a TypeError (unknown option) or a
    ValueError (bad value) names the option."""
    names = sorted(METHOD_OPTIONS[method]) + ["mask_fn", "temperature", "bogus"]
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=3), label="names")
    options = {n: data.draw(_OPTION_VALUES, label=n) for n in chosen}
    stats = _random_stats(_gen(0), 6, 5, 12, [False] * 6)
    _check_options(chosen, options, lambda: factorize(nn.Linear(6, 5), 2, method=method, stats=stats, **options))


@pytest.mark.parametrize("method", JOINT_METHODS)
@_settings(200)
@given(data=st.data())
def test_joint_method_options_are_validated_with_messages_naming_the_option(method, data):
    """As above for the options dataclass of every joint method (CompressionConfig.method_options)."""
    import dataclasses

    from lrcomp.methods.base import build_options
    from lrcomp.methods.compressor import method_class

    options_cls = method_class(method).Options
    names = [f.name for f in dataclasses.fields(options_cls)] + ["bogus"]
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True, min_size=1, max_size=3), label="names")
    options = {n: data.draw(_OPTION_VALUES, label=n) for n in chosen}
    _check_options(chosen, options, lambda: build_options(options_cls, options, method))


# ============================================================================ save_pretrained / from_pretrained
try:
    import transformers
except ImportError:  # the hf extra: only these tests need it
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers (the hf extra)")


def _tiny_bert(hidden: int, intermediate: int, layers: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=intermediate, vocab_size=50, max_position_embeddings=16)
    return transformers.BertModel(config).eval()


@st.composite
def lowrank_berts(draw):
    """A tiny random BERT with random ranks per layer, some directions pruned, in a random dtype."""
    hidden = draw(st.sampled_from([4, 8, 12]))
    model = _tiny_bert(hidden, draw(st.sampled_from([4, 16])), draw(st.integers(1, 2)), draw(seeds))
    names = find_target_linears(model, "all-linear")
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    ranks = {}
    for n in chosen:
        lin = model.get_submodule(n)
        ranks[n] = draw(st.integers(1, min(lin.in_features, lin.out_features)))
    replace_linears(model, ranks, mask_fn=draw(st.sampled_from(MASK_FNS)))
    for n in chosen:
        layer = model.get_submodule(n)
        layer.prune_(draw(st.integers(1, layer.rank)))
    return model.to(draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])))


@needs_transformers
@_settings(6)
@given(model=lowrank_berts(), compact=st.booleans())
def test_save_pretrained_from_pretrained_round_trip_is_exact(model, compact):
    import tempfile

    from lrcomp.integrations.hf import mark_lowrank, rank_pattern

    mark_lowrank(model, compact=compact)
    ids = torch.randint(0, 50, (2, 5), generator=_gen(0))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = transformers.AutoModel.from_pretrained(tmp)
    assert rank_pattern(loaded) == rank_pattern(model)
    expected, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    # Same tensors and layer settings: the same outputs, bit for bit, once the tensors sit in memory that torch
    # allocated (the loaded ones are views of the memory-mapped file, often not 64-byte aligned, and the CPU
    # GEMM then sums in another order: 1 ulp apart).
    for tensor in [*loaded.parameters(), *loaded.buffers()]:
        tensor.data = tensor.data.clone()
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, ref)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """(directory, weights bytes, state dict) of a saved tiny low-rank BERT."""
    from lrcomp.integrations.hf import mark_lowrank

    model = _tiny_bert(8, 16, 1, 0)
    replace_linears(model, {n: 2 + i % 3 for i, n in enumerate(find_target_linears(model, "all-linear"))})
    mark_lowrank(model)
    path = tmp_path_factory.mktemp("ckpt") / "m"
    model.save_pretrained(path)
    return path, (path / "model.safetensors").read_bytes(), model.state_dict()


@needs_transformers
@_settings(50)
@given(how=st.sampled_from(["truncate", "flip", "flip"]), where=st.integers(0, 2**20 - 1), mask=st.integers(1, 255),
       header=st.booleans())
def test_corrupted_or_truncated_checkpoint_is_refused_with_a_clear_error(saved_checkpoint, how, where, mask, header):
    """A truncated file, or one byte changed anywhere (header or data): from_pretrained raises the documented
    ValueError and returns nothing, or (a byte nothing reads: a guard tensor, an informative metadata string)
    returns a model holding exactly the saved tensors. Never a model with other values, never another error."""
    import shutil
    import tempfile

    path, blob, state = saved_checkpoint
    header_len = 8 + int.from_bytes(blob[:8], "little")
    # half the examples aim at the header (the tensor names, dtypes, shapes, offsets, metadata), half at the data
    pos = where * header_len // 2**20 if header else header_len + where * (len(blob) - header_len) // 2**20
    if how == "truncate":
        corrupted = blob[:pos]
    else:
        corrupted = bytearray(blob)
        corrupted[pos] ^= mask
        corrupted = bytes(corrupted)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path / "config.json", tmp)
        with open(f"{tmp}/model.safetensors", "wb") as f:
            f.write(corrupted)
        try:
            loaded = transformers.AutoModel.from_pretrained(tmp)
        except ValueError as err:
            assert re.match(r"the lrcomp checkpoint (file )?'[^']+' (cannot be read as safetensors|is corrupted|has a "
                            r"corrupted 'lrcomp_crc32'|does not match its quantization_config)", str(err)), str(err)
            reason = re.search(r"cannot be read|is corrupted|has a corrupted|does not match", str(err)).group()
            event(f"refused {how} {'header' if pos < header_len else 'data'}: {reason}")
            return
    event(f"loaded intact {how} {'header' if pos < header_len else 'data'}")
    got = loaded.state_dict()
    assert got.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(got[key], value), key
