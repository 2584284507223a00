"""Run an lrcomp compression method under ``transformers.Trainer`` with no manual call.

The joint methods need four hooks on a training loop (:class:`lrcomp.Compressor`):
``comp.attach(optimizer)`` once the optimizer exists, ``comp.loss(task_loss, inputs=, outputs=)``
on every training forward (penalties, distillation), ``comp.step()`` after every optimizer step
(schedules, masks, pruning, compaction) and ``comp.finalize()`` at the end (the compact model).
Here they are wired into the Trainer:

- :class:`LowRankCallback` (a ``TrainerCallback``): attaches the Trainer's optimizer in
  ``on_train_begin`` (Trainer creates it lazily, so the callback takes the ``optimizer`` that
  the Trainer passes to callbacks), calls ``comp.step()`` in ``on_step_end`` (once per optimizer
  step, so gradient accumulation is respected), saves the compressor's state next to each
  Trainer checkpoint in ``on_save``, and calls ``comp.finalize()`` in ``on_train_end``
  (the result is ``callback.final_model``).
- :class:`LowRankTrainer` (a ``Trainer``): builds the optimizer on ``comp.parameters()`` only
  (``create_optimizer``), routes the training loss through ``comp.loss`` (``compute_loss``),
  registers the callback itself, restores the compressor on ``train(resume_from_checkpoint=...)`` (in an
  optimizer built on the starting structure, so the Trainer's saved optimizer state lines up), and
  replaces ``trainer.model`` with the finalized model after ``train()``.
- :func:`make_trainer`: ``LowRankTrainer(model, args, train_dataset=..., compressor=...)`` in one call.

Example::

    comp = lrcomp.Compressor(model, lrcomp.CompressionConfig(method="acip", budget=0.5, total_steps=500),
                             calib_data=calib, loss_fn=loss_fn)
    trainer = make_trainer(model, comp, TrainingArguments("out", max_steps=500), train_dataset)
    trainer.train()
    compact = trainer.model            # == trainer.lowrank_callback.final_model
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from lrcomp.methods.compressor import OTHER_GROUP

__all__ = ["COMPRESSOR_CHECKPOINT_NAME", "LowRankCallback", "LowRankTrainer", "make_trainer"]

# File inside each Trainer checkpoint (``output_dir/checkpoint-N/``) holding the compressor's state
# (``Compressor.save_checkpoint``: model structure and ranks, optimizer, method state, step, RNG).
COMPRESSOR_CHECKPOINT_NAME = "lrcomp_compressor.safetensors"

_COMPRESSOR_METHODS = ("parameters", "attach", "loss", "step", "finalize")


def _check_compressor(compressor) -> None:
    missing = [m for m in _COMPRESSOR_METHODS if not callable(getattr(compressor, m, None))]
    if missing:
        raise TypeError(f"compressor must be an lrcomp.Compressor (methods {', '.join(_COMPRESSOR_METHODS)}); "
                        f"{type(compressor).__name__} lacks {', '.join(missing)}")


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def _flat_params(params: Iterable) -> list[torch.Tensor]:
    """Parameters from an iterable of tensors or of param-group dicts."""
    out = []
    for item in params:
        if isinstance(item, dict):
            out.extend(item["params"] if not isinstance(item["params"], torch.Tensor) else [item["params"]])
        else:
            out.append(item)
    return out


def check_optimizer_params(optimizer: torch.optim.Optimizer, compressor) -> None:
    """Raise unless ``optimizer`` holds exactly the parameters of ``compressor.parameters()``.

    An optimizer that also holds other parameters would train what the method keeps frozen
    (ACIP's U and V, for instance); one that misses some would leave the method's parameters untrained.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    wanted = {id(p) for p in _flat_params(compressor.parameters())}
    extra, missing = len(held - wanted), len(wanted - held)
    if extra or missing:
        raise ValueError(
            f"the Trainer's optimizer must hold exactly compressor.parameters(): it holds {extra} other parameter(s) "
            f"and misses {missing} of them. Use lrcomp.integrations.LowRankTrainer (or make_trainer), whose "
            f"create_optimizer builds the optimizer on compressor.parameters(), or pass "
            f"optimizers=(torch.optim.AdamW(compressor.parameters(), ...), None) to the Trainer")
    # A state loaded from an optimizer.pt whose parameter order differs from this optimizer's lands on the wrong
    # parameters (a fused step may then crash the process): refuse it while the shapes tell.
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.ndim and value.shape != p.shape:
                    raise ValueError(
                        f"the optimizer's state {key!r} has shape {tuple(value.shape)} for a parameter of shape "
                        f"{tuple(p.shape)}: the optimizer state was restored in another parameter order than "
                        f"this optimizer's. Resume through LowRankTrainer.train(resume_from_checkpoint=...), which "
                        f"replays the compressor's structure changes in the optimizer before the Trainer loads it")


class LowRankCallback(TrainerCallback):
    """Drives an :class:`lrcomp.Compressor` from ``transformers.Trainer`` events.

    Args:
        compressor: the compressor built on the Trainer's model (it has already replaced the targeted layers).
        finalize: call ``compressor.finalize()`` in ``on_train_end`` and keep the result as ``final_model``.
        save_checkpoints: with every Trainer checkpoint, ``compressor.save_checkpoint(
            output_dir/checkpoint-N/lrcomp_compressor.safetensors)`` (if the compressor has that method).
        require_loss: raise in ``on_train_begin`` unless the Trainer routes its loss through
            ``compressor.loss`` (as :class:`LowRankTrainer` does). Set False only when your own
            ``compute_loss`` calls ``compressor.loss``.

    Attributes:
        steps: ``compressor.step()`` calls made (equals ``state.global_step`` of a run started from scratch).
        final_model: the finalized model after training, else None.
    """

    def __init__(self, compressor, *, finalize: bool = True, save_checkpoints: bool = True,
                 require_loss: bool = True) -> None:
        _check_compressor(compressor)
        self.compressor = compressor
        self.finalize = bool(finalize)
        self.save_checkpoints = bool(save_checkpoints)
        self.require_loss = bool(require_loss)
        self.loss_wired = False  # set by LowRankTrainer
        self.steps = 0
        self.final_model: nn.Module | None = None
        self._attached: torch.optim.Optimizer | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        from lrcomp import distributed as dist_utils

        if dist_utils.world_size() > 1:
            # Trainer (accelerate) wraps the model in DDP / FSDP once, before training; the joint methods
            # change parameter shapes mid-run (compaction, factorisation), which leaves that wrapper stale.
            raise RuntimeError(f"LowRankCallback: the Trainer path runs in one process only; this run has "
                               f"{dist_utils.world_size()} processes. Under torchrun, train with lrcomp.Compressor "
                               f"in a plain loop: comp.wrap_ddp() (or comp.wrap_fsdp()) rebuilds the wrapper "
                               f"whenever comp.step() changes the structure (see lrcomp.methods.compressor)")
        if self.require_loss and not self.loss_wired:
            raise RuntimeError("LowRankCallback: the Trainer does not route its loss through compressor.loss(...), so "
                               "the method's penalties and distillation would be missing. Use "
                               "lrcomp.integrations.LowRankTrainer / make_trainer, or call compressor.loss in your "
                               "own compute_loss and pass LowRankCallback(..., require_loss=False)")
        if optimizer is None:
            raise RuntimeError("LowRankCallback: the Trainer passed no optimizer to on_train_begin "
                               "(DeepSpeed / FSDP with delayed optimizer creation are not supported)")
        optimizer = unwrap_optimizer(optimizer)
        check_optimizer_params(optimizer, self.compressor)
        if optimizer is not self._attached:
            self.compressor.attach(optimizer)
            self._attached = optimizer
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # once per optimizer step (after the step and zero_grad), never per gradient-accumulation micro-batch
        self.compressor.step()
        self.steps += 1
        return control

    def on_save(self, args, state, control, **kwargs):
        save = getattr(self.compressor, "save_checkpoint", None)
        if self.save_checkpoints and callable(save) and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            save(os.path.join(folder, COMPRESSOR_CHECKPOINT_NAME))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.finalize and self.final_model is None:
            self.final_model = self.compressor.finalize()
        return control

    def load(self, checkpoint_dir: str | os.PathLike) -> bool:
        """Restore the compressor from a Trainer checkpoint folder; False if it holds no compressor state."""
        path = os.path.join(os.fspath(checkpoint_dir), COMPRESSOR_CHECKPOINT_NAME)
        if not os.path.exists(path):
            return False
        load = getattr(self.compressor, "load_checkpoint", None)
        if not callable(load):
            raise TypeError(f"{checkpoint_dir} holds compressor state but {type(self.compressor).__name__} "
                            f"has no load_checkpoint")
        load(path)
        return True


class LowRankTrainer(Trainer):
    """``transformers.Trainer`` that fine-tunes and compresses with an :class:`lrcomp.Compressor`.

    Takes every ``Trainer`` argument plus ``compressor`` (keyword). Differences from ``Trainer``:

    - the optimizer (``args.optim``, its kwargs, ``args.learning_rate`` and ``weight_decay``)
      is built on ``compressor.parameters()`` only; weight decay goes to the matrices among
      them (``ndim >= 2`` and not excluded by ``get_decay_parameter_names``), never to biases,
      norms, singular values or scores, also inside the param-group dicts of ``compressor.parameters()``
      (their lrs are kept; see ``_decay_groups``);
    - the training loss is ``compressor.loss(task_loss, inputs=inputs, outputs=outputs)``
      (evaluation losses are the plain task loss);
    - a :class:`LowRankCallback` is registered (``self.lowrank_callback``); after ``train()``
      ``self.model`` is the finalized compact model.
    """

    def __init__(self, *args, compressor, lowrank_callback: LowRankCallback | None = None, **kwargs) -> None:
        _check_compressor(compressor)
        callback = lowrank_callback or LowRankCallback(compressor)
        if callback.compressor is not compressor:
            raise ValueError("lowrank_callback drives a different compressor than compressor=")
        callbacks = [cb for cb in (kwargs.pop("callbacks", None) or []) if cb is not callback]
        super().__init__(*args, callbacks=[*callbacks, callback], **kwargs)
        comp_model = getattr(compressor, "model", None)
        if comp_model is not None and comp_model is not self.model:
            raise ValueError("compressor was built on a different model than the one given to the Trainer")
        if self.args.load_best_model_at_end:
            raise ValueError("load_best_model_at_end is not supported: compaction changes the layer shapes during "
                             "training, so an earlier checkpoint does not fit the model any more")
        callback.loss_wired = True
        self.compressor = compressor
        self.lowrank_callback = callback

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = self._decay_groups(opt_model, list(self.compressor.parameters()))
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        special = [k for k in ("params", "model", "optimizer_dict") if k in optimizer_kwargs]
        if special or not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise ValueError(f"args.optim={self.args.optim!r} builds its own parameter list (GaLore, LOMO, layer-wise "
                             f"or factory optimizers); LowRankTrainer needs a plain torch optimizer on "
                             f"compressor.parameters()")
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _decay_groups(self, opt_model, given: list) -> list[dict]:
        """``compressor.parameters()`` (Parameters or group dicts) as optimizer groups with weight decay on the
        matrices only.

        A plain group (keys ``params``, ``lr`` and the :data:`OTHER_GROUP` mark at most) becomes two, its
        matrices (``ndim >= 2`` and not excluded by ``get_decay_parameter_names``) at ``args.weight_decay``
        and the rest at 0, both with the group's other keys and kept when empty, so the group layout never
        depends on which parameters a group holds when the optimizer is built (a resumed run builds it on
        the compacted model). A group that sets its own ``weight_decay`` or carries a method's mark (ACIP's
        scores, which gain parameters during the run) is kept whole, at ``args.weight_decay`` unless it sets one.
        """
        decay_names = set(self.get_decay_parameter_names(opt_model))
        name_of = {id(p): n for n, p in opt_model.named_parameters()}

        def decays(p) -> bool:
            name = name_of.get(id(p))
            return p.ndim >= 2 and (name is None or name in decay_names)

        if not given or not isinstance(given[0], dict):
            given = [{"params": given}]
        groups = []
        for group in given:
            params = list(group["params"])
            if "weight_decay" in group or set(group) - {"params", "lr", OTHER_GROUP}:
                groups.append({"weight_decay": self.args.weight_decay, **group, "params": params})
                continue
            groups.append({**group, "params": [p for p in params if decays(p)], "weight_decay": self.args.weight_decay})
            groups.append({**group, "params": [p for p in params if not decays(p)], "weight_decay": 0.0})
        return groups

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # a copy: Trainer.compute_loss pops "labels" when a compute_loss_func is set, the compressor may need them
        loss, outputs = super().compute_loss(model, dict(inputs), return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if model.training:
            loss = self.compressor.loss(loss, inputs=inputs, outputs=outputs)
        return (loss, outputs) if return_outputs else loss

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint:
            folder = resume_from_checkpoint
            if isinstance(folder, bool):
                folder = get_last_checkpoint(self.args.output_dir)
                if folder is None:
                    raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint")
            # Before Trainer loads the weights and its optimizer.pt: the compressor restores the layer structure.
            # The optimizer is built first, on the structure the run started with, so that the restore replays
            # the run's changes in it (compaction slices a parameter in place; LPAF / JACTUS put new parameters
            # where the dense weight was): its parameter order is then the one optimizer.pt was saved with.
            if os.path.exists(os.path.join(os.fspath(folder), COMPRESSOR_CHECKPOINT_NAME)):
                self.optimizer = None
                self.compressor.attach(self.create_optimizer())
                self.lowrank_callback.load(folder)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        final = self.lowrank_callback.final_model
        if final is not None:
            self.model = final
            self.model_wrapped = final
        return output


def make_trainer(model: nn.Module, compressor, args, train_dataset, eval_dataset=None, **trainer_kwargs
                 ) -> LowRankTrainer:
    """``LowRankTrainer(model=model, args=args, train_dataset=..., compressor=compressor, ...)``.

    ``trainer_kwargs`` go to ``transformers.Trainer`` (``data_collator``, ``processing_class``,
    ``compute_metrics``, ``callbacks``, ``compute_loss_func``, ``optimizer_cls_and_kwargs`` ...).
    """
    return LowRankTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          compressor=compressor, **trainer_kwargs)
