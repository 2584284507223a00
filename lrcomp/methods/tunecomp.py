"""TuneComp: joint fine-tuning and compression by gradual distillation into a pruned low-rank student.

Chen, Liu, Wang, Brand, Wang, Koike-Akino (2025), "TuneComp: Joint Fine-tuning and Compression for
Large Foundation Models". Every targeted linear layer (``W0 [N, K]`` frozen) becomes

    y = alpha_t * (W0 x) + sqrt(1 - alpha_t^2) * (U diag(d) V x) + b,
    alpha_t = 1 - sin(pi t / 2T)  for t <= T,  0 after

held by a :class:`LowRankLinear` (``dense_scale = alpha_t``, ``lowrank_scale = sqrt(1 - alpha_t^2)``,
which keeps the output power of the two branches). ``T = decay_ratio * total_steps``; at ``T``
the dense branch is dropped.

- Initialisation: activation-aware SVD of ``W0`` (``init_method``: "svd_llm", whitened by the input
  covariance, Wang et al. 2024; or "asvd", scaled by the mean input magnitude, Yuan et al. 2023),
  at initial ranks chosen by the global allocator :func:`lrcomp.allocate_ranks` for the fraction
  ``min(1, init_rank_multiple * budget)`` of the targets' dense cost (each layer capped below its
  break-even rank ``ceil(K N / (K + N))``, where the low-rank form would cost more than W0).
- Progressive pruning: ``pruning_events`` events, evenly spaced until ``prune_end * total_steps``.
  Event k targets the kept fraction ``b_k = budget + (b_0 - budget) (1 - k / E)^3`` (the cubic
  schedule of Zhu & Gupta 2017; ``b_0`` the initial fraction, ``b_E = budget``); the global
  allocator splits it over the layers by importance and the least important directions are
  pruned, then physically removed (``comp.compact()``, optimizer state sliced). Ranks only go down.
  Importance of direction i (refreshed before every event): its per-token output energy
  ``d_i^2 ||U_:,i||^2 (V_i C V_i^T)`` with ``C`` the calibrated input covariance, which equals the
  SVD-LLM importance ``sigma_i^2`` at initialisation and is comparable across layers.
- Distillation from the frozen dense teacher: logit KL (``default_distill_weight``), optional feature MSE.

Differences from the paper: the paper mixes the biases too (``alpha_t (W0 x + b0) + alpha'_t (W x + b)``);
here the layer keeps one trainable bias initialised at ``b0`` (same output at ``t = 0``). The paper's
pruning is a hard shrinkage of the student's singular values with a decaying regulariser; here it is
the cubic budget schedule above with a global allocation at each event (exact budget accounting,
physical compaction). The input covariance used by the importance comes from the calibration of
the pretrained model and is not updated during the run, unless option ``recalibrate`` (not in the paper)
calibrates it again on the model as it is before every pruning event.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lrcomp.compression.allocate import allocate_ranks, importance_keep_mask
from lrcomp.compression.factorizations import factorize
from lrcomp.methods.base import JointMethod, swapped_modules
from lrcomp.methods.schedules import decay

TUNECOMP_INITS = ("svd_llm", "asvd")


def _fraction(name: str, value: object, *, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
            (0.0 < value if low_open else 0.0 <= value) and value <= 1.0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be a fraction in {interval} of total_steps, got {value!r}")
    return float(value)


@dataclasses.dataclass
class TuneCompOptions:
    """Options of ``method="tunecomp"`` (``CompressionConfig.method_options``).

    Attributes:
        decay_ratio: ``T / total_steps``: the fraction of the run over which alpha_t goes from 1 to 0.
        init_method: activation-aware SVD of the initialisation: "svd_llm" or "asvd".
        init_rank_multiple: the student starts at ``min(1, init_rank_multiple * budget)`` of the dense
            cost (global allocation) and is pruned down to ``budget``.
        prune_end: fraction of ``total_steps`` at which the last pruning event reaches the budget.
        pruning_events: number of pruning events (each followed by a compaction).
        asvd_alpha: exponent of the ASVD scaling (``init_method="asvd"``).
        normalize_mix: divide both branch scales by ``alpha_t + sqrt(1 - alpha_t^2)`` (see below).
        recalibrate: calibrate the input covariances again before every pruning event (see below).
    """

    # T: the decay covers the first half of the run, the student alone is tuned afterwards.
    decay_ratio: float = 0.5
    # The paper initialises the student by activation-aware SVD of the pretrained weights.
    init_method: str = "svd_llm"
    init_rank_multiple: float = 2.0
    # Pruning happens during the distillation and ends before the last quarter of fine-tuning.
    prune_end: float = 0.75
    pruning_events: int = 10
    # ASVD's default exponent (Yuan et al. 2023).
    asvd_alpha: float = 0.5
    # The paper's scales alpha_t and sqrt(1 - alpha_t^2) sum to up to sqrt(2) (at alpha_t = 1/sqrt(2)):
    # with an activation-aware init the student's output is close to the teacher's, so every targeted
    # layer's output is inflated by up to 41% in the middle of the transition. On MiniLM that left the
    # mean-pooled embeddings at cosine 0.52 (alpha 0.9) and 0.35 (alpha 0.71) to the dense ones, and
    # training stayed at chance until the dense branch was gone. Normalising keeps the paper's ratio of
    # the two branches and their end points, and the output continuous (exact when student == W0).
    normalize_mix: bool = True
    # Not in the paper: the importance's input covariance C comes from the pretrained model; True calibrates
    # it again (calib_data through the model as it is, both branches) before every pruning event, so the
    # pruning weighs the directions by the inputs the fine-tuned layers now see. It did not help on the quality
    # bench (MiniLM, validation, seed 0: 0.727 / 0.682 at 0.5 / 0.3 against 0.731 / 0.709 without).
    recalibrate: bool = False

    def __post_init__(self) -> None:
        self.decay_ratio = _fraction("decay_ratio", self.decay_ratio)
        self.prune_end = _fraction("prune_end", self.prune_end)
        if self.init_method not in TUNECOMP_INITS:
            raise ValueError(f"init_method must be one of {TUNECOMP_INITS}, got {self.init_method!r}")
        if isinstance(self.init_rank_multiple, bool) or not isinstance(self.init_rank_multiple, (int, float)) or \
                not (math.isfinite(self.init_rank_multiple) and self.init_rank_multiple >= 1.0):
            raise ValueError(f"init_rank_multiple must be a finite number >= 1, got {self.init_rank_multiple!r}")
        self.init_rank_multiple = float(self.init_rank_multiple)
        if isinstance(self.pruning_events, bool) or not isinstance(self.pruning_events, int) or \
                self.pruning_events < 1:
            raise ValueError(f"pruning_events must be an int >= 1, got {self.pruning_events!r}")
        if isinstance(self.asvd_alpha, bool) or not isinstance(self.asvd_alpha, (int, float)) or \
                not (math.isfinite(self.asvd_alpha) and self.asvd_alpha >= 0):
            raise ValueError(f"asvd_alpha must be a finite number >= 0, got {self.asvd_alpha!r}")
        for flag in ("normalize_mix", "recalibrate"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")


def alpha_at(step: int, transition_steps: int) -> float:
    """``alpha_t = 1 - sin(pi t / 2T)`` for ``t < T``, exactly 0 from ``T`` on."""
    return 0.0 if step >= transition_steps else decay("sine", step / transition_steps)


def _below_break_even(K: int, N: int) -> int:
    """Largest rank whose low-rank cost ``r (K + N)`` is below the dense ``K N`` (at least 1)."""
    return max(1, min(min(K, N), math.ceil(K * N / (K + N)) - 1))


class TuneComp(JointMethod):
    """TuneComp (Chen et al. 2025): ``alpha_t W0 x + sqrt(1 - alpha_t^2) low-rank x``, pruned progressively."""

    name: ClassVar[str] = "tunecomp"
    Options: ClassVar[type] = TuneCompOptions
    needed_stats: ClassVar[tuple[str, ...]] = ("input_cov",)
    # The paper distils the teacher's predictions into the student throughout the run.
    default_distill_weight: ClassVar[float] = 1.0
    default_feature_weight: ClassVar[float] = 0.0

    def __init__(self, compressor) -> None:
        super().__init__(compressor)
        if self.options.init_method == "asvd":  # instance attribute: the Compressor reads it after __init__
            self.needed_stats = ("input_cov", "input_abs_mean")
        self.alpha = 1.0
        self.events_done = 0
        self.initial_fraction = 1.0
        self._cov: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ schedules
    @property
    def transition_steps(self) -> int:
        """``T`` in optimizer steps (at least 1)."""
        return max(1, round(self.options.decay_ratio * self.total_steps))

    def event_steps(self) -> list[int]:
        """Optimizer steps after which the pruning events run (increasing, the last at ``prune_end``)."""
        end = max(1, round(self.options.prune_end * self.total_steps))
        E = self.options.pruning_events
        return [max(1, round(k * end / E)) for k in range(1, E + 1)]

    def target_fraction(self, event: int) -> float:
        """Kept fraction after pruning event ``event`` (1-based): cubic from the initial fraction to the budget."""
        budget = self.comp.config.budget
        start = max(self.initial_fraction, budget)
        if event >= self.options.pruning_events:
            return budget
        return budget + (start - budget) * decay("cubic", event / self.options.pruning_events)

    # ------------------------------------------------------------------ hooks
    def setup(self, stats) -> None:
        model, opts, comp = self.model, self.options, self.comp
        init_fraction = min(1.0, opts.init_rank_multiple * comp.config.budget)
        alloc = allocate_ranks(model, init_fraction, stats=stats, score="whitened", target_modules=comp._exact())
        for name in comp.targets:
            linear = model.get_submodule(name)
            K, N = linear.in_features, linear.out_features
            rank = min(alloc.get(name, K * N), _below_break_even(K, N))
            layer_stats = stats[name]
            options = {"alpha": opts.asvd_alpha} if opts.init_method == "asvd" else {}
            layer = factorize(linear, rank, method=opts.init_method, stats=layer_stats, **options)
            layer.scores.requires_grad_(False)  # no mask: the scores are unused
            layer.attach_dense(linear.weight.detach().clone(), scale=1.0)
            layer.lowrank_scale = 0.0  # sqrt(1 - alpha_0^2)
            self._cov[name] = layer_stats["input_cov"].to(device=layer.V.device, dtype=torch.float64)
            model.set_submodule(name, layer)
        self.initial_fraction = self._lowrank_cost() / comp.total_cost
        self.alpha = 1.0
        self.events_done = 0

    def _lowrank_cost(self) -> int:
        return sum(layer.active_rank * (layer.in_features + layer.out_features)
                   for layer in self.lowrank_layers().values())

    def recalibrate(self) -> None:
        """Input covariances of the low-rank targets from ``calib_data`` on the model as it is now.

        Each target is calibrated as the ``nn.Linear`` of its current weight (:meth:`LowRankLinear.to_linear`:
        both branches at their scales), so its input is what the model now feeds it. Collective under
        torch.distributed, like every calibration.
        """
        layers = self.lowrank_layers()
        with swapped_modules(self.model, {name: layer.to_linear() for name, layer in layers.items()}):
            stats = self.comp.calibration_stats()
        for name, layer in layers.items():
            self._cov[name] = stats[name]["input_cov"].to(device=layer.V.device, dtype=torch.float64)

    @torch.no_grad()
    def refresh_importance(self) -> None:
        """Importance of every direction: its output energy per token ``d_i^2 ||U_:,i||^2 V_i C V_i^T``."""
        for name, layer in self.lowrank_layers().items():
            V = layer.V.detach().to(torch.float64)
            energy_in = ((V @ self._cov[name]) * V).sum(1).clamp_min(0.0)
            energy_out = layer.U.detach().to(torch.float64).square().sum(0)
            score = layer.d.detach().to(torch.float64).square() * energy_out * energy_in
            layer.importance = score.float()

    def prune_to(self, fraction: float) -> int:
        """Prune the low-rank targets to ``fraction`` of the dense cost (global allocation), then compact."""
        if self.options.recalibrate:
            self.recalibrate()
        self.refresh_importance()
        alloc = allocate_ranks(self.model, fraction, score="importance", target_modules=self.comp._exact())
        for name, layer in self.lowrank_layers().items():
            rank = alloc.get(name)
            if rank is None:  # "dense" for a low-rank target: keep what costs less than W0
                rank = min(layer.active_rank, _below_break_even(layer.in_features, layer.out_features))
            layer.prune_(importance_keep_mask(layer, rank))
        return self.comp.compact()

    def _set_scales(self) -> None:
        for layer in self.lowrank_layers().values():
            if self.alpha == 0.0:
                if layer.dense_weight is not None:
                    layer.drop_dense()
                layer.lowrank_scale = 1.0
            else:
                dense, lowrank = self.alpha, math.sqrt(1.0 - self.alpha * self.alpha)
                total = dense + lowrank if self.options.normalize_mix else 1.0
                layer.dense_scale = dense / total
                layer.lowrank_scale = lowrank / total

    def on_step(self, step: int) -> None:
        self.alpha = alpha_at(step, self.transition_steps)
        self._set_scales()
        events = self.event_steps()
        while self.events_done < len(events) and step >= events[self.events_done]:
            self.events_done += 1
            self.prune_to(self.target_fraction(self.events_done))

    def finalize(self) -> nn.Module:
        """Drop W0, fold ``lowrank_scale`` into S, prune to the budget if the run stopped early, compact."""
        with torch.no_grad():
            for layer in self.lowrank_layers().values():
                layer.drop_dense()
                if layer.lowrank_scale != 1.0:
                    layer.S.mul_(layer.lowrank_scale)
                    layer.lowrank_scale = 1.0
        self.alpha = 0.0
        if self._lowrank_cost() > self.comp.config.budget * self.comp.total_cost:
            self.events_done = self.options.pruning_events
            self.prune_to(self.comp.config.budget)
        self.comp.compact()
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "events_done": self.events_done, "initial_fraction": self.initial_fraction}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = float(state.get("alpha", self.alpha))
        self.events_done = int(state.get("events_done", self.events_done))
        self.initial_fraction = float(state.get("initial_fraction", self.initial_fraction))
