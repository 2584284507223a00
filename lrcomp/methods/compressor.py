"""``Compressor``: one training run that fine-tunes a model and compresses it to a budget.

    comp = lrcomp.Compressor(model, lrcomp.CompressionConfig(method="acip", budget=0.5, total_steps=N),
                             calib_data=calib, loss_fn=loss_fn, teacher=None)   # replaces the targeted layers
    opt = torch.optim.AdamW(comp.parameters(), lr=...)
    comp.attach(opt)
    for batch in loader:
        out = model(**batch)
        loss = comp.loss(task_loss, inputs=batch, outputs=out)   # + penalties and distillation
        loss.backward(); opt.step(); opt.zero_grad()
        comp.step()                                               # schedules, masks, pruning, compaction
    model = comp.finalize()                                       # compact model at the budget

Budget accounting counts the weights of the targeted layers: a dense layer costs ``K N``, a
low-rank one ``active_rank (K + N)`` (plus its LoRA factors, plus ``K N`` while its dense
branch has a nonzero scale); biases are not counted (they are never compressed).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lrcomp.calib.calibrate import calibrate
from lrcomp.compression.config import JOINT_METHODS, CompressionConfig
from lrcomp.layers.lowrank_linear import LowRankLinear
from lrcomp.methods import checkpoint
from lrcomp.methods.base import JointMethod
from lrcomp.methods.distill import FeatureTap, call_model, feature_loss, kd_loss, logits_of
from lrcomp.replace import find_target_linears

#: method name -> "module:class" (imported on first use).
_REGISTRY = {
    "acip": "lrcomp.methods.acip:ACIP",
    "pc_lora": "lrcomp.methods.pc_lora:PCLoRA",
    "tunecomp": "lrcomp.methods.tunecomp:TuneComp",
    "jactus": "lrcomp.methods.jactus:JACTUS",
    "lpaf": "lrcomp.methods.lpaf:LPAF",
}


def method_class(name: str) -> type[JointMethod]:
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of the joint methods {JOINT_METHODS}, got {name!r}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def weight_cost(module: nn.Module) -> int:
    """Weights a targeted layer keeps: ``K N`` dense; ``active_rank (K + N)`` (+ LoRA, + live dense branch)."""
    if isinstance(module, LowRankLinear):
        bias = module.out_features if module.bias is not None else 0
        return module.num_parameters(compact=True) - bias
    return module.in_features * module.out_features


class Compressor:
    """Drives a joint fine-tune-and-compress run on a plain PyTorch loop (or under ``transformers.Trainer``
    through :class:`lrcomp.integrations.LowRankCallback`).

    Args:
        model: the model to fine-tune and compress (modified in place).
        config: a :class:`CompressionConfig` with a joint ``method``, ``budget`` and ``total_steps``.
        calib_data: batches for the calibration statistics the method needs (dict -> ``model(**b)``,
            tensor -> ``model(b)``, tuple -> ``model(b[0])``).
        loss_fn: ``(outputs, batch) -> loss`` for gradient statistics (else ``outputs.loss``).
        teacher: the dense teacher for distillation; None = a frozen copy of ``model`` taken before
            any layer is replaced (only when the method distils).

    Raises:
        ValueError: unknown method (the message lists them), total_steps <= 0, no targeted layer
            (the message lists the linear layers), a budget that the targeted layers cannot
            reach, a teacher whose outputs do not match the student's.
    """

    def __init__(self, model: nn.Module, config: CompressionConfig, calib_data: Iterable | None = None,
                 loss_fn=None, teacher: nn.Module | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(config, CompressionConfig):
            raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
        if config.method not in JOINT_METHODS:
            raise ValueError(f"Compressor runs the joint methods {JOINT_METHODS}; got method={config.method!r} "
                             f"(one-shot methods go through lrcomp.compress)")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
        self.model = model
        self.config = config
        self.loss_fn = loss_fn if loss_fn is not None else config.loss_fn
        self.targets = find_target_linears(model, config.target_modules, config.exclude_modules,
                                           required=True)
        self.total_cost = sum(weight_cost(model.get_submodule(n)) for n in self.targets)
        floor = sum(model.get_submodule(n).in_features + model.get_submodule(n).out_features for n in self.targets)
        if floor > config.budget * self.total_cost:
            raise ValueError(f"budget={config.budget:g} cannot be reached: even rank 1 in every targeted layer keeps "
                             f"{floor / self.total_cost:.4f} of their weights")
        self.method = method_class(config.method)(self)
        self.distill_weight = (config.distill_weight if config.distill_weight is not None
                               else self.method.default_distill_weight)
        self.feature_weight = (config.feature_weight if config.feature_weight is not None
                               else self.method.default_feature_weight)
        self.teacher = None
        if self.distill_weight > 0 or self.feature_weight > 0:
            self.teacher = teacher if teacher is not None else copy.deepcopy(model)
            self.teacher.eval().requires_grad_(False)
        self.optimizer: torch.optim.Optimizer | None = None
        self.step_count = 0
        self.last_terms: dict[str, float] = {}
        self._checked_teacher = False

        stats = None
        if self.method.needed_stats:
            if calib_data is None:
                raise ValueError(f"method {config.method!r} needs calibration statistics "
                                 f"{self.method.needed_stats}: pass calib_data")
            stats = calibrate(model, calib_data, stats=self.method.needed_stats, target_modules=self._exact(),
                              loss_fn=self.loss_fn, max_batches=config.calib_max_batches,
                              group_size=config.calib_group_size, save_path=config.calib_save_path)
        self.method.setup(stats)
        self._student_tap = self._teacher_tap = None
        if self.teacher is not None and self.feature_weight > 0:
            missing = [n for n in self.targets if not _has_module(self.teacher, n)]
            if missing:
                raise ValueError(f"feature distillation needs the teacher to have the targeted layers; missing: "
                                 f"{missing[:5]}")
            self._student_tap = FeatureTap(model, self.targets, detach=False)
            self._teacher_tap = FeatureTap(self.teacher, self.targets, detach=True)

    def _exact(self) -> str:
        import re

        return "|".join(re.escape(n) for n in self.targets)

    # ------------------------------------------------------------------ training-loop API
    def parameters(self) -> list[nn.Parameter]:
        """The parameters this method trains (give them to the optimizer, then :meth:`attach` it)."""
        return self.method.trainable_parameters()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer whose state follows compaction (pruned directions are sliced out of it)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer

    def loss(self, task_loss: Tensor, *, inputs=None, outputs=None) -> Tensor:
        """``task_loss`` + the method's penalty + distillation to the teacher (when the method distils).

        ``inputs`` is the batch the model was called on (the teacher sees the same); ``outputs``
        the model's outputs (their logits are distilled). The terms of the last call are in
        :attr:`last_terms`.
        """
        if not isinstance(task_loss, Tensor) or task_loss.numel() != 1:
            raise ValueError("task_loss must be a scalar tensor")
        total = task_loss
        terms = {"task": float(task_loss.detach())}
        penalty = self.method.penalty()
        if penalty is not None:
            total = total + penalty
            terms["penalty"] = float(penalty.detach())
        if self.teacher is not None:
            if inputs is None:
                raise ValueError(f"method {self.config.method!r} distils from the teacher: pass inputs= (the batch)")
            with torch.no_grad():
                teacher_out = call_model(self.teacher, inputs)
            if self.distill_weight > 0:
                student_logits, teacher_logits = logits_of(outputs), logits_of(teacher_out)
                if student_logits is None:
                    raise ValueError("logit distillation needs outputs= with logits (or a tensor)")
                if teacher_logits is None or teacher_logits.shape != student_logits.shape:
                    got = None if teacher_logits is None else tuple(teacher_logits.shape)
                    raise ValueError(f"the teacher's outputs have shape {got} but the student's have "
                                     f"{tuple(student_logits.shape)}: the teacher must solve the same task")
                kd = kd_loss(student_logits, teacher_logits, self.config.distill_temperature)
                total = total + self.distill_weight * kd
                terms["kd"] = float(kd.detach())
            if self._student_tap is not None:
                feat = feature_loss(self._student_tap.outputs, self._teacher_tap.outputs)
                if feat is not None:
                    total = total + self.feature_weight * feat
                    terms["feature"] = float(feat.detach())
        self.last_terms = terms
        return total

    def step(self) -> None:
        """Call once after every optimizer step: schedules, masks, pruning and compaction."""
        self.step_count += 1
        self.method.on_step(self.step_count)

    def compact(self) -> int:
        """Physically drop every pruned direction of the low-rank targets (optimizer state sliced too).

        Returns the number of directions dropped.
        """
        dropped = 0
        for layer in self.method.lowrank_layers().values():
            before = layer.rank
            if layer.active_rank < before:
                layer.compact_(self.optimizer)
                dropped += before - layer.rank
        return dropped

    def kept_cost(self) -> int:
        """Weights the targeted layers keep now (see the module docstring)."""
        return sum(weight_cost(self.model.get_submodule(n)) for n in self.targets)

    def kept_fraction(self) -> float:
        return self.kept_cost() / self.total_cost

    def finalize(self) -> nn.Module:
        """End the run: the compact model at the budget (no dense branch, nothing pruned left in memory)."""
        model = self.method.finalize()
        for tap in (self._student_tap, self._teacher_tap):
            if tap is not None:
                tap.remove()
        if self.kept_cost() > self.config.budget * self.total_cost:
            raise RuntimeError(f"method {self.config.method!r} ended over budget: kept {self.kept_fraction():.4f} "
                               f"> {self.config.budget:g}")
        return model

    def materialize(self, budget: float) -> nn.Module:
        """A compact copy of the model at any ``budget`` from this one run (ACIP's global ranking).

        Raises NotImplementedError for methods that train towards one size only.
        """
        if not hasattr(self.method, "materialize"):
            raise NotImplementedError(f"method {self.config.method!r} trains towards one size; "
                                      f"only 'acip' materialises any size from one run")
        return self.method.materialize(budget)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "method": self.method.state_dict()}

    def save_checkpoint(self, path) -> None:
        """Model, optimizer, method state, step and RNG to one safetensors file, written atomically."""
        checkpoint.save(self, path)

    def load_checkpoint(self, path) -> None:
        """Resume: reshape the layers to the checkpoint's ranks, then load everything :meth:`save_checkpoint` wrote."""
        checkpoint.load(self, path)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
