"""Global rank allocation: one budget for the whole model, spent direction by direction.

Every targeted layer ``l`` (``K_l -> N_l``) offers its singular directions in order of
decreasing score ``s_{l,1} >= s_{l,2} >= ...``; keeping the first ``r`` directions gains
``G_l(r) = sum_{i <= r} s_{l,i}`` and costs ``c_l(r)``; keeping the layer dense gains everything
it has, ``G_l(full)``, and costs ``D_l``. Given a budget fraction ``b`` the allocator solves

    maximise  sum_l G_l(state_l)   subject to   sum_l c_l(state_l) <= b * sum_l D_l,
    state_l in {min_rank, ..., R_l - 1} U {dense}

where ``R_l`` is the layer's break-even rank, the smallest r with ``c_l(r) >= D_l`` (for
parameters and FLOPs ``R_l = ceil(K N / (K + N))``): from there on the dense layer is cheaper
than the low-rank one and keeps everything, so the layer "goes dense" instead.

Scores (comparable across layers: each is the reduction of a per-layer error when the direction
is kept):

* ``nn.Linear`` with ``score="energy"``: ``s_i = sigma_i(W)^2``, the Eckart-Young drop of
  ``||W - W_r||_F^2``;
* ``nn.Linear`` with ``score="whitened"`` (SVD-LLM, Wang et al. 2024): ``s_i = sigma_i(W L)^2``
  with ``C = L L^T`` the layer's input covariance ``(1/T) sum_t x_t x_t^T`` (Cholesky in fp64,
  :func:`lrcomp.linalg.whiten.shifted_cholesky`'s eigenvalue shift when not positive definite,
  as ``factorize(method="svd_llm")`` does, so the scores equal its importance): the drop of
  ``E_x ||x W^T - x W_r^T||^2`` per token at the whitened-SVD optimum;
* :class:`LowRankLinear` (``score="importance"``): its ``importance`` buffer restricted to the
  active directions (``(S * mask)^2`` when it has none), sorted descending — what
  :func:`lrcomp.factorize` stores, in the units of its method's objective;
* ``score="auto"``: importance for LowRankLinear, whitened for nn.Linear when ``stats`` holds
  its ``input_cov``, energy otherwise.

Costs of keeping ``r`` directions / the dense layer:

* ``"params"``: ``r (K + N)`` / ``K N``;
* ``"flops"`` (per token): ``2 r (K + N)`` / ``2 K N``;
* ``"latency"``: ``lowrank_us(K, N, r)`` / ``dense_us(K, N)`` from a measured
  :class:`~lrcomp.compression.cost.LatencyTable` (monotone in r), counted in integer nanoseconds.

Solver (all accounting in integers, so the budget test ``kept <= floor(b * total)`` is exact):

1. **Greedy** on marginal gain per unit cost: the ``min_rank`` first directions of every layer
   are taken up front; then a heap holds each layer's next move — its next direction
   (gain ``s_{l,r+1}``, cost ``c_l(r+1) - c_l(r)``) or, at break-even, "go dense" (gain
   ``G_l(full) - G_l(r)``, cost ``D_l - c_l(r)``). The best ratio is applied if it fits in what is
   left of the budget; a move that does not fit blocks its layer (directions stay in order) and
   the search continues with the other layers. Ties go to the earlier layer (model order).
   Directions with score <= 0 are never bought (they cost and gain nothing).
2. **Exact refinement**: the greedy is optimal for a fractional relaxation but not always for the
   integer problem (a large "go dense" step or the budget edge can strand it). When the option
   costs, divided by their gcd, leave at most ``exact_max_units`` budget units (default 2e5;
   e.g. MiniLM-L6 by parameters: gcd 384, at most 27,648 units), a dynamic program over the budget
   solves the multiple-choice knapsack exactly (per layer one state of the list above;
   ``dp_l[u] = max_j dp_{l-1}[u - w_j] + G_j``, vectorised in torch, O(options x units)); its
   solution replaces the greedy's only when its total score is strictly higher.

How often the greedy alone is not optimal (``python -m lrcomp.compression.allocate`` reruns this;
2000 random instances, 2-6 layers of shapes 4..64, scores ``sort(exp(N(0, 2)))`` descending,
budget U(0.05, 1), min_rank 1-3, params or flops): the greedy total score was below the exact
optimum in 986 of them (49%), by 0.38% of the optimum on average over those and 5.9% at worst —
mostly budget left unspent at the edge, or a "go dense" step that no longer fits. On 36 layers of
the MiniLM shapes with decaying spectra at budget 0.5 (params) the DP gains 0.13% of kept score.
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lrcomp.compression.cost import LatencyTable
from lrcomp.layers.lowrank_linear import LowRankLinear
from lrcomp.linalg.whiten import shifted_cholesky
from lrcomp.replace import find_target_linears

SCORES = ("auto", "energy", "whitened", "importance")
COSTS = ("params", "flops", "latency")
DEFAULT_EXACT_MAX_UNITS = 200_000
# Latency costs are counted in integer nanoseconds so that the accounting is exact.
_LATENCY_UNITS_PER_US = 1000
# Upper bound on options x budget units for the exact DP (elementwise work; ~1 s on 2 CPU cores).
_EXACT_MAX_WORK = 1_000_000_000
# Gather at most this many elements at a time in the DP (memory bound: 8 bytes each).
_DP_CHUNK_ELEMENTS = 2_000_000


class RankAllocation(dict):
    """``{layer name: rank}`` for the layers to factor (only those), plus the accounting.

    Passes straight to :func:`lrcomp.replace_linears` (targets without an entry stay dense).

    Attributes:
        dense: names of the targets kept dense (break-even passed, or forced by ``min_rank``).
        kept_cost, total_cost: the cost kept and the dense cost of all targets (parameters,
            FLOPs per token, or microseconds), ``kept_cost <= budget * total_cost``.
        budget: the requested fraction; cost: the cost kind.
        kept_score: total score of the kept directions (dense layers count all theirs).
        solver: "greedy" or "exact" (the dynamic program found a strictly better total score).
    """

    def __init__(self, ranks: Mapping[str, int] | None = None, *, dense: Iterable[str] = (), kept_cost: float = 0,
                 total_cost: float = 0, budget: float = 1.0, cost: str = "params", kept_score: float = 0.0,
                 solver: str = "greedy") -> None:
        super().__init__(ranks or {})
        self.dense = list(dense)
        self.kept_cost = kept_cost
        self.total_cost = total_cost
        self.budget = budget
        self.cost = cost
        self.kept_score = kept_score
        self.solver = solver

    @property
    def fraction(self) -> float:
        """``kept_cost / total_cost``: the fraction of the dense cost actually kept (<= budget)."""
        return self.kept_cost / self.total_cost if self.total_cost else 0.0

    def __repr__(self) -> str:
        ranks = ", ".join(f"{k!r}: {v}" for k, v in self.items())
        return (f"RankAllocation(cost={self.cost!r}, budget={self.budget:g}, fraction={self.fraction:.4f}, "
                f"solver={self.solver!r}, ranks={{{ranks}}}, dense={self.dense!r})")

    def __reduce__(self):
        return (_rebuild_allocation, (dict(self), self.__dict__.copy()))


def _rebuild_allocation(ranks: dict, attrs: dict) -> RankAllocation:
    out = RankAllocation(ranks)
    out.__dict__.update(attrs)
    return out


# ---------------------------------------------------------------------- targets
def find_target_layers(
    model: nn.Module,
    target_modules: str | Iterable[str] = "all-linear",
    exclude_modules: str | Iterable[str] | None = None,
) -> list[str]:
    """Names of the ``nn.Linear`` and :class:`LowRankLinear` modules the target rules select, in model order
    (:func:`lrcomp.replace.find_target_linears` with ``include_lowrank=True``)."""
    return find_target_linears(model, target_modules, exclude_modules, include_lowrank=True)


# ---------------------------------------------------------------------- scores
def _linear_scores(name: str, module: nn.Linear, kind: str, layer_stats: Mapping | None) -> list[float]:
    """Descending per-direction scores of a dense layer: ``sigma_i(W)^2`` or ``sigma_i(W L)^2``."""
    W = module.weight.detach().to("cpu", torch.float64)
    if not torch.isfinite(W).all():
        raise ValueError(f"layer {name!r}: weight has non-finite values (nan or inf)")
    if kind == "whitened":
        cov = layer_stats["input_cov"]
        if not isinstance(cov, Tensor) or tuple(cov.shape) != (W.shape[1], W.shape[1]):
            shape = tuple(cov.shape) if isinstance(cov, Tensor) else type(cov).__name__
            raise ValueError(f"stats[{name!r}]['input_cov'] must be a [{W.shape[1]}, {W.shape[1]}] tensor, got {shape}")
        L, _ = shifted_cholesky(cov.detach().to("cpu", torch.float64), name=f"stats[{name!r}]['input_cov']")
        W = W @ L
    # sigma_i^2 = eigenvalues of the smaller Gram matrix (2-3x faster than svdvals in fp64 here,
    # abs. error ~1e-16 sigma_max^2: irrelevant to the allocation).
    gram = W.T @ W if W.shape[0] >= W.shape[1] else W @ W.T
    energy = torch.linalg.eigvalsh(gram).clamp_(min=0.0).flip(0)
    return energy.tolist()


def _lowrank_scores(name: str, module: LowRankLinear, kind: str) -> list[float]:
    """Descending scores of the active directions of a LowRankLinear (importance, else ``(S * mask)^2``)."""
    with torch.no_grad():
        active = module.active.detach().cpu()
        if kind == "importance" and module.importance is not None:
            values = module.importance.detach().to("cpu", torch.float64)
            if tuple(values.shape) != (module.rank,):
                raise ValueError(f"layer {name!r}: importance must have shape [{module.rank}], got "
                                 f"{tuple(values.shape)}")
        else:
            values = module.d.detach().to("cpu", torch.float64).square()
        values = values[active]
    if not torch.isfinite(values).all():
        raise ValueError(f"layer {name!r}: importance / singular values have non-finite entries")
    if values.numel() == 0:
        raise ValueError(f"layer {name!r}: every direction of this LowRankLinear is pruned (no active direction)")
    return torch.sort(values, descending=True, stable=True).values.tolist()


def importance_keep_mask(layer: LowRankLinear, rank: int) -> Tensor:
    """Bool mask ``[layer.rank]`` of the ``rank`` active directions the allocator counted as kept.

    The allocator ranks a LowRankLinear's active directions by ``importance`` (``(S * mask)^2``
    without one), ties by index; this selects the top ``rank`` of that order, for ``prune_(mask)``.
    """
    if not isinstance(layer, LowRankLinear):
        raise TypeError(f"layer must be a LowRankLinear, got {type(layer).__name__}")
    with torch.no_grad():
        values = layer.importance if layer.importance is not None else layer.d.square()
        values = values.detach().to(torch.float64).clone()
        values[~layer.active] = -math.inf
        order = torch.sort(values, descending=True, stable=True).indices
        mask = torch.zeros(layer.rank, dtype=torch.bool, device=layer.active.device)
        mask[order[: max(0, min(int(rank), int(layer.active.sum())))]] = True
    return mask


# ---------------------------------------------------------------------- problem
@dataclass
class _Layer:
    """One layer of the knapsack: ranks ``lo..hi`` (each an option) and optionally "dense".

    ``cost[r]`` is the integer cost of rank r (index 0 unused), ``prefix[r]`` the score kept at
    rank r, ``prefix[-1]`` the score of the dense layer (= everything it has).
    """

    name: str
    cost: list[int]
    dense_cost: int
    prefix: list[float]
    lo: int
    hi: int
    dense_ok: bool
    forced_dense: bool

    def options(self) -> list[tuple[int, float, int]]:
        """(cost, score, rank or -1 for dense) of every state the layer may take, cheapest first."""
        opts = [] if self.forced_dense else [(self.cost[r], self.prefix[r], r) for r in range(self.lo, self.hi + 1)]
        if self.dense_ok or self.forced_dense:
            opts.append((self.dense_cost, self.prefix[-1], -1))
        return opts


def _make_layer(name: str, scores: list[float], lowrank_cost, dense_cost: int, min_rank: int) -> _Layer:
    avail = len(scores)
    cost = [0] + [lowrank_cost(r) for r in range(1, avail + 1)]
    prefix = [0.0]
    for s in scores:
        prefix.append(prefix[-1] + s)
    be = next((r for r in range(1, avail + 1) if cost[r] >= dense_cost), None)
    lo = min(min_rank, avail)
    useful = max(lo, sum(1 for s in scores if s > 0))
    if be is not None and lo >= be:
        return _Layer(name, cost, dense_cost, prefix, lo, lo, dense_ok=True, forced_dense=True)
    hi = useful if be is None else min(useful, be - 1)
    dense_ok = be is not None and be <= useful
    return _Layer(name, cost, dense_cost, prefix, lo, hi, dense_ok, forced_dense=False)


_DENSE = -1


def _greedy(layers: list[_Layer], cap: int) -> tuple[list[int], int]:
    """Greedy by marginal gain per unit cost; returns (state per layer: rank or -1 = dense, kept cost)."""
    state = [_DENSE if lay.forced_dense else lay.lo for lay in layers]
    kept = sum(lay.dense_cost if s == _DENSE else lay.cost[s] for lay, s in zip(layers, state, strict=True))
    heap: list[tuple[float, int, int, int, float]] = []

    def push(i: int) -> None:
        lay, r = layers[i], state[i]
        if r == _DENSE:
            return
        if r < lay.hi:
            gain, cost, nxt = lay.prefix[r + 1] - lay.prefix[r], lay.cost[r + 1] - lay.cost[r], r + 1
        elif lay.dense_ok:
            gain, cost, nxt = lay.prefix[-1] - lay.prefix[r], lay.dense_cost - lay.cost[r], _DENSE
        else:
            return
        if gain <= 0:
            return
        ratio = math.inf if cost <= 0 else gain / cost
        heapq.heappush(heap, (-ratio, i, nxt, cost, gain))

    for i in range(len(layers)):
        push(i)
    while heap:
        _, i, nxt, cost, _ = heapq.heappop(heap)
        if kept + cost > cap:
            continue  # blocks layer i: its directions must be bought in order
        kept += cost
        state[i] = nxt
        push(i)
    return state, kept


def _exact(layers: list[_Layer], cap: int, max_units: int) -> list[int] | None:
    """Exact multiple-choice knapsack by dynamic programming over budget units, or None when too large."""
    options = [lay.options() for lay in layers]
    base = sum(opts[0][0] for opts in options)
    extra = cap - base
    weights = [[c - opts[0][0] for c, _, _ in opts] for opts in options]
    g = 0
    for ws in weights:
        for w in ws:
            g = math.gcd(g, w)
    if g == 0:
        return None  # every option costs the same as the minimum: the greedy is trivially optimal
    units = min(extra // g, sum(max(ws) for ws in weights) // g)
    n_opts = sum(len(o) for o in options)
    if units > max_units or n_opts * (units + 1) > _EXACT_MAX_WORK:
        return None
    width = units + 1
    dp = torch.zeros(width, dtype=torch.float64)
    choices = []
    idx_dtype = torch.int16 if max(len(o) for o in options) < 2**15 else torch.int32
    for opts, ws in zip(options, weights, strict=True):
        best, arg = _maxplus_step(dp, [x // g for x in ws], [s for _, s, _ in opts])
        dp = best
        choices.append(arg.to(idx_dtype))
    state = [0] * len(layers)
    u = units
    for i in range(len(layers) - 1, -1, -1):
        j = int(choices[i][u])
        state[i] = options[i][j][2]
        u -= int(weights[i][j] // g)
    return state


def _maxplus_step(dp: Tensor, w: list[int], v: list[float]) -> tuple[Tensor, Tensor]:
    """One layer of the DP: ``best[u] = max_j dp[u - w_j] + v_j`` (``-inf`` when ``w_j > u``) and its argmax j.

    ``w[0] = 0`` (the cheapest state). Rank options of params/FLOPs costs have equally spaced
    weights ``w_j = j * step``: they are read as one strided view of ``dp`` (no index tensors),
    ``rows x width`` at a time; any other option (dense, latency costs) is one shifted slice each.
    """
    width = dp.shape[0]
    best = torch.full((width,), -math.inf, dtype=torch.float64)
    arg = torch.zeros(width, dtype=torch.int64)
    step = w[1] - w[0] if len(w) > 1 else 0
    run = 1
    if step > 0:
        while run < len(w) and w[run] == run * step:
            run += 1
    if run > 1:
        # Row i of the view is dp shifted right by (run - 1 - i) * step: option j = run - 1 - i.
        pad = (run - 1) * step
        padded = torch.cat([torch.full((pad,), -math.inf, dtype=torch.float64), dp])
        v_rev = torch.tensor(v[:run][::-1], dtype=torch.float64)
        rows = max(1, _DP_CHUNK_ELEMENTS // width)
        for i0 in range(0, run, rows):
            i1 = min(run, i0 + rows)
            view = padded.as_strided((i1 - i0, width), (step, 1), i0 * step)
            val, i = (view + v_rev[i0:i1, None]).max(dim=0)
            better = val > best
            best = torch.where(better, val, best)
            arg = torch.where(better, run - 1 - (i + i0), arg)
        first = run
    else:
        first = 0
    for j in range(first, len(w)):
        wj = w[j]
        if wj >= width:
            continue
        cand = dp[: width - wj] + v[j]
        cur = best[wj:]
        better = cand > cur
        best[wj:] = torch.where(better, cand, cur)
        arg[wj:] = torch.where(better, torch.full_like(arg[wj:], j), arg[wj:])
    return best, arg


def _score(layers: list[_Layer], state: list[int]) -> float:
    return math.fsum(lay.prefix[-1] if s == _DENSE else lay.prefix[s] for lay, s in zip(layers, state, strict=True))


def _kept_cost(layers: list[_Layer], state: list[int]) -> int:
    return sum(lay.dense_cost if s == _DENSE else lay.cost[s] for lay, s in zip(layers, state, strict=True))


def _solve(layers: list[_Layer], cap: int, exact_max_units: int) -> tuple[list[int], str]:
    state, _ = _greedy(layers, cap)
    if exact_max_units > 0:
        exact = _exact(layers, cap, exact_max_units)
        if exact is not None:
            greedy_score, exact_score = _score(layers, state), _score(layers, exact)
            scale = math.fsum(abs(lay.prefix[-1]) for lay in layers)
            if exact_score > greedy_score + 1e-12 * scale and _kept_cost(layers, exact) <= cap:
                return exact, "exact"
    return state, "greedy"


# ---------------------------------------------------------------------- public
def _check_budget(budget: object) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a float in (0, 1], got {type(budget).__name__}")
    budget = float(budget)
    if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
        raise ValueError(f"budget must be a fraction in (0, 1] of the targeted layers' dense cost, got {budget!r}")
    return budget


def allocate_ranks(
    model: nn.Module,
    budget: float,
    *,
    stats: Mapping[str, Mapping[str, Tensor]] | None = None,
    score: str = "auto",
    cost: str = "params",
    cost_table: LatencyTable | None = None,
    min_rank: int = 1,
    target_modules: str | Iterable[str] = "all-linear",
    exclude_modules: str | Iterable[str] | None = None,
    exact_max_units: int = DEFAULT_EXACT_MAX_UNITS,
) -> RankAllocation:
    """Choose every targeted layer's rank (or dense) under one global budget. See the module docstring.

    Args:
        model: holds the targets, ``nn.Linear`` and/or :class:`LowRankLinear` (``K -> N`` each).
        budget: fraction in ``(0, 1]`` of the targets' total dense cost that may be kept.
        stats: ``{layer name: {"input_cov": [K, K], ...}}`` (a ``CalibrationStats`` or a plain dict);
            the input covariance gives whitened scores.
        score: "auto", "energy", "whitened" (nn.Linear only; needs ``input_cov``) or "importance"
            (LowRankLinear only).
        cost: "params", "flops" or "latency" (needs ``cost_table``, a LatencyTable or its JSON path).
        min_rank: directions every factored layer keeps at least (a LowRankLinear keeps at most its
            active rank); taken before anything else.
        target_modules, exclude_modules: as :func:`lrcomp.replace_linears`, LowRankLinear included.
        exact_max_units: largest budget (in gcd-of-cost units) solved exactly by dynamic
            programming after the greedy; 0 = greedy only.

    Returns:
        :class:`RankAllocation`: ``{name: rank}`` for the layers to factor, ``.dense`` for those
        kept dense, and the accounting (``kept_cost <= budget * total_cost``). For a LowRankLinear
        target a rank r means its r most important active directions (:func:`importance_keep_mask`).

    Raises:
        ValueError: bad budget / score / cost / min_rank / cost_table; no target (the message lists
            the linear layers of the model); a budget below what ``min_rank`` already costs (the
            message gives the smallest achievable fraction); missing ``input_cov`` with
            ``score="whitened"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    budget = _check_budget(budget)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int):
        raise TypeError(f"min_rank must be an int, got {type(min_rank).__name__}")
    if min_rank < 1:
        raise ValueError(f"min_rank must be >= 1, got {min_rank}")
    if isinstance(exact_max_units, bool) or not isinstance(exact_max_units, int) or exact_max_units < 0:
        raise ValueError(f"exact_max_units must be an int >= 0, got {exact_max_units!r}")
    if cost == "latency":
        if cost_table is None:
            raise ValueError("cost='latency' needs cost_table: a LatencyTable from measure_latency_table() "
                             "or the path of one saved with to_json()")
        if not isinstance(cost_table, LatencyTable):
            if isinstance(cost_table, (str, bytes)) or hasattr(cost_table, "__fspath__"):
                cost_table = LatencyTable.from_json(cost_table)
            else:
                raise TypeError(f"cost_table must be a LatencyTable or a path, got {type(cost_table).__name__}")
    if stats is not None and not isinstance(stats, Mapping):
        raise TypeError(f"stats must be a mapping layer name -> {{stat name: tensor}}, got {type(stats).__name__}")

    targets = find_target_linears(model, target_modules, exclude_modules, include_lowrank=True, required=True)
    if cost == "latency":
        missing = sorted({(m.in_features, m.out_features) for m in map(model.get_submodule, targets)}
                         - set(cost_table.shapes))
        if missing:
            raise ValueError(f"cost_table has no timings for the target shapes (K, N) {missing}; measured: "
                             f"{cost_table.shapes}")

    layers = []
    kinds = set()
    for name in targets:
        module = model.get_submodule(name)
        K, N = module.in_features, module.out_features
        layer_stats = stats.get(name) if stats is not None else None
        if isinstance(module, LowRankLinear):
            if score == "whitened":
                raise ValueError(f"score='whitened' scores nn.Linear targets; {name!r} is a LowRankLinear (its "
                                 f"directions carry their own importance: use score='auto' or 'importance')")
            kind = "energy" if score == "energy" else "importance"
            scores = _lowrank_scores(name, module, kind)
        else:
            if score == "importance":
                raise ValueError(f"score='importance' needs LowRankLinear targets; {name!r} is an nn.Linear "
                                 f"(factor it with lrcomp.factorize first, or use score='auto')")
            has_cov = layer_stats is not None and "input_cov" in layer_stats
            if score == "whitened" and not has_cov:
                raise ValueError(f"score='whitened' needs stats[{name!r}]['input_cov'] (calibrate the model "
                                 f"with stats=('input_cov',))")
            kind = "whitened" if score == "whitened" or (score == "auto" and has_cov) else "energy"
            scores = _linear_scores(name, module, kind, layer_stats)
        kinds.add(kind)
        if cost == "params":
            lowrank_cost, dense_cost = (lambda r, s=K + N: r * s), K * N
        elif cost == "flops":
            lowrank_cost, dense_cost = (lambda r, s=K + N: 2 * r * s), 2 * K * N
        else:
            lowrank_cost = (lambda r, K=K, N=N: round(cost_table.lowrank_us(K, N, r) * _LATENCY_UNITS_PER_US))
            dense_cost = round(cost_table.dense_us(K, N) * _LATENCY_UNITS_PER_US)
        layers.append(_make_layer(name, scores, lowrank_cost, dense_cost, min_rank))
    if {"energy", "whitened"} <= kinds and score == "auto":
        warnings.warn("score='auto' mixes whitened scores (layers with input_cov in stats) and weight-energy "
                      "scores (layers without): they are not on the same scale", RuntimeWarning, stacklevel=2)

    total = sum(lay.dense_cost for lay in layers)
    # floor of the float product, the way a user checks ``kept_cost <= budget * total_cost``
    # (Fraction(0.3) * 1000 is 299.99999999999998: the exact binary value would lose a unit).
    cap = math.floor(budget * total)
    minimum = sum(lay.dense_cost if lay.forced_dense else lay.cost[lay.lo] for lay in layers)
    if minimum > cap:
        raise ValueError(f"budget={budget:g} is below what min_rank={min_rank} already costs: the smallest "
                         f"achievable fraction of the {cost} is {minimum / total:.6g}")
    state, solver = _solve(layers, cap, exact_max_units)

    unit = _LATENCY_UNITS_PER_US if cost == "latency" else 1
    kept = _kept_cost(layers, state)
    ranks = {lay.name: s for lay, s in zip(layers, state, strict=True) if s != _DENSE}
    dense = [lay.name for lay, s in zip(layers, state, strict=True) if s == _DENSE]
    return RankAllocation(ranks, dense=dense, kept_cost=kept / unit if unit != 1 else kept,
                          total_cost=total / unit if unit != 1 else total, budget=budget, cost=cost,
                          kept_score=_score(layers, state), solver=solver)


# ---------------------------------------------------------------------- greedy vs exact statistic
def _greedy_vs_exact(instances: int = 2000, seed: int = 0) -> dict:
    """Random small instances: how often (and by how much) the greedy alone misses the exact optimum."""
    gen = torch.Generator().manual_seed(seed)
    worse, gaps = 0, []

    def rand_int(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    for _ in range(instances):
        kind = ("params", "flops")[rand_int(0, 1)]
        min_rank = rand_int(1, 3)
        layers = []
        for i in range(rand_int(2, 6)):
            K, N = rand_int(4, 64), rand_int(4, 64)
            scores = torch.exp(2.0 * torch.randn(min(K, N), generator=gen, dtype=torch.float64))
            scores = torch.sort(scores, descending=True).values.tolist()
            f = 2 if kind == "flops" else 1
            layers.append(_make_layer(f"l{i}", scores, lambda r, s=K + N, f=f: f * r * s, f * K * N, min_rank))
        total = sum(lay.dense_cost for lay in layers)
        minimum = sum(lay.dense_cost if lay.forced_dense else lay.cost[lay.lo] for lay in layers)
        budget = 0.05 + 0.95 * float(torch.rand((), generator=gen))
        cap = math.floor(budget * total)
        if minimum > cap:
            cap = minimum + (total - minimum) // 10
        greedy, _ = _greedy(layers, cap)
        exact = _exact(layers, cap, 10**7)
        g, e = _score(layers, greedy), _score(layers, exact)
        if e > g + 1e-12 * math.fsum(lay.prefix[-1] for lay in layers):
            worse += 1
            gaps.append((e - g) / e)
    return {"instances": instances, "greedy_suboptimal": worse, "mean_gap": sum(gaps) / len(gaps) if gaps else 0.0,
            "max_gap": max(gaps, default=0.0)}


if __name__ == "__main__":
    print(_greedy_vs_exact())
