"""JACTUS: joint task-aware compression in a union of subspaces, with a trainable core.

Calibration gives every target ``W [N, K]`` its input covariance ``C = E[x x^T]`` and its
output-gradient covariance ``G = E[g g^T]`` (``g = dL/dy``, so it needs the task loss). The
union-of-subspaces factorisation (:func:`lrcomp.factorize` ``method="jactus_union"``) confines the
rank-r approximation to ``span(P_out) x span(P_in)``, where ``P_in`` unites W's top right singular
vectors with C's top eigenvectors and ``P_out`` W's top left singular vectors with G's top
eigenvectors, and solves there ``min E||x W^T - x W_r^T||^2`` exactly (whitened SVD)::

    W_r = U diag(s) V,   U [N, r] = P_out U',   V [r, K] = V'^T L_p^{-1} P_in^T

The ranks come from the cost-aware global allocator (:func:`lrcomp.allocate_ranks`, one budget
for the model, cost ``config.cost``; or ``allocation="uniform"``): it scores the directions of the
full-rank factorisation (importance = the exact per-token output-error reduction), then every
factored layer is refactored at its allocated rank (the union depends on r). Layers the
allocator keeps dense stay ``nn.Linear`` and train normally.

Training: the bases ``U``, ``V`` are frozen and a small core ``M [r, r]`` (initialised to
``diag(s)``) trains in the union, ``W(t) = U M(t) V``::

    y = x (U M V)^T + b      computed as   lowrank_linear(x, M V, 1, U, b)   (K <= N)
                                      or   lowrank_linear(x, V, 1, U M, b)   (K > N)

The core goes on the smaller side, so a step costs one extra ``r^2 min(K, N)`` GEMM forward
(and two backward: ``dM`` and the gradient through the product) next to the ``r (K + N)`` per
token of the low-rank layer; for r = 64 and K = 384 that is 1.6 M multiply-adds per step, shared
by the whole batch. The core's ``r^2`` parameters exist only during training: :meth:`JACTUS.finalize`
folds it into the factors through its SVD ``M = a diag(m) b^T`` (``U <- U a``, ``S <- m``,
``V <- b^T V``), so the deployed layers are plain :class:`LowRankLinear` holding ``r (K + N)``
weights, which is what the budget counts (the Compressor's accounting ignores the core).

Reference: JACTUS as the issue specifies it (calibrated input and output-gradient covariances, the
union-of-subspaces factorisation, a core trained in that union, the cost-aware global allocator);
no paper text was available offline to check further details against, so none are claimed. Choices
made here: only the core, the biases of the factored layers (option ``train_bias``) and the
non-target parameters train (dense-kept targets train fully; option ``train_bases``, not in the
specification, trains ``U`` and ``V`` too); nothing is pruned during training, so the ranks are
fixed at the factorisation and no compaction happens; a budget counted in latency must also hold
in parameters (the Compressor checks parameters), else the factorisation raises.

Gradient-weighted output error (option ``grad_metric`` ``b``, default 0, not in the specification): the
factorisation and the allocator's importance weigh the output error by ``(1 - b) I + b G / mean eig(G)``
instead of ``I``, so the union's rank-r optimum keeps what moves the task loss rather than the outputs alike
(see :mod:`lrcomp.compression.factorizations`); ``U`` is then not orthonormal, which the core does not need.

Dense warm-up (option ``warmup_frac``, default 0, not in the specification): the first
``t_w = max(1, round(warmup_frac T))`` steps train the model dense (every target stays ``nn.Linear``);
after step ``t_w`` the Compressor calibrates the model as it is then (``calib_data`` again, in eval mode;
under FSDP on the plain model), and the layers are factored and allocated as above. Each factored layer's
dense weight leaves the optimizer and the core takes its place with fresh state
(:func:`lrcomp.methods.base.swap_params_in_optimizer`); the bias is the same Parameter, so its state
carries on. A checkpoint saved after ``t_w`` rebuilds the cores through :meth:`JACTUS.restore_structure`.

Learning rate of the cores (option ``core_lr``, default None, not in the specification): the cores (with
``train_bases`` also ``U``, ``V``) train in a parameter group of their own at that lr, marked
:data:`CORE_GROUP` (empty during a dense warm-up; they join it at ``t_w``), so a warm-up can run at the lr
that suits the dense fine-tune while the ``r x r`` cores, whose Adam steps move the weight far less, take a
larger one. None keeps them in the group of the weight they replace.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from lrcomp import distributed as dist_utils
from lrcomp.compression.allocate import allocate_ranks
from lrcomp.compression.cost import resolve_cost_table
from lrcomp.compression.factorizations import factorize
from lrcomp.compression.oneshot import _uniform_ranks
from lrcomp.layers.lowrank_linear import LowRankLinear
from lrcomp.methods.base import JointMethod, check_warmup_frac, marked_group, swap_params_in_optimizer
from lrcomp.ops import lowrank_linear

#: key marking the parameter group of the cores (option ``core_lr``) in an optimizer built from ``comp.parameters()``
CORE_GROUP = "lrcomp_jactus_cores"


@dataclasses.dataclass
class JACTUSOptions:
    # Union sizes as fractions of the rank r (the defaults of factorize("jactus_union")): the weight's
    # top r singular vectors always (so the union contains plain SVD's subspaces), plus r/2
    # eigenvectors of the input covariance and r/2 of the gradient covariance.
    weight_frac: float = 1.0
    input_frac: float = 0.5
    grad_frac: float = 0.5
    tol: float = 1e-8  # orthonormalisation tolerance of the union
    shift_eps: float = 1e-8  # eigenvalue shift of the projected input covariance when it is not PD
    train_bias: bool = True  # the biases of the factored layers train with the core
    # The bases U, V train too (not in the method as specified: the union is then only where training
    # starts). The core's r^2 weights are all that adapts otherwise, against r (K + N) for the methods that
    # train their factors.
    train_bases: bool = False
    # Share of total_steps trained dense (every target an nn.Linear) before the layers are calibrated and
    # factored (not in the method as specified, whose default 0 factors the pretrained weights at setup).
    # The output-gradient covariance is then taken through a trained head, and the union holds the
    # fine-tuned weight's subspaces, as the sequential baselines' factorisation does after their first half.
    warmup_frac: float = 0.0
    # Weight of the output-gradient covariance in the metric of the output error (factorize("jactus_union")
    # option of the same name; not in the method as specified, whose 0 weighs every output alike):
    # H = (1 - grad_metric) I + grad_metric G / (tr(G) / N), the Kronecker-factored proxy of the loss change.
    grad_metric: float = 0.0
    # Learning rate of what trains in place of each factored weight (the core; U and V with train_bases), in a
    # parameter group of its own marked CORE_GROUP (not in the method as specified; None: the optimizer's lr,
    # in the group of the weight it replaces). With a dense warm-up the optimizer's lr suits the fine-tune of
    # the whole model, while a core's r^2 entries move the weight by about lr * r in Frobenius norm per Adam
    # step against lr * sqrt(K N) for the dense weight: the core may want a larger one. On MiniLM it did not help
    # (validation, seed 0, warm-up 0.5, grad_metric 0.5; at 0.5 / 0.3: lr 5e-4 alone 0.749 / 0.711; lr 5e-4 with
    # core_lr 1e-4 0.738 / 0.709, 2e-3 0.740 / 0.716; lr 1e-4 with core_lr 5e-4 0.740 / 0.698, 2e-3 0.731 /
    # 0.702; benchmarks/results/raw/quality_cpu_val_jactus_core_lr_probe.jsonl), so the default stays None.
    core_lr: float | None = None

    def __post_init__(self) -> None:
        for name in ("weight_frac", "input_frac", "grad_frac"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"jactus option {name} must be a finite number >= 0, got {value!r}")
        if self.weight_frac < 1.0:
            raise ValueError(f"jactus option weight_frac must be >= 1 (the union must hold the r directions of the "
                             f"weight to reach rank r), got {self.weight_frac!r}")
        for name in ("tol", "shift_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"jactus option {name} must be a positive number, got {value!r}")
        check_warmup_frac(self.warmup_frac, "jactus")
        value = self.grad_metric
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"jactus option grad_metric must be a number in [0, 1], got {value!r}")
        value = self.core_lr
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"jactus option core_lr must be None or a finite number > 0, got {value!r}")
        for name in ("train_bias", "train_bases"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"jactus option {name} must be a bool, got {getattr(self, name)!r}")

    def union_options(self) -> dict[str, float]:
        return {"weight_frac": self.weight_frac, "input_frac": self.input_frac, "grad_frac": self.grad_frac,
                "tol": self.tol, "shift_eps": self.shift_eps, "grad_metric": self.grad_metric}


class CoreLowRankLinear(LowRankLinear):
    """``y = x (U M V)^T + b`` with frozen bases ``U [N, r]``, ``V [r, K]`` and a trainable core ``M [r, r]``.

    ``S`` is fixed to ones (the singular values start in ``M = diag(s)``); the product with ``M`` is
    taken on the smaller side (``M V`` when ``K <= N``, else ``U M``) and the result goes through
    :func:`lrcomp.ops.lowrank_linear` with ``d = S * active = 1``. :meth:`fold` returns the plain
    :class:`LowRankLinear` ``(U a) diag(m) (b^T V)`` with ``M = a diag(m) b^T``.
    """

    @classmethod
    def from_lowrank(cls, layer: LowRankLinear) -> CoreLowRankLinear:
        """The core layer of ``layer``'s weight (``M = diag(S * active)``); only the core and the bias train."""
        if layer.lora_A is not None or layer.dense_weight is not None or layer.mask_fn != "none":
            raise ValueError("CoreLowRankLinear wraps a plain LowRankLinear (no LoRA, dense branch or mask)")
        core = cls(layer.in_features, layer.out_features, layer.rank, bias=layer.bias is not None,
                   device=layer.V.device, dtype=layer.V.dtype)
        with torch.no_grad():
            core.U.copy_(layer.U)
            core.V.copy_(layer.V)
            core.core.copy_(torch.diag(layer.S.detach() * layer.active.to(layer.S.dtype)))
            if layer.bias is not None:
                core.bias.copy_(layer.bias)
        core.importance = layer.importance
        return core

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, **kwargs) -> None:
        super().__init__(in_features, out_features, rank, bias, **kwargs)
        self.core = nn.Parameter(torch.diag(torch.ones(rank, device=self.V.device, dtype=self.V.dtype)))
        for p in (self.U, self.S, self.V, self.scores):
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        if self.in_features <= self.out_features:
            return lowrank_linear(x, self.core @ self.V, self.d, self.U, self.bias)
        return lowrank_linear(x, self.V, self.d, self.U @ self.core, self.bias)

    @torch.no_grad()
    def fold(self) -> LowRankLinear:
        """The plain low-rank layer with the same weight ``U M V`` (SVD of the core in fp64)."""
        # d = S * active = 1 (S is frozen at ones and nothing is pruned), so the weight is U M V.
        a, m, bt = torch.linalg.svd(self.core.double(), full_matrices=False)
        layer = LowRankLinear(self.in_features, self.out_features, self.rank, bias=self.bias is not None,
                              device=self.V.device, dtype=self.V.dtype)
        layer.U.copy_(self.U.double() @ a)
        layer.S.copy_(m)
        layer.V.copy_(bt @ self.V.double())
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        # Directions ordered by the core's singular values; m^2 is the weight energy in the metric of U.
        layer.importance = m.square().float()
        return layer.train(self.training)

    def num_parameters(self, compact: bool = True) -> int:
        """Deployed count (compact): ``r (K + N)`` (+ bias) as after :meth:`fold`; else every element held."""
        total = super().num_parameters(compact)
        return total if compact else total + self.core.numel()



class JACTUS(JointMethod):
    """See the module docstring: union-of-subspaces factorisation, frozen bases, trainable core."""

    name = "jactus"
    Options = JACTUSOptions
    needed_stats = ("input_cov", "grad_cov")

    def setup(self, stats) -> None:
        self.factored = False
        self.ranks: dict[str, int] = {}
        if self.boundary > 0:
            return  # dense warm-up: every target stays nn.Linear and trains until the boundary
        if stats is None:
            raise ValueError("jactus needs calibration statistics ('input_cov', 'grad_cov'): pass calib_data")
        self.factorize_layers(stats)

    def on_step(self, step: int) -> None:
        if not self.factored and step >= self.boundary:
            self.factorize_layers(self.comp.calibration_stats())

    @torch.no_grad()
    def _allocate(self, stats, originals: dict[str, nn.Linear]) -> dict[str, int]:
        config, opts = self.comp.config, self.options.union_options()
        if config.allocation == "uniform":
            return dict(_uniform_ranks(self.model, self.comp.targets, config.budget))
        # Full rank: the union is the whole space, so the importance is the exact whitened one.
        for name, linear in originals.items():
            self.model.set_submodule(name, factorize(linear, None, method="jactus_union", stats=stats[name], **opts))
        table = resolve_cost_table(config.cost_table)
        try:
            return dict(allocate_ranks(self.model, config.budget, score="importance", cost=config.cost,
                                       cost_table=table, min_rank=config.min_rank,
                                       target_modules=self.comp._exact()))
        finally:
            for name, linear in originals.items():
                self.model.set_submodule(name, linear)

    @torch.no_grad()
    def factorize_layers(self, stats) -> None:
        """Union-of-subspaces factorisation of every target at its allocated rank; cores in the optimizer."""
        missing = [n for n in self.comp.targets if n not in stats or "grad_cov" not in stats[n]
                   or "input_cov" not in stats[n]]
        if missing:
            raise ValueError(f"jactus needs input_cov and grad_cov for every target (grad_cov needs the task "
                             f"loss: pass loss_fn to the Compressor); missing for {missing[:5]}")
        config = self.comp.config
        originals = {n: self.model.get_submodule(n) for n in self.comp.targets}
        # Every rank computes the same statistics (summed over the ranks); rank 0's allocation is used by all.
        ranks = dist_utils.broadcast_object(self._allocate(stats, originals))
        # The Compressor checks the budget in parameters; a latency allocation may keep more.
        kept = sum(ranks[n] * (m.in_features + m.out_features) if n in ranks else m.in_features * m.out_features
                   for n, m in originals.items())
        if kept > config.budget * self.comp.total_cost:
            raise ValueError(f"jactus: the {config.cost} allocation keeps {kept / self.comp.total_cost:.4f} of the "
                             f"targeted weights, over budget={config.budget:g} (the budget is checked in parameters)")
        opts = self.options.union_options()
        for name, linear in originals.items():
            if name in ranks:
                layer = factorize(linear, ranks[name], method="jactus_union", stats=stats[name], **opts)
                self._install(name, linear, CoreLowRankLinear.from_lowrank(layer))
        self.ranks = dict(ranks)
        self.factored = True

    def _install(self, name: str, linear: nn.Linear, core: CoreLowRankLinear) -> None:
        """Put ``core`` in place of ``linear``: the same bias Parameter (its optimizer state carries on), the
        dense weight replaced in the optimizer by what trains now (the core; ``U``, ``V`` with ``train_bases``)."""
        trains = linear.weight.requires_grad
        if linear.bias is not None:
            core.bias = linear.bias
            core.bias.requires_grad_(self.options.train_bias and trains)
        core.core.requires_grad_(trains)
        core.U.requires_grad_(self.options.train_bases and trains)
        core.V.requires_grad_(self.options.train_bases and trains)
        new = self._core_params(core)
        optimizer = self.comp.optimizer
        if trains and optimizer is not None and self.options.core_lr is not None:
            cores = marked_group(optimizer, CORE_GROUP, "jactus core")
            swap_params_in_optimizer(optimizer, linear.weight, [])
            cores["params"] += new
        elif trains:
            swap_params_in_optimizer(optimizer, linear.weight, new)
        self.model.set_submodule(name, core.train(linear.training))
        self.rebind_feature_taps()

    def restore_structure(self, structure) -> None:
        """Before a checkpoint saved after the boundary is loaded: the cores at the saved ranks (values from it)."""
        if self.factored or not any(info["type"] == "lowrank" for info in structure.values()):
            return
        for name, info in structure.items():
            if info["type"] == "lowrank":
                linear = self.model.get_submodule(name)
                core = CoreLowRankLinear(linear.in_features, linear.out_features, info["rank"],
                                         bias=linear.bias is not None, device=linear.weight.device,
                                         dtype=linear.weight.dtype)
                self._install(name, linear, core)
                self.ranks[name] = info["rank"]
        self.factored = True

    @staticmethod
    def _core_params(core: CoreLowRankLinear) -> list[nn.Parameter]:
        """What trains in place of the dense weight: the core (and U, V with ``train_bases``)."""
        return [p for p in (core.core, core.U, core.V) if p.requires_grad]

    def trainable_parameters(self):
        """Every parameter that requires grad; with ``core_lr`` two groups, the cores' (marked ``CORE_GROUP``,
        at ``core_lr``; empty during a dense warm-up, the cores join at the boundary) last."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.options.core_lr is None:
            return params
        cores = {id(p) for layer in self.core_layers().values() for p in self._core_params(layer)}
        return [{"params": [p for p in params if id(p) not in cores]},
                {"params": [p for p in params if id(p) in cores], "lr": self.options.core_lr, CORE_GROUP: True}]

    def core_layers(self) -> dict[str, CoreLowRankLinear]:
        return {n: m for n, m in self.lowrank_layers().items() if isinstance(m, CoreLowRankLinear)}

    def finalize(self) -> nn.Module:
        """Factor now if the warm-up has not ended; fold every core: plain LowRankLinear of ``r (K + N)`` weights."""
        if not self.factored:
            self.factorize_layers(self.comp.calibration_stats())
        for name, layer in self.core_layers().items():
            self.model.set_submodule(name, layer.fold())
        return self.model

    def state_dict(self):
        return {"factored": self.factored, "ranks": dict(self.ranks)}

    def load_state_dict(self, state) -> None:
        saved = state.get("ranks")
        if saved is not None and saved != self.ranks:
            raise ValueError(f"the checkpoint's jactus ranks {saved} differ from this run's allocation {self.ranks} "
                             f"(calibrate on the same data with the same config)")
        self.factored = bool(state.get("factored", self.factored))
