"""LPAF: low-rank prune-and-factorize (Ren & Zhu 2023, "Low-Rank Prune-And-Factorize for Language
Model Compression").

Three phases over ``total_steps = T``:

1. **First-order pruning** for the first ``t_1 = round(prune_frac T)`` steps. Every target
   ``W [N, K]`` becomes a :class:`MaskedLinear` (``y = x (W * mask)^T + b``, ``mask`` a bool buffer)
   and accumulates at every backward pass the first-order (Taylor) score and the movement score of
   Sanh et al. 2020,

       F <- F + |W * dL/dW'|,   S <- S - W * dL/dW'   (W' = W * mask: straight-through, pruned weights keep a score)

   and prunes by ``F`` (option ``prune_score="first_order"``, the default) or by ``S`` ("movement").

   After every step the ``k(t) = round(s(t) N K)`` weights of lowest score are masked, with the cubic
   schedule of Zhu & Gupta 2017 between a warm-up and a cool-down (``t_w = round(warmup_frac t_1)``,
   ``t_f = t_1 - round(cooldown_frac t_1)``)::

       s(t) = 0 (t <= t_w),   s_f (1 - (1 - (t - t_w) / (t_f - t_w))^3) (t_w < t < t_f),   s_f (t >= t_f)

   so at ``t_1`` each layer has exactly ``round(s_f N K)`` weights masked.
2. **Sparsity-aware SVD initialisation and mixed-rank allocation** at step ``t_1``: each sparse
   ``W * mask`` is factored by :func:`lrcomp.factorize` ``method="sparsity_aware"`` with the element
   importance ``|S| * mask`` (``importance="movement"``) or the accumulated first-order importance
   ``sum_t |W * dL/dW'| * mask`` (``importance="first_order"``); pruned weights weigh nothing. With the
   option ``input_metric`` the row errors are measured in the metric of the layer's inputs instead
   (factorize's ``input_metric``), with the input covariance calibrated at ``t_1`` on the pruned model. The
   global allocator (:func:`lrcomp.allocate_ranks`, score = the factorisation's importance, cost
   ``config.cost``, budget ``config.budget``; or ``allocation="uniform"``) gives every layer its own
   rank, and each layer keeps its top directions as a :class:`LowRankLinear` (``U, S, V`` train, the
   mask scores do not). Layers the allocator keeps dense stay :class:`MaskedLinear` with the mask
   released (all ones; their masked weights restart from 0) and train densely; :meth:`LPAF.finalize`
   turns them into plain ``nn.Linear``.
3. **Mixed-rank fine-tuning** of the factors (and everything else that trains) to ``T``.

Optimizer: the dense weight of a factored layer leaves ``comp.optimizer`` and its ``U, S, V`` take its
place in the same parameter group with fresh state (:func:`swap_params_in_optimizer`); the bias is
the same ``Parameter`` object before and after, so its state carries on. Checkpoints after the
boundary rebuild this structure through :meth:`LPAF.restore_structure`.

Differences from the paper (whose text was not available offline, so the following is stated rather
than checked): "mixed-rank" here means per-layer ranks from one global, cost-aware budget; the
weighted low-rank problem is solved with the rank-1 surrogate of the importance matrix that
``sparsity_aware`` documents; the default final sparsity is ``1 - budget`` (prune as much as the
factorisation will remove); the ranks are fixed from the boundary on (no progressive rank pruning in
phase 3). The scores are accumulated per optimizer step: a tensor hook sums ``W * dL/dW'`` over the
step's backward passes (gradient accumulation: the step's whole gradient; a model run twice per step,
activation checkpointing, counts its gradient twice) and :meth:`LPAF.on_step` folds the sum ``P`` in,
``S -= P``, ``F += |P|``; a budget counted in latency that keeps more parameters than the budget falls
back to a parameter allocation (with a warning).

Under ``torch.distributed`` (DDP) the hook sees the rank's *local* gradient, so ``P`` is averaged over
the ranks (one all-reduce per masked layer and step) before it is folded in: every rank holds the same
scores, prunes the same weights and, with ``W`` identical on every rank, ``mean_r(W * g_r) = W * mean_r(g_r)``
is what one process computes from DDP's averaged gradient. The rank allocation is broadcast from rank 0.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrcomp import distributed as dist_utils
from lrcomp.compression.allocate import allocate_ranks, importance_keep_mask
from lrcomp.compression.cost import resolve_cost_table
from lrcomp.compression.factorizations import factorize
from lrcomp.compression.oneshot import _uniform_ranks
from lrcomp.layers.lowrank_linear import LowRankLinear
from lrcomp.methods.base import JointMethod, swap_params_in_optimizer, swapped_modules
from lrcomp.methods.schedules import decay

IMPORTANCES = ("movement", "first_order")


@dataclasses.dataclass
class LPAFOptions:
    target_sparsity: float | None = None  # final unstructured sparsity s_f of phase 1 (None: 1 - budget)
    prune_frac: float = 0.5  # share of total_steps spent in phase 1 (pruning); the rest fine-tunes the factors
    # Warm-up / cool-down of the cubic schedule as shares of phase 1 (Sanh et al. 2020 keep the model
    # dense at first and hold the final sparsity at the end; Zhu & Gupta 2017's cubic ramp in between).
    warmup_frac: float = 0.1
    cooldown_frac: float = 0.2
    importance: str = "movement"  # element importance of the sparsity-aware SVD: "movement" or "first_order"
    # The score that phase 1 prunes by: "first_order" (sum |W dL/dW'|, a Taylor estimate of each weight's
    # effect on the loss) or "movement" (-sum W dL/dW', Sanh et al. 2020). Movement pruning needs long
    # runs: in the 200-step MiniLM selection runs (benchmarks/results/raw/quality_gpu_selection_b05.json) it left
    # the model at chance for every learning rate tried, first-order reached 0.753 validation accuracy.
    prune_score: str = "first_order"
    min_scale: float = 1e-6  # floor of the row / column importance sums (factorize's sparsity_aware option)
    # Measure each row's factorisation error in the metric of the layer's inputs (factorize's sparsity_aware
    # option input_metric: svd_llm's whitening, rows weighted by importance) instead of the column importance.
    # Needs calib_data: the input covariance is calibrated at the boundary, on the pruned model.
    input_metric: bool = False

    def __post_init__(self) -> None:
        ts = self.target_sparsity
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts < 1):
            raise ValueError(f"lpaf option target_sparsity must be None or a fraction in [0, 1), got {ts!r}")
        if isinstance(self.prune_frac, bool) or not isinstance(self.prune_frac, (int, float)) \
                or not 0 < self.prune_frac < 1:
            raise ValueError(f"lpaf option prune_frac must be in (0, 1), got {self.prune_frac!r}")
        for name in ("warmup_frac", "cooldown_frac"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"lpaf option {name} must be in [0, 1), got {value!r}")
        if self.warmup_frac + self.cooldown_frac >= 1:
            raise ValueError(f"lpaf options warmup_frac + cooldown_frac must be < 1 (room for the cubic ramp), got "
                             f"{self.warmup_frac} + {self.cooldown_frac}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"lpaf option importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if self.prune_score not in IMPORTANCES:
            raise ValueError(f"lpaf option prune_score must be one of {IMPORTANCES}, got {self.prune_score!r}")
        if isinstance(self.min_scale, bool) or not isinstance(self.min_scale, (int, float)) \
                or not 0 < self.min_scale <= 1:
            raise ValueError(f"lpaf option min_scale must be in (0, 1], got {self.min_scale!r}")
        if not isinstance(self.input_metric, bool):
            raise ValueError(f"lpaf option input_metric must be True or False, got {self.input_metric!r}")


class MaskedLinear(nn.Linear):
    """``y = x (W * mask)^T + b`` with movement-score accumulation.

    Buffers (in the state dict, so checkpoints carry them): ``mask`` bool ``[N, K]``; ``movement``
    fp32 ``[N, K]``, ``S = -sum W * dL/dW'``; ``first_order`` fp32 ``[N, K]``, ``sum |W * dL/dW'|``
    (``W' = W * mask``, accumulated at every backward pass while ``track`` is True).

    With ``defer`` True (set by :class:`LPAF`) the backward passes only sum ``W * dL/dW'`` into a pending
    tensor, which :meth:`flush_scores` folds into the scores (after averaging it over the ranks).
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> MaskedLinear:
        """A masked layer sharing ``linear``'s weight and bias Parameters (mask all ones)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        shape, device = linear.weight.shape, linear.weight.device
        layer.register_buffer("mask", torch.ones(shape, dtype=torch.bool, device=device))
        layer.register_buffer("movement", torch.zeros(shape, dtype=torch.float32, device=device))
        layer.register_buffer("first_order", torch.zeros(shape, dtype=torch.float32, device=device))
        layer.track = True
        layer.defer = False
        layer._pending = None
        return layer.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight * self.mask
        if self.track and torch.is_grad_enabled() and weight.requires_grad:
            weight.register_hook(self._accumulate)
        return F.linear(x, weight, self.bias)

    @torch.no_grad()
    def _accumulate(self, grad: Tensor) -> None:
        step = self.weight.detach().float() * grad.float()
        if self.defer:
            if self._pending is None:
                self._pending = step
            else:
                self._pending.add_(step)
            return
        self.movement.sub_(step)
        self.first_order.add_(step.abs())

    @torch.no_grad()
    def flush_scores(self, distributed: bool = False) -> None:
        """Fold the pending ``P = sum W * dL/dW'`` in: ``movement -= P``, ``first_order += |P|``.

        ``distributed``: average ``P`` over the ranks first (a collective whenever the layer tracks a
        trainable weight, so every rank calls it, with zeros if it ran no backward pass).
        """
        pending, self._pending = self._pending, None
        if distributed and self.track and self.weight.requires_grad:
            if pending is None:
                pending = torch.zeros_like(self.movement)
            dist_utils.all_reduce_mean_(pending)
        if pending is not None:
            self.movement.sub_(pending)
            self.first_order.add_(pending.abs())

    @torch.no_grad()
    def prune_to(self, count: int, score: str = "movement") -> None:
        """Mask exactly the ``count`` weights of lowest ``score`` ("movement" or "first_order"; ties: lower
        flat index first)."""
        order = torch.argsort(getattr(self, score).flatten(), stable=True)
        mask = torch.ones(self.mask.numel(), dtype=torch.bool, device=self.mask.device)
        mask[order[:count]] = False
        self.mask.copy_(mask.view_as(self.mask))

    @torch.no_grad()
    def release_mask(self) -> None:
        """Dense from now on: the masked weights restart from 0, every weight trains, no more scores."""
        self.weight.mul_(self.mask)
        self.mask.fill_(True)
        self.track = False

    @torch.no_grad()
    def sparse_copy(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding a frozen copy of ``W * mask`` and sharing the bias Parameter."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device=self.weight.device,
                           dtype=self.weight.dtype)
        linear.weight.requires_grad_(False).copy_(self.weight * self.mask)
        linear.bias = self.bias
        return linear.train(self.training)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W * mask`` (same Parameter objects)."""
        with torch.no_grad():
            self.weight.mul_(self.mask)
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear.train(self.training)


class LPAF(JointMethod):
    """See the module docstring: first-order pruning, sparsity-aware SVD, mixed-rank fine-tuning."""

    name = "lpaf"
    Options = LPAFOptions

    def __init__(self, compressor) -> None:
        super().__init__(compressor)
        if self.options.input_metric:  # instance attribute: the Compressor reads it after __init__
            self.needed_stats = ("input_cov",)

    # ------------------------------------------------------------------ schedule
    @property
    def boundary(self) -> int:
        """``t_1``: the step at which phase 1 ends and the layers are factored."""
        return max(1, round(self.options.prune_frac * self.total_steps))

    @property
    def final_sparsity(self) -> float:
        ts = self.options.target_sparsity
        return 1.0 - self.comp.config.budget if ts is None else float(ts)

    def sparsity(self, step: int) -> float:
        """``s(t)``: the cubic schedule of phase 1 (see the module docstring)."""
        t1 = self.boundary
        tw = round(self.options.warmup_frac * t1)
        tf = max(t1 - round(self.options.cooldown_frac * t1), tw + 1)
        if step <= tw:
            return 0.0
        if step >= tf:
            return self.final_sparsity
        return self.final_sparsity * (1.0 - decay("cubic", (step - tw) / (tf - tw)))

    def pruned_count(self, step: int, numel: int) -> int:
        return round(self.sparsity(step) * numel)

    # ------------------------------------------------------------------ hooks
    def setup(self, stats) -> None:
        self.factored = False
        self.ranks: dict[str, int] = {}
        for name in self.comp.targets:
            layer = MaskedLinear.from_linear(self.model.get_submodule(name))
            layer.defer = True  # per-step scores, averaged over the ranks under torch.distributed
            self.model.set_submodule(name, layer)

    def masked_layers(self) -> dict[str, MaskedLinear]:
        return {n: m for n in self.comp.targets if isinstance(m := self.model.get_submodule(n), MaskedLinear)}

    def flush_scores(self) -> None:
        """Fold this step's pending scores into every masked layer (rank-averaged under torch.distributed)."""
        distributed = dist_utils.is_distributed()
        for layer in self.masked_layers().values():
            layer.flush_scores(distributed)

    def on_step(self, step: int) -> None:
        self.flush_scores()
        if self.factored:
            return
        if step <= self.boundary:
            for layer in self.masked_layers().values():
                layer.prune_to(self.pruned_count(step, layer.weight.numel()), self.options.prune_score)
        if step >= self.boundary:
            self.factorize_layers()

    @torch.no_grad()
    def _allocate(self) -> dict[str, int]:
        config = self.comp.config
        if config.allocation == "uniform":
            return _uniform_ranks(self.model, self.comp.targets, config.budget)
        table = resolve_cost_table(config.cost_table)
        kw = {"score": "importance", "min_rank": config.min_rank, "target_modules": self.comp._exact()}
        ranks = allocate_ranks(self.model, config.budget, cost=config.cost, cost_table=table, **kw)
        kept = sum(ranks[n] * (m.in_features + m.out_features) if n in ranks else m.in_features * m.out_features
                   for n, m in ((n, self.model.get_submodule(n)) for n in self.comp.targets))
        if kept > config.budget * self.comp.total_cost:
            # The Compressor checks the budget in parameters; a latency allocation may keep more.
            warnings.warn(f"lpaf: the {config.cost} allocation keeps {kept / self.comp.total_cost:.4f} of the "
                          f"targeted weights, over budget={config.budget:g}: allocating by parameters instead",
                          RuntimeWarning, stacklevel=2)
            ranks = allocate_ranks(self.model, config.budget, cost="params", **kw)
        return dict(ranks)

    def _allocate_everywhere(self) -> dict[str, int]:
        """:meth:`_allocate`, computed on every rank (the allocator may communicate) and then rank 0's result
        on all of them: the layers' new shapes must agree for DDP."""
        return dist_utils.broadcast_object(self._allocate())

    @torch.no_grad()
    def factorize_layers(self) -> None:
        """Phase 2: sparsity-aware SVD of every masked layer, global rank allocation, optimizer swap."""
        masked = self.masked_layers()
        sparse = {name: layer.sparse_copy() for name, layer in masked.items()}
        with swapped_modules(self.model, sparse):  # the masked layers are back afterwards
            # input_metric: the inputs as the pruned model produces them (plain nn.Linear: calibration targets)
            stats = self.comp.calibration_stats() if self.options.input_metric else None
            full = {}
            for name, layer in masked.items():
                source = layer.movement.abs() if self.options.importance == "movement" else layer.first_order
                element = source.to(torch.float64) * layer.mask
                full[name] = factorize(sparse[name], None, method="sparsity_aware", importance=element,
                                       min_scale=self.options.min_scale, input_metric=self.options.input_metric,
                                       stats=None if stats is None else stats[name])
                self.model.set_submodule(name, full[name])
            ranks = self._allocate_everywhere()
        for name, layer in masked.items():
            if name not in ranks:
                layer.release_mask()
                continue
            lowrank = full[name].prune_(importance_keep_mask(full[name], ranks[name])).compact_()
            self._install(name, layer, lowrank)
        self.ranks = ranks
        self.factored = True
        self.rebind_feature_taps()

    def _install(self, name: str, dense: MaskedLinear, lowrank: LowRankLinear) -> None:
        """Put ``lowrank`` in place of ``dense``: shared bias, frozen scores, weight -> U, S, V in the optimizer."""
        lowrank.bias = dense.bias
        lowrank.scores.requires_grad_(False)
        for p in (lowrank.U, lowrank.S, lowrank.V):
            p.requires_grad_(dense.weight.requires_grad)
        new = [lowrank.U, lowrank.S, lowrank.V] if dense.weight.requires_grad else []
        if dense.weight.requires_grad:
            swap_params_in_optimizer(self.comp.optimizer, dense.weight, new)
        self.model.set_submodule(name, lowrank.train(dense.training))

    def restore_structure(self, structure) -> None:
        """Before a checkpoint is loaded: rebuild the phase-2 structure it was saved with (values come from it)."""
        if self.factored or not any(info["type"] == "lowrank" for info in structure.values()):
            return
        masked = self.masked_layers()
        for name, info in structure.items():
            layer = masked[name]
            if info["type"] != "lowrank":
                layer.release_mask()
                continue
            lowrank = LowRankLinear(layer.in_features, layer.out_features, info["rank"], bias=layer.bias is not None,
                                    device=layer.weight.device, dtype=layer.weight.dtype)
            self._install(name, layer, lowrank)
            self.ranks[name] = info["rank"]
        self.factored = True
        self.rebind_feature_taps()

    def finalize(self) -> nn.Module:
        """Factor now if phase 2 has not happened; plain ``nn.Linear`` for the dense layers; compact."""
        self.flush_scores()
        if not self.factored:
            self.factorize_layers()
        for name, layer in self.masked_layers().items():
            self.model.set_submodule(name, layer.to_linear())
        return super().finalize()

    def state_dict(self):
        return {"factored": self.factored, "ranks": dict(self.ranks)}

    def load_state_dict(self, state) -> None:
        self.factored = bool(state.get("factored", False))
        self.ranks = dict(state.get("ranks", {}))
        for layer in self.masked_layers().values():
            layer.track = not self.factored


