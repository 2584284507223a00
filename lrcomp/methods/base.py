"""Base class of the joint fine-tune-and-compress methods driven by :class:`lrcomp.Compressor`.

A method decides which layers become low-rank and how (``setup``), which parameters train
(``trainable_parameters``), what it adds to the loss (``penalty``), what happens after every
optimizer step (``on_step``: schedules, masks, pruning, compaction) and what the final model
is (``finalize``). Its hyperparameters are a dataclass ``Options`` named after the paper's,
with the paper's defaults, filled from ``CompressionConfig.method_options``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from lrcomp.layers.lowrank_linear import LowRankLinear

if TYPE_CHECKING:
    from lrcomp.methods.compressor import Compressor


def factor_cost(K: int, N: int, directions: int) -> int:
    """Weights of a ``K -> N`` layer with ``directions`` rank-one terms (LoRA ones included) as deployed:
    ``directions (K + N)``, or ``K N`` at and past break-even, where :meth:`Compressor.finalize` makes it dense."""
    return min(directions * (K + N), K * N)


def weight_cost(module: nn.Module) -> int:
    """Weights a targeted layer keeps: ``K N`` dense; low-rank, :func:`factor_cost` of its ``active_rank``
    directions and LoRA factors, plus ``K N`` while its dense branch has a nonzero scale."""
    K, N = module.in_features, module.out_features
    if not isinstance(module, LowRankLinear):
        return K * N
    lora = module.lora_A.shape[0] if module.lora_A is not None else 0
    branch = K * N if module.dense_weight is not None and module.dense_scale != 0.0 else 0
    return factor_cost(K, N, module.active_rank + lora) + branch


@torch.no_grad()
def densify_past_break_even(model: nn.Module, names) -> list[str]:
    """Put an ``nn.Linear`` (:meth:`LowRankLinear.to_linear`, the same function) in place of every low-rank
    layer of ``names`` at or past break-even, where its factors cost at least as many weights and FLOPs as the
    dense matrix (:func:`factor_cost`). Returns the names replaced."""
    replaced = []
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, LowRankLinear) and weight_cost(layer) == layer.in_features * layer.out_features:
            model.set_submodule(name, layer.to_linear().train(layer.training))
            replaced.append(name)
    return replaced


@contextmanager
def swapped_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Put ``replacements`` (name -> module) in ``model`` for the block; the original modules of those names
    are back afterwards, also when the block raises (and whatever the block put under those names)."""
    originals = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            model.set_submodule(name, module)
        yield
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)


def build_options(options_cls: type, values: dict[str, Any], method: str):
    """``options_cls(**values)`` with an error that lists the valid option names."""
    valid = [f.name for f in dataclasses.fields(options_cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise TypeError(f"method_options {unknown} are not options of {method!r}; its options are {valid}")
    return options_cls(**values)


def swap_params_in_optimizer(optimizer: torch.optim.Optimizer | None, old: nn.Parameter,
                             new: list[nn.Parameter]) -> None:
    """Make ``optimizer`` train ``new`` instead of ``old``.

    ``new`` takes ``old``'s place in its parameter group (same hyperparameters, same position, so the
    parameter order is deterministic and a checkpoint's optimizer state maps back), ``old``'s state is
    dropped and the new parameters start with fresh state (AdamW: zero moments, step 0). No-op when
    ``optimizer`` is None.

    Raises:
        ValueError: ``old`` is not in any of the optimizer's parameter groups.
    """
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        index = next((i for i, p in enumerate(group["params"]) if p is old), None)
        if index is not None:
            group["params"] = group["params"][:index] + list(new) + group["params"][index + 1:]
            optimizer.state.pop(old, None)
            return
    raise ValueError("the optimizer does not hold the dense weight being factored: build it from comp.parameters()")


def marked_group(optimizer: torch.optim.Optimizer, key: str, what: str) -> dict:
    """The parameter group of ``optimizer`` marked ``key`` (ValueError naming ``what`` when there is none)."""
    group = next((g for g in optimizer.param_groups if g.get(key)), None)
    if group is None:
        raise ValueError(f"the optimizer has no {what} group: build it from comp.parameters()")
    return group


def check_warmup_frac(value, method: str) -> None:
    """Validate a ``warmup_frac`` option: a share of ``total_steps`` in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{method} option warmup_frac must be in [0, 1), got {value!r}")


@dataclasses.dataclass
class NoOptions:
    pass


class JointMethod:
    """One joint method. Subclasses set ``name``, ``Options`` and override the hooks they need."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: calibration statistics ``setup`` needs (collected by the Compressor on ``calib_data``).
    needed_stats: ClassVar[tuple[str, ...]] = ()
    #: default weights of the logit-KL and feature distillation terms (config values override).
    default_distill_weight: ClassVar[float] = 0.0
    default_feature_weight: ClassVar[float] = 0.0
    #: False while a dense warm-up runs (the targets are still nn.Linear); methods with one set it in setup.
    factored: bool = True

    def __init__(self, compressor: Compressor) -> None:
        self.comp = compressor
        self.options = build_options(self.Options, dict(compressor.config.method_options), self.name)

    # --------------------------------------------------------------- helpers
    @property
    def model(self) -> nn.Module:
        return self.comp.model

    @property
    def total_steps(self) -> int:
        return self.comp.config.total_steps

    def progress(self, step: int) -> float:
        """``step / total_steps`` clipped to [0, 1]."""
        return min(max(step / self.total_steps, 0.0), 1.0)

    def lowrank_layers(self) -> dict[str, LowRankLinear]:
        """The targets that are LowRankLinear now, by name."""
        return {n: m for n in self.comp.targets if isinstance(m := self.model.get_submodule(n), LowRankLinear)}

    def rebind_feature_taps(self) -> None:
        """After targeted layers were replaced mid-run: the feature-distillation tap follows the new modules."""
        tap = getattr(self.comp, "_student_tap", None)
        if tap is not None:
            tap.bind(self.model, self.comp.targets)

    @property
    def boundary(self) -> int:
        """The step after which the layers are factored (0: at setup). Methods with a ``warmup_frac`` option
        train dense for the first ``max(1, round(warmup_frac * total_steps))`` steps."""
        frac = getattr(self.options, "warmup_frac", 0.0)
        return 0 if frac == 0 else max(1, round(frac * self.total_steps))

    def calibrates_at_setup(self) -> bool:
        """Whether :meth:`setup` gets the statistics of ``needed_stats`` (False: the method calibrates later,
        through ``comp.calibration_stats()``, from :meth:`on_step` or :meth:`finalize`; by default when a
        dense warm-up runs first)."""
        return self.boundary == 0

    def runs_model_at(self, step: int) -> bool:
        """Whether :meth:`on_step` ``(step)`` runs the model (a mid-run calibration): under FSDP the Compressor
        then hands it the plain, unsharded model."""
        return not self.factored and step >= self.boundary  # the step that factors after a warm-up

    # --------------------------------------------------------------- hooks
    def setup(self, stats) -> None:
        """Replace the targeted layers and set which parameters train. ``stats``: calibration stats or None."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer must hold (default: every parameter that requires grad)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def penalty(self) -> Tensor | None:
        """A term added to the loss at this step (None: nothing)."""
        return None

    def on_step(self, step: int) -> None:
        """After optimizer step number ``step`` (1-based): schedules, masks, pruning, compaction."""

    def finalize(self) -> nn.Module:
        """The compact model at the budget (default: compact every low-rank target, drop dense branches)."""
        for layer in self.lowrank_layers().values():
            layer.drop_dense()
        self.comp.compact()
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """Method state for checkpoints: JSON-able values and tensors."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
