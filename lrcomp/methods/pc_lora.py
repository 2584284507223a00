"""PC-LoRA: progressive compression with low-rank adapters and feature distillation.

Hwang, Park, Lee, Yang, Maeng (2024), "PC-LoRA: Low-Rank Adaptation for Progressive Model
Compression with Knowledge Distillation". Every targeted linear layer (``W0 [N, K]`` frozen) becomes

    y = lam(t) * W0 x + B A x + b,      B [N, q] (zeros), A [q, K] (Kaiming), lam: 1 -> 0

held by a :class:`LowRankLinear` with ``U = B``, ``V = A``, ``S = 1`` (frozen), the dense branch
attached with ``dense_scale = lam(t)``. ``lam`` decays on ``schedule`` over the first
``decay_ratio * total_steps`` steps and is exactly 0 from there on (the dense branch is then
dropped, so the rest of the run already trains and runs the compact model); the loss is the task
loss plus feature distillation of every targeted layer's output to the frozen dense teacher
(``default_feature_weight``; a logit KL is added when ``CompressionConfig.distill_weight > 0``).
At the end only ``B``, ``A`` (and the biases) remain.

Rank: the paper uses one rank ``q`` for every layer. Here ``q`` (option ``rank``, default None)
is the largest single rank whose final cost fits the budget over the targeted layers (or, with
``allocation="global"``, not in the paper, each layer's rank comes from the global allocator):

    q = max { q : sum_l min(min(q, K_l, N_l) (K_l + N_l), K_l N_l) <= budget * sum_l K_l N_l }

a layer with ``min(K_l, N_l) < q`` keeps ``min(K_l, N_l)``, and a layer at or past break-even
(``q (K_l + N_l) >= K_l N_l``) costs its dense ``K_l N_l``, as :meth:`Compressor.finalize` makes it an
``nn.Linear`` (the same function), so ``kept_cost <= budget * total_cost`` at finalize. Counting that
layer at ``q (K_l + N_l)`` instead, as before, left budget unused: on MiniLM at 0.8 the attention layers
(384 -> 384, break-even 192) pass it at q = 204 and the run kept 0.776 of the weights; q is now 215.

Differences from the paper: the paper decays the pretrained layer's bias together with ``W0``
(``lam (W0 x + b0)``) and trains a new adapter bias ``C`` initialised at 0; here the layer keeps
one trainable bias initialised at ``b0`` (same output at ``t = 0``, one bias at the end either
way). ``init="svd"`` (not in the paper) starts ``B A`` at the truncated SVD of ``W0``
(``B = U_q sqrt(S_q)``, ``A = sqrt(S_q) V_q``) instead of LoRA's zero product; ``init="svd_llm"`` (not in
the paper either) at the truncation whitened by the calibrated input covariance (SVD-LLM, the factors that
minimise the layer's output error on the calibration data; needs ``calib_data``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from lrcomp.compression.allocate import allocate_ranks
from lrcomp.compression.cost import break_even_rank, resolve_cost_table
from lrcomp.compression.factorizations import factorize
from lrcomp.layers.lowrank_linear import LowRankLinear
from lrcomp.methods.base import JointMethod, factor_cost
from lrcomp.methods.schedules import decay

PC_LORA_SCHEDULES = ("linear", "cosine", "sine")
PC_LORA_INITS = ("lora", "svd", "svd_llm")
PC_LORA_ALLOCATIONS = ("uniform", "global")


@dataclasses.dataclass
class PCLoRAOptions:
    """Options of ``method="pc_lora"`` (``CompressionConfig.method_options``).

    Attributes:
        rank: the adapter rank ``q`` of every layer (the paper's single hyperparameter of size);
            None = the largest ``q`` that fits the budget. An explicit rank over budget is an error.
        decay_ratio: fraction of ``total_steps`` over which ``lam`` goes from 1 to 0 (the paper's
            decay end point ``q`` of its schedule ``lam(n)``, as a fraction of the run).
        schedule: shape of the decay: "linear" ``1 - p``, "cosine" ``(1 + cos(pi p)) / 2`` or
            "sine" ``1 - sin(pi p / 2)`` (the three decay functions the paper compares).
        init: "lora" (B = 0, A Kaiming-uniform, as LoRA and the paper), "svd" (B A = truncated SVD of W0) or
            "svd_llm" (B A = SVD-LLM's whitened truncation of W0; needs calibration data).
        allocation: "uniform" (one rank for every layer, as the paper) or "global" (not in the paper: each
            layer's rank from the global allocator :func:`lrcomp.allocate_ranks` on the whitened singular
            values, under ``CompressionConfig.cost`` / ``min_rank``; needs calibration data; a layer it keeps
            dense gets the break-even rank, which costs its dense weights and ends as an ``nn.Linear``).
    """

    rank: int | None = None
    # The paper ends the decay before the end of fine-tuning so that the adapters alone are
    # fine-tuned afterwards; half the run is used here.
    decay_ratio: float = 0.5
    # The paper compares sine, linear and cosine decays; cosine is the default here.
    schedule: str = "cosine"
    # LoRA initialisation (Hu et al. 2021), as in the paper: the run starts exactly at the dense model.
    init: str = "lora"
    allocation: str = "uniform"

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be None or an int >= 1, got {self.rank!r}")
        if isinstance(self.decay_ratio, bool) or not isinstance(self.decay_ratio, (int, float)) or not (
                math.isfinite(self.decay_ratio) and 0.0 < self.decay_ratio <= 1.0):
            raise ValueError(f"decay_ratio must be a fraction in (0, 1] of total_steps, got {self.decay_ratio!r}")
        self.decay_ratio = float(self.decay_ratio)
        if self.schedule not in PC_LORA_SCHEDULES:
            raise ValueError(f"schedule must be one of {PC_LORA_SCHEDULES}, got {self.schedule!r}")
        if self.init not in PC_LORA_INITS:
            raise ValueError(f"init must be one of {PC_LORA_INITS}, got {self.init!r}")
        if self.allocation not in PC_LORA_ALLOCATIONS:
            raise ValueError(f"allocation must be one of {PC_LORA_ALLOCATIONS}, got {self.allocation!r}")
        if self.allocation == "global" and self.rank is not None:
            raise ValueError(f"rank={self.rank} sets one rank for every layer: it needs allocation='uniform'")


def uniform_rank(shapes: list[tuple[int, int]], budget: float) -> int:
    """Largest ``q`` whose deployed cost ``sum factor_cost(K, N, min(q, K, N))`` over ``shapes`` ``[(K, N), ...]``
    is at most ``budget * sum(K N)`` (0 if none): a layer at or past break-even costs its dense ``K N``
    (:meth:`Compressor.finalize` makes it an ``nn.Linear``), so its rank no longer weighs on the others."""
    limit = budget * sum(K * N for K, N in shapes)

    def cost(q: int) -> int:
        return sum(factor_cost(K, N, min(q, K, N)) for K, N in shapes)

    lo, hi = 0, max(min(K, N) for K, N in shapes)  # cost(0) = 0 <= limit; cost is non-decreasing in q
    if cost(hi) <= limit:
        return hi
    while hi - lo > 1:  # invariant: cost(lo) <= limit < cost(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= limit else (lo, mid)
    return lo


class PCLoRA(JointMethod):
    """PC-LoRA (Hwang et al. 2024): ``lam(t) W0 x + B A x``, lam 1 -> 0, task + feature distillation."""

    name: ClassVar[str] = "pc_lora"
    Options: ClassVar[type] = PCLoRAOptions
    default_distill_weight: ClassVar[float] = 0.0
    # The paper trains on the task loss plus the feature-KD term, weighted equally here.
    default_feature_weight: ClassVar[float] = 1.0

    def __init__(self, compressor) -> None:
        super().__init__(compressor)
        if self.options.init == "svd_llm" or self.options.allocation == "global":
            # instance attribute: the Compressor reads it after __init__
            self.needed_stats = ("input_cov",)
        self.lam = 1.0
        self.ranks: dict[str, int] = {}

    # ------------------------------------------------------------------ schedule
    @property
    def decay_steps(self) -> int:
        """Steps over which lam goes from 1 to 0 (at least 1)."""
        return max(1, round(self.options.decay_ratio * self.total_steps))

    def lam_at(self, step: int) -> float:
        """``lam`` after optimizer step ``step``: 1 at 0, exactly 0 from ``decay_steps`` on."""
        p = step / self.decay_steps
        return 0.0 if p >= 1.0 else decay(self.options.schedule, p)

    # ------------------------------------------------------------------ hooks
    def setup(self, stats) -> None:
        model, opts = self.model, self.options
        linears = {n: model.get_submodule(n) for n in self.comp.targets}
        shapes = [(m.in_features, m.out_features) for m in linears.values()]
        config = self.comp.config
        budget = config.budget
        if opts.allocation == "global":
            alloc = allocate_ranks(model, budget, stats=stats, score="whitened", cost=config.cost,
                                   cost_table=resolve_cost_table(config.cost_table), min_rank=config.min_rank,
                                   target_modules=self.comp._exact())
            ranks = {n: alloc[n] if n in alloc else min(m.in_features, m.out_features,
                                                       break_even_rank(m.in_features, m.out_features))
                     for n, m in linears.items()}
            what = f"the {config.cost} allocation"
        else:
            q = uniform_rank(shapes, budget) if opts.rank is None else opts.rank
            ranks = {n: min(q, m.in_features, m.out_features) for n, m in linears.items()}
            what = f"rank={q}"
        cost = sum(factor_cost(m.in_features, m.out_features, ranks[n]) for n, m in linears.items())
        if cost > budget * self.comp.total_cost:
            raise ValueError(f"{what} keeps {cost / self.comp.total_cost:.4f} of the targeted weights, over "
                             f"budget={budget:g}; the largest single rank within the budget is "
                             f"{uniform_rank(shapes, budget)}")
        self.ranks = ranks
        for name, linear in linears.items():
            layer = self._adapter(linear, ranks[name], None if stats is None else stats[name])
            model.set_submodule(name, layer)
        self.lam = 1.0

    def _adapter(self, linear: nn.Linear, rank: int, stats) -> LowRankLinear:
        weight = linear.weight.detach()
        K, N = linear.in_features, linear.out_features
        layer = LowRankLinear(K, N, rank, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if self.options.init == "lora":
                nn.init.kaiming_uniform_(layer.V, a=math.sqrt(5))  # A, as LoRA
                layer.U.zero_()  # B = 0: the run starts exactly at the dense model
            else:  # B A = U diag(S) V of the truncation, sqrt(S) on either side
                if self.options.init == "svd":
                    u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
                    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
                else:
                    low = factorize(linear, rank, method="svd_llm", stats=stats)
                    u, s, vh = low.U.double(), low.S.double(), low.V.double()
                root = s.sqrt()
                layer.U.copy_(u * root)
                layer.V.copy_(root[:, None] * vh)
            layer.S.fill_(1.0)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        layer.S.requires_grad_(False)
        layer.scores.requires_grad_(False)
        layer.attach_dense(weight.clone(), scale=1.0)
        return layer

    def on_step(self, step: int) -> None:
        self.lam = self.lam_at(step)
        for layer in self.lowrank_layers().values():
            if self.lam == 0.0:
                if layer.dense_weight is not None:
                    layer.drop_dense()  # W0 no longer counts: free it, the rest of the run is compact
            elif layer.dense_weight is not None:
                layer.dense_scale = self.lam

    def finalize(self) -> nn.Module:
        self.lam = 0.0
        return super().finalize()

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "ranks": dict(self.ranks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = float(state.get("lam", self.lam))
        self.ranks = {k: int(v) for k, v in state.get("ranks", self.ranks).items()}
