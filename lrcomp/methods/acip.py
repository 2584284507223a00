"""ACIP: any compression via iterative pruning (Genzel et al. 2025, "Choose Your Model Size: Any
Compression by a Single Gradient Descent").

Every target ``W = U diag(S) V`` (exact SVD, frozen) gets a trainable score per singular
direction and a straight-through mask::

    d = S * 1[m > 0]          forward: hard mask;  backward: d relu(m) / dm = 1[m > 0]
    loss = task + lambda_t * sum_layers (K + N) / mean(K + N) * sum_i relu(m_i)

``lambda_t`` grows geometrically from ``lambda_start`` to ``lambda_end`` over the first
``prune_fraction`` of the run (the paper raises the penalty until the target size is met). A
direction whose score reaches 0 is pruned for good: its factors move to a CPU reservoir, the
layer is compacted physically and the optimizer state sliced, so steps get cheaper. When the
targeted layers are at or under the budget the scores freeze and the rest of the run
fine-tunes the (optional) LoRA compensation and the non-target parameters with the masks
fixed. If the budget is not met when the pruning phase ends, the global ranking cuts it. With the
option ``curve_budgets`` (not in the paper) that frozen phase trains at several sizes in turn
(:mod:`lrcomp.methods.acip_curve`); with ``factor_lr > 0`` (not in the paper) it also fine-tunes the live
factors ``U`` and ``V`` at that learning rate (``S`` and the masks stay as they are).

The order in which directions were pruned (earliest = least important; the survivors ranked
by their final score) is a global ranking, so :meth:`ACIP.materialize` builds a model of any
size from one run, putting reservoir directions back where the budget allows.

Differences from the paper: the L1 weight is cost-aware (a direction of a wide layer costs
more parameters), scores have their own learning rate (``score_lr``: the optimizer gets two
parameter groups, the first marked ``SCORE_GROUP``), and a layer costs what it costs deployed: at and past
break-even, ``K N`` (:func:`lrcomp.methods.base.factor_cost`; ``finalize`` makes it an ``nn.Linear``, the
same function). So the budget is not spent on directions of a layer whose factors cost more than its dense
weight, and once the ranking gives a layer that much, ``materialize`` gives it every direction (its dense
weight) at no further cost.

Dense warm-up (option ``warmup_frac``, default 0, not in the paper): the first
``t_w = max(1, round(warmup_frac T))`` steps train the model dense (every target stays ``nn.Linear``,
the score group is empty). After step ``t_w`` the fine-tuned weights are factored (with
``basis="svd_llm"`` the Compressor calibrates the model as it is then), and in the optimizer each
dense weight is replaced by its LoRA factors while the scores join the score group, with fresh state;
the bias is the same Parameter, frozen from then on as in the paper. The penalty schedule and the
pruning phase count from ``t_w``: ``lambda_t`` grows over ``prune_fraction (T - t_w)`` steps. A
checkpoint saved after ``t_w`` rebuilds the layers through :meth:`ACIP.restore_structure`.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from lrcomp.compression.factorizations import factorize
from lrcomp.layers.lowrank_linear import LowRankLinear
from lrcomp.methods.acip_curve import CurveBranch
from lrcomp.methods.base import (
    JointMethod,
    check_warmup_frac,
    densify_past_break_even,
    factor_cost,
    marked_group,
    swap_params_in_optimizer,
    weight_cost,
)

ACIP_BASES = ("svd", "svd_llm")
#: key marking the scores' parameter group in an optimizer built from ``comp.parameters()``
SCORE_GROUP = "lrcomp_acip_scores"
#: key marking the group of the factors U, V (option ``factor_lr``), trained from the frozen phase on
FACTOR_GROUP = "lrcomp_acip_factors"


@dataclasses.dataclass
class ACIPOptions:
    lambda_start: float = 1e-4  # penalty weight at step 0
    lambda_end: float = 10.0  # penalty weight at the end of the pruning phase (geometric growth)
    prune_fraction: float = 0.6  # share of total_steps in which the penalty grows and directions are pruned
    score_init: float = 1.0  # initial score m of every direction (mask on)
    score_lr: float = 0.02  # learning rate of the scores (own parameter group)
    # score given to a direction whose score crossed 0 in the step that reached the budget but which the
    # budget does not require pruning (it stays, as the weakest survivor, and the scores freeze)
    revive_score: float = 1e-3
    # LoRA compensation rank per layer (0: none). The paper's released configuration trains rank-32 adapters
    # (alpha 16); 8 here: on MiniLM (validation, one seed) rank 32 won at 0.3 (0.751 vs 0.736) but lost at 0.8
    # (0.736 vs 0.749), and one run's materialised curve turned downward (0.729 at 0.8 from 0.751 at 0.3).
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # The frozen factorisation: "svd" (the paper's plain SVD of W) or "svd_llm" (SVD of W whitened by the
    # input covariance, which needs calibration data: a pruned direction then costs its exact share of the
    # output error on that data instead of its share of ||W||).
    basis: str = "svd"
    # Share of total_steps trained dense before the fine-tuned weights are factored (not in the paper, whose
    # default 0 factors the pretrained weights at setup); the penalty schedule starts at the boundary.
    warmup_frac: float = 0.0
    # Budgets above `budget` that the frozen phase also trains at, in turn with `budget` (not in the paper; see
    # lrcomp.methods.acip_curve): for a run whose materialize() serves several sizes. () = the paper.
    curve_budgets: tuple[float, ...] = ()
    # Learning rate of the live factors U and V in the frozen phase (not in the paper, whose U and V stay frozen;
    # 0 = frozen). They get their own parameter group (marked ``FACTOR_GROUP``): the LoRA learning rate that suits
    # the scores' run is far too large for a full fine-tune of the factors. On MiniLM it did not help (validation,
    # one run, seeds 0-2, lr 2e-3, factor_lr 1e-4: 0.742 / 0.733 / 0.715 at 0.8 / 0.5 / 0.3 against 0.742 / 0.729 /
    # 0.714 frozen; benchmarks/results/raw/quality_cpu_val_acip_factor_lr.jsonl), so the default stays the paper's.
    factor_lr: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lambda_start", "lambda_end", "score_init", "score_lr", "lora_alpha", "revive_score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"acip option {name} must be a positive number, got {value!r}")
        if self.lambda_end < self.lambda_start:
            raise ValueError(f"acip option lambda_end ({self.lambda_end}) must be >= lambda_start "
                             f"({self.lambda_start})")
        if isinstance(self.prune_fraction, bool) or not isinstance(self.prune_fraction, (int, float)) \
                or not 0 < self.prune_fraction <= 1:
            raise ValueError(f"acip option prune_fraction must be in (0, 1], got {self.prune_fraction!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"acip option lora_rank must be an int >= 0, got {self.lora_rank!r}")
        if self.basis not in ACIP_BASES:
            raise ValueError(f"acip option basis must be one of {ACIP_BASES}, got {self.basis!r}")
        if isinstance(self.factor_lr, bool) or not isinstance(self.factor_lr, (int, float)) \
                or not math.isfinite(self.factor_lr) or self.factor_lr < 0:
            raise ValueError(f"acip option factor_lr must be a number >= 0, got {self.factor_lr!r}")
        check_warmup_frac(self.warmup_frac, "acip")
        budgets = self.curve_budgets
        if not isinstance(budgets, (list, tuple)) or any(
                isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1 for b in budgets):
            raise ValueError(f"acip option curve_budgets must be a list of budgets in (0, 1], got {budgets!r}")
        self.curve_budgets = tuple(sorted({float(b) for b in budgets}, reverse=True))


class ACIP(JointMethod):
    name = "acip"
    Options = ACIPOptions

    def __init__(self, compressor) -> None:
        super().__init__(compressor)
        if self.options.basis == "svd_llm":  # instance attribute: the Compressor reads it after __init__
            self.needed_stats = ("input_cov",)
        budget = compressor.config.budget
        if any(b <= budget for b in self.options.curve_budgets):
            raise ValueError(f"acip option curve_budgets must all be above the run's budget ({budget:g}), got "
                             f"{list(self.options.curve_budgets)}")
        self.curve: CurveBranch | None = None  # the frozen phase's branch (curve_budgets), built by _freeze

    def setup(self, stats) -> None:
        self.origin: dict[str, torch.Tensor] = {}  # original direction index of every live direction
        self.reservoir: dict[str, dict[int, tuple]] = {}  # pruned directions: index -> (U col, S, V row)
        self.order: list[tuple[str, int, int, float]] = []  # (layer, index, step, score) in pruning order
        self.frozen = False
        self.factored = False
        self._check_lora_fits()
        costs = [self.model.get_submodule(n).in_features + self.model.get_submodule(n).out_features
                 for n in self.comp.targets]
        self.cost_weight = {n: c / (sum(costs) / len(costs)) for n, c in zip(self.comp.targets, costs, strict=True)}
        if self.boundary == 0:
            self.factor_layers(stats)

    @torch.no_grad()
    def factor_layers(self, stats) -> None:
        """Replace every target by its masked factorisation (frozen ``U, S, V``, scores at ``score_init``, LoRA)."""
        opts = self.options
        for name in self.comp.targets:
            linear = self.model.get_submodule(name)
            if opts.basis == "svd":
                layer = LowRankLinear.from_linear(linear, None, mask_fn="ste")
            else:
                layer = factorize(linear, None, method=opts.basis, stats=stats[name])
                layer.mask_fn = "ste"
            layer.scores.fill_(opts.score_init)
            self._install(name, linear, layer)
        self.factored = True

    def _install(self, name: str, linear: nn.Linear, layer: LowRankLinear) -> None:
        """Put ``layer`` (its LoRA added here) in place of ``linear``: the same bias Parameter, frozen; in an
        attached optimizer the dense weight is replaced by the LoRA factors and the scores join the score group."""
        for p in (layer.U, layer.S, layer.V):
            p.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        if self.options.lora_rank:
            layer.add_lora(min(self.options.lora_rank, layer.rank), self.options.lora_alpha)
        optimizer = self.comp.optimizer
        if optimizer is not None:
            scores = marked_group(optimizer, SCORE_GROUP, "acip score")
            factors = marked_group(optimizer, FACTOR_GROUP, "acip factor") if self.options.factor_lr else None
            swap_params_in_optimizer(optimizer, linear.weight,
                                     [layer.lora_A, layer.lora_B] if layer.lora_A is not None else [])
            scores["params"].append(layer.scores)
            if factors is not None:
                factors["params"] += self._factors([layer])
        self.model.set_submodule(name, layer.train(linear.training))
        self.origin[name] = torch.arange(layer.rank)
        self.reservoir[name] = {}
        self.rebind_feature_taps()

    def restore_structure(self, structure) -> None:
        """Before a checkpoint saved after the warm-up is loaded: full-rank layers (the checkpoint's rank and
        values are loaded next) put in place of the dense targets, the optimizer changed as at the boundary."""
        if self.factored or not any(info["type"] == "lowrank" for info in structure.values()):
            return
        for name in self.comp.targets:
            linear = self.model.get_submodule(name)
            K, N = linear.in_features, linear.out_features
            layer = LowRankLinear(K, N, min(K, N), bias=linear.bias is not None, mask_fn="ste",
                                  device=linear.weight.device, dtype=linear.weight.dtype)
            self._install(name, linear, layer)
        self.factored = True

    def _stats(self):
        return self.comp.calibration_stats() if self.needed_stats else None

    def _check_lora_fits(self) -> None:
        """Raise before any layer is replaced when the LoRA compensation (counted in the budget) leaves no room
        for one direction per layer."""
        lora = self.options.lora_rank
        if not lora:
            return
        shapes = [(m.in_features, m.out_features) for m in map(self.model.get_submodule, self.comp.targets)]
        floor = sum((min(lora, K, N) + 1) * (K + N) for K, N in shapes)
        limit = self.comp.config.budget * self.comp.total_cost
        if floor > limit:
            raise ValueError(f"budget={self.comp.config.budget:g} cannot be reached with acip option lora_rank={lora}: "
                             f"the LoRA factors plus one direction per layer keep {floor / self.comp.total_cost:.4f} "
                             f"of the targeted weights; lower lora_rank (0: no LoRA) or raise the budget")

    def trainable_parameters(self):
        layers = self.lowrank_layers().values()
        scores = [layer.scores for layer in layers]
        groups = [{"params": scores, "lr": self.options.score_lr, SCORE_GROUP: True}]
        if self.options.factor_lr:  # U and V from the start (frozen until the scores freeze): fixed group sizes
            groups.append({"params": self._factors(layers), "lr": self.options.factor_lr, FACTOR_GROUP: True})
        ids = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        # during a dense warm-up the score (and factor) group is empty; the layers' parameters join at the boundary
        return [*groups, {"params": rest}]

    @staticmethod
    def _factors(layers) -> list[nn.Parameter]:
        return [p for layer in layers for p in (layer.U, layer.V)]

    @property
    def prune_end(self) -> float:
        """The step at which the pruning phase ends: ``prune_fraction`` of the steps after the warm-up."""
        return self.boundary + self.options.prune_fraction * (self.total_steps - self.boundary)

    def penalty_weight(self, step: int) -> float:
        """``lambda_t``: geometric from lambda_start (at the warm-up's end) to lambda_end over the pruning phase."""
        opts = self.options
        p = min(max(step - self.boundary, 0) / max(self.prune_end - self.boundary, 1e-9), 1.0)
        return opts.lambda_start * (opts.lambda_end / opts.lambda_start) ** p

    def penalty(self):
        if self.frozen or not self.factored:
            return None
        lam = self.penalty_weight(self.comp.step_count)
        terms = [self.cost_weight[n] * torch.relu(layer.scores).sum() for n, layer in self.lowrank_layers().items()]
        return lam * torch.stack(terms).sum()

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        if not self.factored:
            if step >= self.boundary:
                self.factor_layers(self._stats())
            return
        if self.frozen:
            return
        layers = self.lowrank_layers()
        # Directions whose score reached 0, least important (lowest score) first, across all layers.
        dying = []
        for name, layer in layers.items():
            dead = (layer.scores <= 0) & layer.active
            if not bool(dead.any()):
                continue
            if int(dead.sum()) == layer.rank:  # keep at least one direction: the best of the dying ones
                dead[int(layer.scores.argmax())] = False
            dying += [(float(layer.scores[i]), name, i) for i in dead.nonzero().flatten().tolist()]
        dying.sort(key=lambda t: t[0])
        # Prune only down to the budget: the penalty can push many scores through 0 in one step, and
        # pruning them all would leave the model well under its budget for the rest of the run. The
        # ones not needed revive with a tiny positive score (the weakest survivors) and the scores freeze.
        # The cost with the dying directions back (kept_cost counts only those with d != 0), then without
        # them one by one; a layer past break-even saves nothing until it falls under it (factor_cost).
        count = {n: layer.active_rank + self._lora_rank(n) for n, layer in layers.items()}
        for _, name, _ in dying:
            count[name] += 1
        total = self._cost(count)
        limit = self.comp.config.budget * self.comp.total_cost
        cut = 0
        while cut < len(dying) and total > limit:
            name = dying[cut][1]
            K, N = layers[name].in_features, layers[name].out_features
            total -= factor_cost(K, N, count[name]) - factor_cost(K, N, count[name] - 1)
            count[name] -= 1
            cut += 1
        for _, name, i in dying[cut:]:
            layers[name].scores[i] = self.options.revive_score
        masks = {}
        for score, name, i in dying[:cut]:
            layer = layers[name]
            origin = int(self.origin[name][i])
            self.order.append((name, origin, step, score))
            self.reservoir[name][origin] = (layer.U[:, i].cpu().clone(), float(layer.S[i]), layer.V[i].cpu().clone())
            masks.setdefault(name, torch.ones(layer.rank, dtype=torch.bool, device=layer.active.device))[i] = False
        for name, keep in masks.items():
            layers[name].prune_(keep)
            self.origin[name] = self.origin[name][keep.cpu()]
        if masks:
            self.comp.compact()
        if self.comp.kept_cost() <= self.comp.config.budget * self.comp.total_cost:
            self._freeze()
        elif step >= self.prune_end:
            self._apply(self.materialize_ranks(self.comp.config.budget, alive_only=True))  # the ranking cuts the rest
            self._freeze()

    def _freeze(self, curve: bool = True) -> None:
        self.frozen = True
        self._freeze_scores()
        self._build_curve(curve)

    def _freeze_scores(self) -> None:
        """Scores frozen; with ``factor_lr`` the live factors train from now on."""
        for layer in self.lowrank_layers().values():
            layer.scores.requires_grad_(False)
            layer.scores.grad = None
            if self.options.factor_lr:
                layer.U.requires_grad_(True)
                layer.V.requires_grad_(True)

    def _build_curve(self, build: bool = True) -> None:
        """With ``curve_budgets``, once frozen: the branch of the frozen phase, (re)built from the ranking and
        reservoir as they are now. ``build=False``: only remove the branch there is."""
        if self.curve is not None:
            self.curve.remove()
            self.curve = None
        if build and self.options.curve_budgets and self.frozen:
            self.curve = CurveBranch(self)

    # ------------------------------------------------------------------ global ranking
    def ranking(self) -> list[tuple[str, int]]:
        """Every direction (layer, original index), most important first: survivors by score (equal scores by
        singular value), then the pruned ones from the last pruned to the first."""
        alive = []
        layers = self.lowrank_layers()  # a target Compressor.finalize made dense has no directions left to rank
        for name, layer in layers.items():
            live = len(self.origin[name])  # past them: LoRA folded in by finalize
            scores, svals = layer.scores.tolist()[:live], layer.S.tolist()[:live]
            alive += [(float(s), sv, name, int(o)) for s, sv, o in zip(scores, svals, self.origin[name], strict=True)]
        alive.sort(key=lambda t: (-t[0], -t[1]))
        return [(n, o) for _, _, n, o in alive] + [(n, o) for n, o, _, _ in reversed(self.order) if n in layers]

    def materialize_ranks(self, budget: float, alive_only: bool = False) -> dict[str, list[int]]:
        """Original direction indices each layer keeps at ``budget``: the ranking's prefix that fits, exactly.

        ``alive_only``: choose among the directions the training model still has (no reservoir), as
        cutting the training model itself must (it can only lose directions).
        """
        if not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget!r}")
        layers = self.lowrank_layers()
        limit = budget * self.comp.total_cost
        chosen: dict[str, list[int]] = {n: [] for n in layers}
        alive = {(n, int(o)) for n in layers for o in self.origin[n]}
        ranking = [(n, o) for n, o in self.ranking() if not alive_only or (n, o) in alive]
        # every layer first keeps its best direction (a layer cannot have rank 0), then the ranking fills the rest
        for name, origin in ranking:
            if not chosen[name]:
                chosen[name].append(origin)
        taken = {(n, c[0]) for n, c in chosen.items() if c}
        count = {n: len(c) + self._lora_rank(n) for n, c in chosen.items()}
        spent = self._cost(count)
        for name, origin in ranking:
            if (name, origin) in taken:
                continue
            K, N = layers[name].in_features, layers[name].out_features
            extra = factor_cost(K, N, count[name] + 1) - factor_cost(K, N, count[name])  # 0 once past break-even
            if spent + extra <= limit:
                chosen[name].append(origin)
                taken.add((name, origin))
                count[name] += 1
                spent += extra
        if spent > limit:
            raise ValueError(f"budget={budget:g} is below what one direction per layer costs "
                             f"({spent / self.comp.total_cost:.4f} of the targeted weights with the LoRA factors)")
        return chosen

    def _lora_rank(self, name: str) -> int:
        """Rank-one terms of layer ``name`` beside its ranked directions: its LoRA factors, or after
        ``finalize`` the LoRA directions merged into it."""
        layer = self.model.get_submodule(name)
        return layer.lora_A.shape[0] if layer.lora_A is not None else layer.rank - len(self.origin[name])

    def _cost(self, count: dict[str, int]) -> int:
        """The targeted weights with ``count[name]`` rank-one terms in each low-rank layer (the rest as they are)."""
        total = 0
        for name in self.comp.targets:
            layer = self.model.get_submodule(name)
            total += factor_cost(layer.in_features, layer.out_features, count[name]) if name in count \
                else weight_cost(layer)
        return total

    @torch.no_grad()
    def _apply(self, chosen: dict[str, list[int]], model: nn.Module | None = None) -> None:
        """Rebuild each layer of ``model`` (default: the training model) with exactly the ``chosen`` directions."""
        model = self.model if model is None else model
        for name, keep in chosen.items():
            layer = model.get_submodule(name)
            live = {int(o): i for i, o in enumerate(self.origin[name])}
            merged = range(len(self.origin[name]), layer.rank)  # LoRA folded in by finalize: always kept
            keep = sorted(keep)
            if all(o in live for o in keep):  # only removals: prune in place (optimizer state follows)
                mask = torch.zeros(layer.rank, dtype=torch.bool)
                mask[[live[o] for o in keep]] = True
                mask[list(merged)] = True
                if model is self.model:  # the run's own bookkeeping: ranking and reservoir
                    for i in (~mask).nonzero().flatten().tolist():
                        origin = int(self.origin[name][i])
                        self.order.append((name, origin, self.comp.step_count, float(layer.scores[i])))
                        self.reservoir[name][origin] = (layer.U[:, i].cpu().clone(), float(layer.S[i]),
                                                        layer.V[i].cpu().clone())
                    self.origin[name] = self.origin[name][mask]
                layer.prune_(mask.to(layer.active.device))
                layer.compact_(self.comp.optimizer if model is self.model else None)
                continue
            if model is self.model:
                raise RuntimeError("ACIP can only remove directions from the training model; use materialize()")
            new = copy.deepcopy(layer)
            rows = [live[o] if o in live else None for o in keep] + list(merged)
            keep = keep + [None] * len(merged)
            U = torch.stack([layer.U[:, r] if r is not None else self.reservoir[name][o][0].to(layer.U)
                             for o, r in zip(keep, rows, strict=True)], 1)
            S = torch.tensor([float(layer.S[r]) if r is not None else self.reservoir[name][o][1]
                              for o, r in zip(keep, rows, strict=True)], dtype=layer.S.dtype, device=layer.S.device)
            V = torch.stack([layer.V[r] if r is not None else self.reservoir[name][o][2].to(layer.V)
                             for o, r in zip(keep, rows, strict=True)], 0)
            new.U, new.S, new.V = (nn.Parameter(t, requires_grad=False) for t in (U, S, V))
            new.scores = nn.Parameter(torch.full_like(S, self.options.score_init), requires_grad=False)
            new.active = torch.ones(len(keep), dtype=torch.bool, device=layer.active.device)
            new.importance = None
            model.set_submodule(name, new)

    def materialize(self, budget: float) -> nn.Module:
        """A compact copy of the model at ``budget`` (fraction of the targeted weights), from the global ranking.

        Smaller budgets drop the least important directions; larger ones (up to what the run
        kept plus every pruned direction) put reservoir directions back; a layer that reaches
        break-even is dense (an ``nn.Linear`` of all its directions). The training model is not
        changed.
        """
        if not self.factored:
            raise RuntimeError(f"acip has not factored the model yet: its dense warm-up runs until step "
                               f"{self.boundary} (now {self.comp.step_count})")
        model = copy.deepcopy(self.model)
        if self.curve is not None:
            self.curve.strip(model)
        chosen = self.materialize_ranks(budget)
        self._apply(chosen, model)
        for name in chosen:
            model.get_submodule(name).merge_lora_()
        densify_past_break_even(model, chosen)  # a layer given every direction it can have: its dense weight
        return model

    def finalize(self) -> nn.Module:
        """The compact model at the budget. Before the warm-up's end: the model is factored now and cut by
        singular value (every score is still ``score_init``)."""
        if not self.factored:
            self.factor_layers(self._stats())
        if self.comp.kept_cost() > self.comp.config.budget * self.comp.total_cost:
            self._apply(self.materialize_ranks(self.comp.config.budget, alive_only=True))
        self._freeze(curve=False)  # the final model is the one at the budget: no branch
        self.comp.compact()
        for layer in self.lowrank_layers().values():  # the LoRA compensation becomes q more directions (same cost)
            layer.merge_lora_()
        return self.model

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        state = {"factored": self.factored, "frozen": self.frozen, "order": self.order,
                 "reservoir_index": {n: sorted(r) for n, r in self.reservoir.items()},
                 "reservoir_S": {n: [r[o][1] for o in sorted(r)] for n, r in self.reservoir.items()}}
        for name, origin in self.origin.items():
            state[f"origin.{name}"] = origin
        for name, res in self.reservoir.items():
            if res:
                state[f"resU.{name}"] = torch.stack([res[o][0] for o in sorted(res)], 1)
                state[f"resV.{name}"] = torch.stack([res[o][2] for o in sorted(res)], 0)
        return state

    def load_state_dict(self, state) -> None:
        self.factored = bool(state.get("factored", True))
        if not self.factored:
            self._build_curve(build=False)  # a branch of the run this one continued from
            return
        self.frozen = bool(state["frozen"])
        self.order = [tuple(t) for t in state["order"]]
        for name in self.comp.targets:
            self.origin[name] = state[f"origin.{name}"].cpu().long()
            index, svals = state["reservoir_index"][name], state["reservoir_S"][name]
            self.reservoir[name] = {}
            if index:
                U, V = state[f"resU.{name}"].cpu(), state[f"resV.{name}"].cpu()
                self.reservoir[name] = {o: (U[:, j].clone(), s, V[j].clone())
                                        for j, (o, s) in enumerate(zip(index, svals, strict=True))}
        if self.frozen:
            self._freeze_scores()
        self._build_curve()
