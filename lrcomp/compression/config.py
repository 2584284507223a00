"""``CompressionConfig``: what to compress, how, and to which size. Validated on construction."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrcomp.replace import _check_pattern

ONE_SHOT_METHODS = ("svd", "asvd", "svd_llm", "fwsvd", "sparsity_aware", "jactus_union")
JOINT_METHODS = ("acip", "pc_lora", "tunecomp", "jactus", "lpaf")
METHODS = ONE_SHOT_METHODS + JOINT_METHODS
COST_KINDS = ("params", "flops", "latency")
ALLOCATIONS = ("global", "uniform")


@dataclass
class CompressionConfig:
    """Configuration of :func:`lrcomp.compress` (one-shot) and :class:`lrcomp.Compressor` (joint).

    Attributes:
        method: a one-shot factorisation for :func:`lrcomp.compress`: "svd", "asvd" (Yuan et
            al. 2023), "svd_llm" (Wang et al. 2024, whitened), "fwsvd" (Hsu et al. 2022,
            Fisher-weighted), "sparsity_aware" (LPAF, Ren & Zhu 2023) or "jactus_union"
            (task-aware union of subspaces); or a joint fine-tune-and-compress method for
            :class:`lrcomp.Compressor`: "acip", "pc_lora", "tunecomp", "jactus", "lpaf".
        budget: fraction in (0, 1] of the targeted layers' dense cost that may be kept.
        cost: what the budget counts: "params", "flops" or "latency" (needs ``cost_table``).
        allocation: "global" (one budget for the whole model, greedy on marginal gain per unit
            cost, :func:`lrcomp.allocate_ranks`) or "uniform" (every layer keeps ``budget`` of
            its own parameters).
        target_modules, exclude_modules: PEFT-style selection (see :func:`lrcomp.replace_linears`).
        min_rank: smallest rank the global allocator gives a layer.
        cost_table: a :class:`lrcomp.compression.cost.LatencyTable` or the path of one saved as JSON.
        method_options: extra keyword arguments of the factorisation (e.g. ``{"alpha": 0.5}`` for asvd).
        calib_max_batches: stop calibration after this many batches (None: all).
        calib_group_size: calibrate this many layers at a time (bounded memory; None: all at once).
        calib_save_path: safetensors file where calibration statistics are saved and resumed from.
        loss_fn: ``(outputs, batch) -> scalar`` for gradient statistics (fisher, grad_cov).
        sensitivity: with the global allocator, weight each layer's direction scores by its loss
            sensitivity ``tr(G) / N`` (G: output-gradient covariance; needs a loss), so that
            scores compare across layers in units of the loss rather than of each layer's output.
        total_steps: optimizer steps of a joint run (its schedules end there); joint methods only.
        distill_weight: weight of the logit KL to the dense teacher (None: the method's default).
        feature_weight: weight of the per-layer feature MSE to the teacher (None: the method's default).
        distill_temperature: temperature T of the logit KL (scaled by T^2).
        other_lr: joint methods: learning rate of the trained parameters outside the targeted layers
            (embeddings, norms, task heads), which :meth:`lrcomp.Compressor.parameters` then puts in a
            parameter group of their own (marked ``lrcomp.methods.compressor.OTHER_GROUP``); None: they
            train at the optimizer's lr, like the method's own parameters.
    """

    method: str = "svd_llm"
    budget: float = 0.5
    cost: str = "params"
    allocation: str = "global"
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    min_rank: int = 1
    cost_table: Any = None
    method_options: dict[str, Any] = field(default_factory=dict)
    calib_max_batches: int | None = None
    calib_group_size: int | None = None
    calib_save_path: str | Path | None = None
    loss_fn: Callable | None = None
    sensitivity: bool = False
    total_steps: int | None = None
    distill_weight: float | None = None
    feature_weight: float | None = None
    distill_temperature: float = 2.0
    other_lr: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.total_steps is not None and (isinstance(self.total_steps, bool) or not isinstance(
                self.total_steps, int) or self.total_steps <= 0):
            raise ValueError(f"total_steps must be a positive int, got {self.total_steps!r}")
        if self.method in JOINT_METHODS and self.total_steps is None:
            raise ValueError(f"method {self.method!r} trains jointly: set total_steps (the optimizer steps of the run)")
        for name in ("distill_weight", "feature_weight"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be None or a finite number >= 0, got {value!r}")
        if isinstance(self.distill_temperature, bool) or not isinstance(self.distill_temperature, (int, float)) \
                or not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise ValueError(f"distill_temperature must be a finite number > 0, got {self.distill_temperature!r}")
        if self.other_lr is not None and (isinstance(self.other_lr, bool) or not isinstance(self.other_lr, (int, float))
                                          or not (math.isfinite(self.other_lr) and self.other_lr > 0)):
            raise ValueError(f"other_lr must be None or a finite number > 0, got {self.other_lr!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not (
                math.isfinite(self.budget) and 0 < self.budget <= 1):
            raise ValueError(f"budget must be a fraction in (0, 1], got {self.budget!r}")
        self.budget = float(self.budget)
        if self.cost not in COST_KINDS:
            raise ValueError(f"cost must be one of {COST_KINDS}, got {self.cost!r}")
        if self.cost == "latency" and self.cost_table is None:
            raise ValueError("cost='latency' needs cost_table (a LatencyTable or the path of one)")
        if self.cost == "latency" and self.allocation == "uniform":
            raise ValueError("cost='latency' needs allocation='global' (a uniform allocation counts parameters)")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        # the rules of lrcomp.replace_linears, checked now (a bad regex or a non-string name fails here, not mid-run)
        if not (isinstance(self.target_modules, str) and self.target_modules == "all-linear"):
            checked = _check_pattern(self.target_modules, "target_modules")
            if not isinstance(self.target_modules, (str, list, tuple)):  # a one-shot iterable: keep what it held
                self.target_modules = list(checked)
        if self.exclude_modules is not None:
            checked = _check_pattern(self.exclude_modules, "exclude_modules")
            if not isinstance(self.exclude_modules, (str, list, tuple)):
                self.exclude_modules = list(checked)
        if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, int) or self.min_rank < 1:
            raise ValueError(f"min_rank must be an int >= 1, got {self.min_rank!r}")
        if not isinstance(self.method_options, dict):
            raise TypeError(f"method_options must be a dict, got {type(self.method_options).__name__}")
        for name in ("calib_max_batches", "calib_group_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if not isinstance(self.sensitivity, bool):
            raise TypeError(f"sensitivity must be a bool, got {self.sensitivity!r}")
        if self.sensitivity and self.allocation != "global":
            raise ValueError("sensitivity=True weights the global allocator's scores: it needs allocation='global'")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(self.loss_fn).__name__}")
