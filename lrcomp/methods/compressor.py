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

Budget accounting counts the weights of the targeted layers as deployed: a dense layer costs ``K N``, a
low-rank one ``(active_rank + q) (K + N)`` with ``q`` its LoRA rank, or ``K N`` at and past break-even
(:meth:`Compressor.finalize` makes such a layer an ``nn.Linear``, the same function), plus ``K N`` while
its dense branch has a nonzero scale; biases are not counted (they are never compressed).

Under ``torchrun`` with ``DistributedDataParallel`` (every rank runs the same script on its own shard
of the data)::

    dist.init_process_group("nccl")                               # or "gloo" on CPUs
    comp = lrcomp.Compressor(model, config, calib_data=my_shard)  # the PLAIN model: layers replaced first,
                                                                  # statistics all-reduced over the ranks
    opt = torch.optim.AdamW(comp.parameters(), lr=...); comp.attach(opt)
    comp.wrap_ddp(device_ids=[local_rank])                        # builds comp.ddp_model around comp.model
    for batch in my_loader:
        out = comp.ddp_model(batch["x"])                          # always through comp.ddp_model: it is rebuilt
        loss = comp.loss(task_loss(out, batch), inputs=batch["x"], outputs=out)
        loss.backward(); opt.step(); opt.zero_grad()              # DDP averages the gradients
        comp.step()                                               # on every rank; True when the structure
                                                                  # changed (comp.ddp_model rebuilt already)
        if comp.step_count % 100 == 0:
            comp.save_checkpoint("ckpt.safetensors")              # on every rank; rank 0 writes
    model = comp.finalize()                                       # on every rank; releases the wrapper

The design: the methods change the model's structure during the run (compaction drops pruned
directions and slices their parameters; LPAF swaps a dense weight for ``U, S, V``; ACIP freezes its
scores; dense branches are dropped), which an existing DDP wrapper cannot follow (its buckets and
hooks are bound to the old parameters). So the Compressor always works on the unwrapped model, and
:meth:`step` compares the model's parameters and buffers (identity, shape, ``requires_grad``) before
and after the method's hook and returns True when they changed; a wrapper made by :meth:`wrap_ddp` is
then rebuilt at once (``DistributedDataParallel(comp.model, **the same kwargs)``: it broadcasts rank
0's parameters and buffers, which are already identical). A user-built wrapper must be rebuilt by the
user when ``comp.step()`` returns True. Rebuilding costs one broadcast of the model, only at the steps
that change the structure. Compaction is not deferred, so the memory and time savings of a shrinking
model hold under DDP too.

Decisions are identical on every rank: parameters are (DDP all-reduces the gradients, so every rank
takes the same optimizer step), calibration statistics are summed over the ranks
(:func:`lrcomp.calibrate`), and scores that a method accumulates from the *local* gradient (LPAF's
movement / first-order scores) are averaged over the ranks before they are used. ``step``,
``save_checkpoint``, ``load_checkpoint`` and ``finalize`` are collective: call them on every rank.
With the global batch split evenly over the ranks (per-rank loss = the mean over the local part), DDP's
averaged gradient is the single-process gradient of the full batch, so a DDP run follows the
single-process run up to floating-point summation order.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``: parameters, gradients and optimizer state sharded
over the ranks)::

    comp = lrcomp.Compressor(model, config, calib_data=my_shard)  # the PLAIN model, as for DDP
    opt = torch.optim.AdamW(comp.parameters(), lr=...); comp.attach(opt)
    comp.wrap_fsdp(units=[f"encoder.layer.{i}" for i in range(12)])  # fully_shard each unit, then the root,
                                                                  # IN PLACE: comp.model (= model) is sharded
    for batch in my_loader:
        out = comp.model(batch["x"])
        loss = comp.loss(task_loss(out, batch), inputs=batch["x"], outputs=out)
        loss.backward(); opt.step(); opt.zero_grad()              # FSDP reduce-scatters (averages) gradients
        comp.step()                                               # on every rank (collective)
    model = comp.finalize()                                       # on every rank; a plain, full model

FSDP2 shards the model in place and cannot follow a structure change, and torch has no inverse of
``fully_shard``. The design (the simplest that keeps the shards between steps): :meth:`step` all-gathers
the parameters into the model as plain full Parameters (the same bits on every rank) and re-keys the
optimizer to them, its state staying sharded; the method's hook runs on that ordinary module (every
decision from identical data, as under DDP). If the structure did not change, the values are written
back into the same shards (no communication, same Parameter objects); if it did, FSDP is removed from the
model (:func:`lrcomp.distributed.strip_fsdp_`) and ``fully_shard`` applied again with the same
arguments (:meth:`_rebuild_wrapper`, the path DDP's rebuild takes); the optimizer you attached is re-keyed
to the new sharded Parameters, state of an unchanged layout kept, state that compaction sliced gathered
and split again. Costs per :meth:`step`: one all-gather of the parameters and one full copy of them on
every rank while the hook runs; at a structure change also ``fully_shard``. Checkpoints gather the
optimizer state too (rank 0 writes one full file, as under DDP). Only an optimizer given to
:meth:`attach` follows; anything else holding the model's Parameters goes stale when the structure changes.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lrcomp import distributed as dist_utils
from lrcomp.calib.calibrate import calibrate
from lrcomp.compression.config import JOINT_METHODS, CompressionConfig
from lrcomp.methods import checkpoint
from lrcomp.methods.base import JointMethod, densify_past_break_even, weight_cost
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


#: key marking the parameter group of the parameters outside the targeted layers (``config.other_lr``)
OTHER_GROUP = "lrcomp_other"


_SHARDED_ALREADY = ("the model is sharded by fully_shard already: give the Compressor the plain model and let "
                    "comp.wrap_fsdp(units, **kwargs) shard it (it must re-apply the sharding after every structure "
                    "change)")


def split_off_other(given: list, inside: set[int], lr: float) -> list[dict]:
    """``given`` (Parameters or group dicts) as group dicts whose parameters outside ``inside`` (ids) moved to
    one last group at ``lr`` marked :data:`OTHER_GROUP`; a group that sets its own lr keeps all of its own."""
    groups = [dict(g) for g in given] if given and isinstance(given[0], dict) else [{"params": list(given)}]
    other = []
    for group in groups:
        params = list(group["params"])
        if "lr" in group:
            group["params"] = params
            continue
        group["params"] = [p for p in params if id(p) in inside]
        other += [p for p in params if id(p) not in inside]
    return [*groups, {"params": other, "lr": lr, OTHER_GROUP: True}]


def method_class(name: str) -> type[JointMethod]:
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of the joint methods {JOINT_METHODS}, got {name!r}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


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

    Distributed (DDP): build it on the plain model on every rank (each with its own shard of
    ``calib_data``: the statistics are summed over the ranks), then wrap the model with
    :meth:`wrap_ddp` and train through :attr:`ddp_model`, which :meth:`step` rebuilds whenever the
    structure changes (compaction, factorisation, frozen parameters); :meth:`step` returns True then,
    for a wrapper of your own. ``step``, ``save_checkpoint`` (rank 0 writes), ``load_checkpoint`` and
    ``finalize`` are collective. See the module docstring for the loop and the design.

    Distributed (FSDP2): the same, with :meth:`wrap_fsdp` instead, which shards :attr:`model` in place
    (train through ``comp.model``); ``compact`` and ``materialize`` are collective too.

    Raises:
        ValueError: unknown method (the message lists them), total_steps <= 0, no targeted layer
            (the message lists the linear layers), a budget that the targeted layers cannot
            reach, a teacher whose outputs do not match the student's, a model sharded by
            ``fully_shard`` already (give the plain model, then :meth:`wrap_fsdp`).
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
        if dist_utils.is_fsdp(model):  # its targets would be FSDP classes, which target selection leaves alone
            raise ValueError(_SHARDED_ALREADY)
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
        self.ddp_model: nn.Module | None = None  # the DistributedDataParallel wrapper made by wrap_ddp
        self._ddp_kwargs: dict[str, Any] | None = None
        self._fsdp: dict[str, Any] | None = None  # wrap_fsdp's units and fully_shard arguments
        self._full: dist_utils.FullParameters | None = None  # set while an FSDP model holds full parameters
        self._kept_cost: int | None = None  # kept_cost() as of the last time the FSDP model was full
        self.step_count = 0
        self.last_terms: dict[str, float] = {}
        self._checked_teacher = False

        stats = None
        self._calib_data = None
        if self.method.needed_stats:
            if calib_data is None:
                raise ValueError(f"method {config.method!r} needs calibration statistics "
                                 f"{self.method.needed_stats}: pass calib_data")
            if self.method.calibrates_at_setup():
                self._calib_data = calib_data
                stats = self.calibration_stats(save_path=config.calib_save_path)
            else:  # calibrated later, so a one-shot iterator is read now (the batches calibration would use)
                self._calib_data = (list(itertools.islice(calib_data, config.calib_max_batches))
                                    if isinstance(calib_data, Iterator) else calib_data)
        self.method.setup(stats)
        self._student_tap = self._teacher_tap = None
        if self.teacher is not None and self.feature_weight > 0:
            missing = [n for n in self.targets if not _has_module(self.teacher, n)]
            if missing:
                raise ValueError(f"feature distillation needs the teacher to have the targeted layers; missing: "
                                 f"{missing[:5]}")
            self._student_tap = FeatureTap(model, self.targets, detach=False)
            self._teacher_tap = FeatureTap(self.teacher, self.targets, detach=True)

    def calibration_stats(self, save_path=None):
        """The method's ``needed_stats`` of the targeted layers, from ``calib_data`` on the model as it is now.

        Called at construction (``save_path``: ``config.calib_save_path``) or, for a method that calibrates
        mid-run, by the method (no save path: a saved file would hold statistics of another state of the model).
        Collective under torch.distributed (the statistics are summed over the ranks).
        """
        config = self.config
        return calibrate(self.model, self._calib_data, stats=self.method.needed_stats, target_modules=self._exact(),
                         loss_fn=self.loss_fn, max_batches=config.calib_max_batches,
                         group_size=config.calib_group_size, save_path=save_path)

    def _exact(self) -> str:
        import re

        return "|".join(re.escape(n) for n in self.targets)

    # ------------------------------------------------------------------ training-loop API
    def parameters(self) -> list:
        """The parameters this method trains (give them to the optimizer, then :meth:`attach` it): a list of
        Parameters or of parameter-group dicts.

        With ``config.other_lr`` the trained parameters outside the targeted layers (embeddings, norms,
        heads) leave the method's groups that have no lr of their own for one last group at that lr, marked
        :data:`OTHER_GROUP` (always present, possibly empty, so the group layout never depends on the model).
        """
        given = self.method.trainable_parameters()
        if self.config.other_lr is None:
            return given
        inside = {id(p) for n in self.targets for p in self.model.get_submodule(n).parameters()}
        return split_off_other(given, inside, self.config.other_lr)

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
        if penalty is not None and self._fsdp is not None and dist_utils.is_dtensor(penalty):
            raise RuntimeError(f"method {self.config.method!r} computes its penalty from parameters that are sharded "
                               f"now: call comp.loss() right after the forward of comp.model, with the FSDP units "
                               f"that hold targeted layers kept unsharded after forward (reshard_after_forward=False)")
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
                wrapped = self._ddp_kwargs is not None or self._fsdp is not None  # gradients averaged over ranks
                feat = feature_loss(self._student_tap.outputs, self._teacher_tap.outputs, over_ranks=wrapped)
                if feat is not None:
                    total = total + self.feature_weight * feat
                    terms["feature"] = float(feat.detach())
        self.last_terms = terms
        return total

    def wrap_ddp(self, **ddp_kwargs) -> nn.Module:
        """Wrap :attr:`model` in ``torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)`` and keep it
        as :attr:`ddp_model`, rebuilt by :meth:`step` whenever the model's structure changes. Train through
        ``comp.ddp_model`` (look it up at every step: it is replaced). Returns the wrapper.

        Call it after the Compressor is built (the layers are replaced then). Needs an initialised process group.
        """
        if not dist_utils.is_distributed():
            raise RuntimeError("wrap_ddp needs torch.distributed to be initialised (init_process_group)")
        if self._fsdp is not None:
            raise RuntimeError("the model is sharded by wrap_fsdp already: use one of wrap_ddp and wrap_fsdp")
        self._ddp_kwargs = dict(ddp_kwargs)
        self._build_ddp()
        return self.ddp_model

    def _build_ddp(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.ddp_model = None  # release the old wrapper (its reducer) before building the new one
        self.ddp_model = DistributedDataParallel(self.model, **self._ddp_kwargs)

    def wrap_fsdp(self, units=None, **fsdp_kwargs) -> nn.Module:
        """Shard :attr:`model` in place with FSDP2: ``fully_shard`` on each of ``units`` (deepest first), then
        on the root, each with ``fsdp_kwargs`` (``mesh``, ``reshard_after_forward``, ``mp_policy``, ...).
        :meth:`step` applies it again whenever the structure changes (see the module docstring). Train
        through ``comp.model`` (the same object: FSDP2 has no wrapper). Returns it.

        Args:
            units: the submodules that form their own FSDP groups (e.g. the transformer blocks): names,
                a predicate ``(name, module) -> bool`` evaluated on the current structure at every
                re-shard, or None (one group, the root; its parameters stay unsharded from the forward to
                the end of the backward).
            fsdp_kwargs: for ``fully_shard``; without ``mesh``, ``fully_shard``'s default (a 1-D mesh over the
                default group, on the accelerator if there is one, else the CPU) is made once and reused.

        Call it after the Compressor is built (the layers are replaced and calibrated then, on the plain
        model) and before or after :meth:`attach` (an attached optimizer is re-keyed to the shards; else build
        it from :meth:`parameters` now, which returns the sharded Parameters). The teacher is not sharded.
        Between steps the parameters are DTensor shards: :meth:`kept_cost` then reports the value of the last
        :meth:`step`, and :meth:`loss` needs the targeted layers' parameters unsharded when the method has a
        penalty (ACIP's scores): ``units=None`` or ``reshard_after_forward=False``.

        Raises:
            RuntimeError: no process group, or the model is wrapped by :meth:`wrap_ddp` already.
            ValueError: the model is sharded already (pass the plain model: the Compressor must own the
                sharding to apply it again), a unit that does not exist, a penalty with parameters
                resharded after forward.
        """
        if not dist_utils.is_distributed():
            raise RuntimeError("wrap_fsdp needs torch.distributed to be initialised (init_process_group)")
        if self._ddp_kwargs is not None or self._fsdp is not None:
            raise RuntimeError("the model is wrapped already (wrap_ddp or wrap_fsdp): wrap it once")
        if dist_utils.is_fsdp(self.model):
            raise ValueError(_SHARDED_ALREADY)
        reshard = fsdp_kwargs.get("reshard_after_forward")
        if type(self.method).penalty is not JointMethod.penalty and not (
                reshard is False or (reshard is None and units is None)):
            raise ValueError(f"method {self.config.method!r} adds a penalty computed from the targeted layers' "
                             f"parameters in comp.loss(), after the forward: they must still be unsharded then. "
                             f"Use units=None (the root keeps its parameters through the backward) or "
                             f"reshard_after_forward=False")
        dist_utils.fsdp_unit_names(self.model, units)  # a missing unit fails now
        if "mesh" not in fsdp_kwargs:  # fully_shard's default, made once: every re-shard uses the same mesh
            from torch.distributed.device_mesh import init_device_mesh

            accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
            fsdp_kwargs["mesh"] = init_device_mesh(accelerator.type if accelerator is not None else "cpu",
                                                   (dist_utils.world_size(),))
        self._fsdp = {"units": units, **fsdp_kwargs}
        self._rebuild_wrapper()
        return self.model

    def _rebuild_wrapper(self) -> None:
        """Re-create the data-parallel wrapping around the current structure (after a structure change or a
        checkpoint load): a new ``DistributedDataParallel`` (the one of :meth:`wrap_ddp`, if any), or
        ``fully_shard`` applied again (:meth:`wrap_fsdp`; the model holds its full parameters then)."""
        if self.ddp_model is not None:
            self._build_ddp()
        elif self._fsdp is not None:
            self._kept_cost = self._kept_cost_now()
            old, self._full = self._full, None
            if old is not None:
                old.release()  # the model holds the full parameters: the old shards are dead weight
            dist_utils.shard_fsdp_(self.model, self.optimizer, **self._fsdp)

    @contextlib.contextmanager
    def _full_parameters(self, *, plain: bool = False, full_state: bool = False, reshard: bool = True):
        """The body sees :attr:`model` with full (plain) parameters; a no-op unless the model is sharded by
        :meth:`wrap_fsdp` (or when nested). Collective.

        ``plain``: FSDP removed from the model too (its ``state_dict`` and ``deepcopy`` are then the ordinary
        ones); ``full_state``: the optimizer state gathered too. On exit the model is sharded again: the same
        shards with the new values when its parameters are the ones gathered, else ``fully_shard`` anew (done
        already when the body called :meth:`_rebuild_wrapper`); ``reshard=False`` leaves it plain and ends
        the FSDP wrapping (:meth:`finalize`).
        """
        if self._fsdp is None or self._full is not None:
            yield
            return
        from torch.distributed.tensor.experimental import implicit_replication

        self._full = dist_utils.gather_fsdp_(self.model, self.optimizer, full_state=full_state)
        try:
            if plain:
                dist_utils.strip_fsdp_(self.model)
            with implicit_replication():  # compaction slices sharded optimizer state with plain indices
                yield
        finally:
            if self._full is not None:
                self._kept_cost = self._kept_cost_now()
                if not reshard:
                    self._full = self._fsdp = None
                elif plain or not self._full.intact():
                    self._rebuild_wrapper()
                else:
                    full, self._full = self._full, None
                    full.restore(self.optimizer)

    def step(self) -> bool:
        """Call once after every optimizer step (on every rank): schedules, masks, pruning and compaction.

        Returns True when the model's structure changed in this step (parameters replaced, reshaped,
        frozen or unfrozen; buffers replaced): a ``DistributedDataParallel`` wrapper of the model is then
        stale. The one made by :meth:`wrap_ddp` has been rebuilt already; rebuild your own. Under
        :meth:`wrap_fsdp` the method runs on the full parameters and the model is sharded again (anew when
        the structure changed); see the module docstring.
        """
        self.step_count += 1
        with self._full_parameters(plain=self.method.runs_model_at(self.step_count)):
            keep = (list(self.model.parameters()), list(self.model.buffers()))  # ids stay unique while compared
            before = dist_utils.structure_signature(self.model)
            self.method.on_step(self.step_count)
            changed = dist_utils.structure_signature(self.model) != before
            del keep
            if changed:
                self._rebuild_wrapper()
        return changed

    def compact(self) -> int:
        """Physically drop every pruned direction of the low-rank targets (optimizer state sliced too).

        Returns the number of directions dropped.
        """
        dropped = 0
        with self._full_parameters():
            for layer in self.method.lowrank_layers().values():
                before = layer.rank
                if layer.active_rank < before:
                    layer.compact_(self.optimizer)
                    dropped += before - layer.rank
        return dropped

    def kept_cost(self) -> int:
        """Weights the targeted layers keep now (see the module docstring).

        Under :meth:`wrap_fsdp`, between steps (sharded parameters): the value at the end of the last
        :meth:`step` (not a collective, so it may be called on one rank only).
        """
        if self._fsdp is not None and self._full is None:
            return self._kept_cost
        return self._kept_cost_now()

    def _kept_cost_now(self) -> int:
        return sum(weight_cost(self.model.get_submodule(n)) for n in self.targets)

    def kept_fraction(self) -> float:
        return self.kept_cost() / self.total_cost

    def finalize(self) -> nn.Module:
        """End the run: the compact model at the budget (no dense branch, nothing pruned left in memory; a
        target whose factors would cost as much as its dense weight ends as an ``nn.Linear``).

        Under :meth:`wrap_fsdp` the model ends plain and full on every rank (FSDP removed), the attached
        optimizer with it (full state).
        """
        with self._full_parameters(plain=True, full_state=True, reshard=False):
            model = self.method.finalize()
        self.ddp_model = None  # the structure changed: a wrapper of the old one is useless
        for tap in (self._student_tap, self._teacher_tap):
            if tap is not None:
                tap.remove()
        densify_past_break_even(model, self.targets)  # there the factors cost at least the dense weight
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
        with self._full_parameters(plain=True):  # under wrap_fsdp: a plain copy, on every rank
            return self.method.materialize(budget)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "method": self.method.state_dict()}

    def save_checkpoint(self, path) -> None:
        """Model, optimizer, method state, step and RNG to one safetensors file, written atomically.

        Under torch.distributed: call it on every rank; rank 0 writes (the state is the same on every
        rank, except the RNG states, which are gathered so each rank resumes its own), the others wait.
        Under :meth:`wrap_fsdp` the parameters and the optimizer state are gathered first (the same file).
        """
        with self._full_parameters(plain=True, full_state=True):
            checkpoint.save(self, path)

    def load_checkpoint(self, path) -> None:
        """Resume: reshape the layers to the checkpoint's ranks, then load everything :meth:`save_checkpoint` wrote.

        Under torch.distributed: call it on every rank (each reads the file); a wrapper made by
        :meth:`wrap_ddp` is rebuilt around the reshaped model, one made by :meth:`wrap_fsdp` shards it anew
        (the file is the one a DDP or single-process run writes).
        """
        with self._full_parameters(plain=True):
            checkpoint.load(self, path)
            self._rebuild_wrapper()


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
