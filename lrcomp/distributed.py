"""Small helpers for runs under ``torch.distributed`` (``torchrun``, DDP, FSDP); no-ops in a single process.

Every helper that communicates (:func:`all_reduce_mean_`, :func:`all_reduce_sum_`,
:func:`broadcast_object`, :func:`all_gather_object`, the barrier of :func:`on_rank0_then_barrier`) is a
*collective*: under an initialised process group every rank must call it, in the same order. Without
one (or without ``torch.distributed``) they return at once and leave their argument as it is.

Used by :func:`lrcomp.calibrate` (statistics summed over the ranks), the joint methods (scores from
local gradients averaged before a decision) and the checkpoints (written by rank 0, read by all).

The FSDP part (:func:`gather_fsdp_`, :func:`strip_fsdp_`, :func:`shard_fsdp_`) lets
:class:`lrcomp.Compressor` change the structure of a model sharded by FSDP2
(``torch.distributed.fsdp.fully_shard``): it puts the full parameters back into the model, lets the
method work on an ordinary module, and shards it again. See :meth:`lrcomp.Compressor.wrap_fsdp`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 in a single process)."""
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks in the default group (1 in a single process)."""
    return _dist().get_world_size() if is_distributed() else 1


def _comm_device(tensor: Tensor) -> torch.device:
    """Where the default group can reduce ``tensor``: a CPU tensor goes through the current GPU under NCCL."""
    if tensor.device.type == "cpu" and _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the ranks, in place (every rank ends with the same bits); returns it.

    Under NCCL a CPU tensor is copied to the current GPU for the reduction and back.
    """
    if is_distributed():
        dist = _dist()
        device = _comm_device(tensor)
        if device == tensor.device:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        else:
            moved = tensor.to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            tensor.copy_(moved)
    return tensor


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over the ranks, in place (sum, then divide by the world size); returns it.

    Integer tensors are summed, then floor-divided.
    """
    if is_distributed():
        all_reduce_sum_(tensor)
        n = world_size()
        if tensor.is_floating_point() or tensor.is_complex():
            tensor.div_(n)
        else:
            tensor.floor_divide_(n)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it (pickled over the group), on every rank; ``obj`` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        _dist().barrier()


@contextlib.contextmanager
def on_rank0_then_barrier() -> Iterator[bool]:
    """``with on_rank0_then_barrier() as writer: if writer: save(...)``: only rank 0 writes, then every rank
    waits at a barrier, so a file written inside is complete when any rank goes on (and reads it).

    Yields True on rank 0 (and in a single process). The barrier is reached even when the body raises on
    rank 0 (the error then propagates there), so the other ranks are not left waiting forever.
    """
    try:
        yield rank() == 0
    finally:
        barrier()


def structure_signature(module: torch.nn.Module) -> tuple:
    """What a ``DistributedDataParallel`` wrapper depends on: every parameter (identity, shape, dtype,
    ``requires_grad``) and every buffer (identity, shape), in module order."""
    params = tuple((id(p), tuple(p.shape), p.dtype, p.requires_grad) for p in module.parameters())
    buffers = tuple((id(b), tuple(b.shape)) for b in module.buffers())
    return params, buffers


# ---------------------------------------------------------------------------------------------- FSDP2
# ``fully_shard`` (FSDP2) shards a module *in place*: every parameter becomes a DTensor sharded on dim 0
# (rank r holds rows ``torch.chunk(W, world)[r]``), the module's class becomes ``FSDP<Class>`` and hooks
# all-gather the parameters around each forward / backward and reduce-scatter (average) the gradients.
# A sharded module cannot follow a structure change (its parameter groups are fixed at the first forward)
# and torch offers no way to undo ``fully_shard``. The three functions below do what the Compressor needs:
#
#   gather_fsdp_  the full parameters (all-gathered, the same bits on every rank) replace the shards in
#                 the module, the optimizer is re-keyed to them (its state stays sharded unless asked);
#   strip_fsdp_   removes FSDP from the module (class, hooks, registration), leaving an ordinary module;
#   shard_fsdp_   strips, applies ``fully_shard`` again and re-keys the optimizer, sharding its state.
#
# ``FullParameters.restore`` undoes a gather whose structure did not change (values written back into the
# same shards, the same Parameter objects re-registered).


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_fsdp(module: nn.Module) -> bool:
    """True when ``fully_shard`` has been applied to ``module`` or to one of its submodules."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def is_dtensor(value: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (a sharded parameter or a result computed from one)."""
    try:
        return isinstance(value, _dtensor())
    except ImportError:  # pragma: no cover - torch without DTensor
        return False


def _local_chunk(full: Tensor, like: Tensor) -> Tensor:
    """This rank's part of ``full`` (the global tensor, ``[N, ...]``) laid out as the DTensor ``like`` (global
    ``[N, ...]``, local ``[N_r, ...]``): a new ``[N_r, ...]`` tensor.

    Replicate -> ``like.placements`` is a local split in DTensor (no communication), the same split FSDP2
    uses for its shards (``torch.chunk`` on dim 0; trailing ranks may hold fewer or no rows).
    """
    from torch.distributed.tensor import Replicate

    mesh = like.device_mesh
    replicated = _dtensor().from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    local = replicated.redistribute(mesh, like.placements).to_local()
    if tuple(local.shape) != tuple(like.to_local().shape):
        raise RuntimeError(f"lrcomp cannot lay out a tensor of shape {tuple(full.shape)} like this FSDP shard: local "
                           f"{tuple(local.shape)} != {tuple(like.to_local().shape)} ({like.placements})")
    return local.clone() if local.untyped_storage().data_ptr() == full.untyped_storage().data_ptr() else local


def _shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (global, plain) as a DTensor with ``like``'s mesh, placements, shape and stride."""
    return _dtensor().from_local(_local_chunk(full, like), like.device_mesh, like.placements, run_check=False,
                                 shape=like.shape, stride=like.stride())


@torch.no_grad()
def _full_value(value: Any) -> Any:
    """A DTensor as the full plain tensor (a collective for sharded ones); anything else as it is."""
    return value.full_tensor() if isinstance(value, _dtensor()) else value


@torch.no_grad()
def _sharded_value(value: Any, param: Tensor) -> Any:
    """Optimizer state ``value`` of the (sharded) ``param``: a tensor of the parameter's global shape laid out
    like it (kept when it already is; collective when a differently sharded DTensor must be gathered)."""
    if not isinstance(value, Tensor) or tuple(value.shape) != tuple(param.shape) or value.ndim == 0:
        return value  # AdamW's step counter and other scalars
    if isinstance(value, _dtensor()):
        if (value.device_mesh == param.device_mesh and value.placements == param.placements
                and value.to_local().shape == param.to_local().shape):
            return value
        value = value.full_tensor()
    return _shard_like(value, param)


def _rekey_optimizer(optimizer: torch.optim.Optimizer | None, mapping: dict[int, Tensor], convert=None) -> None:
    """Make ``optimizer`` train ``mapping[id(p)]`` instead of every ``p`` it maps (same group, same position).

    The per-parameter state moves along; ``convert(value, new_param)`` transforms each state value
    (called in the optimizer's parameter order, identical on every rank, so collectives inside line up).
    """
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(id(p), p) for p in group["params"]]
    for old in [p for p in list(optimizer.state) if id(p) in mapping]:
        new = mapping[id(old)]
        state = optimizer.state.pop(old)
        optimizer.state[new] = {k: convert(v, new) for k, v in state.items()} if convert else state


class FullParameters:
    """The record of one :func:`gather_fsdp_`: ``slots`` ``[(module, name, sharded, full)]``, one per place
    a sharded parameter was registered (a tied parameter has several places, one ``full`` Parameter)."""

    def __init__(self, slots: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]]) -> None:
        self.slots = slots

    @torch.no_grad()
    def release(self) -> None:
        """Free the old shards once the model is sharded anew: their storage (FSDP's padded shard buffer) is
        resized to 0 and their gradients dropped, so the memory returns at once, not when Python's cycle
        collector finds FSDP's old state (a reference cycle)."""
        for _, _, sharded, _ in self.slots:
            sharded.grad = None
            sharded.to_local().untyped_storage().resize_(0)
        self.slots = []

    def intact(self) -> bool:
        """True while every slot still holds the full Parameter put there, with the shape of its shard's tensor."""
        return all(module._parameters.get(name) is full and full.shape == sharded.shape
                   for module, name, sharded, full in self.slots)

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Undo the gather when the structure did not change: the full values (as the method left them)
        are written into the shards, the sharded Parameters (same objects, their gradients kept) are
        registered again and ``optimizer`` trains them again. No communication.

        Raises:
            RuntimeError: a slot no longer holds the full Parameter put there (the structure changed:
                use :func:`shard_fsdp_`).
        """
        mapping = {}
        for module, name, sharded, full in self.slots:
            if module._parameters.get(name) is not full or full.shape != sharded.shape:
                raise RuntimeError(f"parameter {name!r} of {type(module).__name__} was replaced while the model held "
                                   f"its full parameters: the structure changed, re-shard it instead")
            if id(full) not in mapping:
                sharded.to_local().copy_(_local_chunk(full, sharded))
                mapping[id(full)] = sharded
            setattr(module, name, sharded)
        _rekey_optimizer(optimizer, mapping)


def gather_fsdp_(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 full_state: bool = False) -> FullParameters:
    """Replace, in place, every FSDP-sharded parameter of ``model`` (a DTensor of global shape ``[N, ...]``,
    local ``[N_r, ...]``) by a plain ``nn.Parameter`` ``[N, ...]`` holding the full tensor (all-gathered: the
    same bits on every rank; same ``requires_grad``; no gradient).

    ``optimizer`` is re-keyed to the full Parameters; its state stays sharded (DTensors of the global
    shape) unless ``full_state``, which gathers it too (a collective per state tensor). FSDP's hooks stay
    on the model: do not run its forward or ``state_dict`` until :meth:`FullParameters.restore` or
    :func:`strip_fsdp_`. Collective: every rank calls it. Memory: one full copy of the parameters (and
    of the optimizer state with ``full_state``) on every rank.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # the registered parameters are the shards now (after a forward without backward too)
    DTensor = _dtensor()
    slots, full = [], {}
    with torch.no_grad():
        for module in model.modules():  # the same order on every rank: the all-gathers line up
            for name, param in list(module._parameters.items()):
                if not isinstance(param, DTensor):
                    continue
                if id(param) not in full:
                    full[id(param)] = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                setattr(module, name, full[id(param)])
                slots.append((module, name, param, full[id(param)]))
    _rekey_optimizer(optimizer, full, (lambda v, p: _full_value(v)) if full_state else None)
    return FullParameters(slots)


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
               "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_HOOK_EXTRAS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _from_fsdp(obj: Any) -> bool:
    """True for a hook (function, bound method, partial, wrapped hook) or state object defined by FSDP."""
    for attr in ("hook", "func", "__func__"):
        obj = getattr(obj, attr, obj)
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return isinstance(module, str) and module.startswith("torch.distributed.fsdp")


def strip_fsdp_(model: nn.Module) -> None:
    """Remove FSDP from every module of ``model`` in place: the original classes, no FSDP hook, no FSDP state,
    so that ``fully_shard`` can be applied again. User hooks stay. No-op on a model without FSDP.

    The model must hold full parameters (:func:`gather_fsdp_`). torch has no public inverse of
    ``fully_shard``; this undoes what it does in torch 2.13 (class swap, forward / state-dict hooks,
    the composable-API registration) and checks the result.

    Raises:
        RuntimeError: a parameter is still sharded, or FSDP could not be removed (another torch version).
    """
    try:
        import importlib

        from torch.distributed import _composable_state
        from torch.distributed.fsdp import FSDPModule

        contract = importlib.import_module("torch.distributed._composable.contract")  # the module, not the function
    except ImportError as err:  # pragma: no cover - depends on the torch version
        raise RuntimeError(f"lrcomp cannot remove FSDP with this torch version ({torch.__version__}): {err}") from err
    DTensor = _dtensor()
    for module in model.modules():
        if any(isinstance(p, DTensor) for p in module._parameters.values()):
            raise RuntimeError("strip_fsdp_ needs the full parameters in the model: call gather_fsdp_ first")
        if not isinstance(module, FSDPModule) and not getattr(module, "_is_fsdp_managed_module", False):
            continue
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr)
            for key in [k for k, fn in hooks.items() if _from_fsdp(fn)]:
                del hooks[key]
                for extra in _HOOK_EXTRAS:
                    getattr(module, extra).pop(key, None)
        mapping = _composable_state._module_state_mapping  # module -> weakref to its state
        ref = mapping.get(module)
        if ref is not None and (ref() is None or _from_fsdp(ref())):
            del mapping[module]  # before the state itself goes: it is only held weakly there
        states = module.__dict__.get(contract.STATE_KEY)
        if isinstance(states, dict):
            for key in [k for k, v in states.items() if _from_fsdp(v)]:
                del states[key]
        registry = module.__dict__.get(contract.REGISTRY_KEY)
        if isinstance(registry, dict):
            registry.pop("fully_shard", None)
        for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            module.__dict__.pop(attr, None)
        if isinstance(module, FSDPModule):
            mro = type(module).__mro__
            module.__class__ = mro[mro.index(FSDPModule) + 1]
        if isinstance(module, FSDPModule) or module in mapping or any(
                _from_fsdp(fn) for attr in _HOOK_DICTS for fn in getattr(module, attr).values()):
            raise RuntimeError(f"lrcomp could not remove FSDP from {type(module).__name__} "
                               f"(torch {torch.__version__})")


def fsdp_unit_names(model: nn.Module, units: Iterable[str] | Callable[[str, nn.Module], bool] | None) -> list[str]:
    """The submodules of ``model`` to shard as their own FSDP groups, deepest first (``fully_shard`` goes
    bottom-up); ``units``: names, a predicate ``(name, module) -> bool``, or None (the root only)."""
    if units is None:
        names = []
    elif callable(units):
        names = [n for n, m in model.named_modules() if n and units(n, m)]
    else:
        names = [n for n in units if n]
        for name in names:
            model.get_submodule(name)  # AttributeError names a missing one
    return sorted(dict.fromkeys(names), key=lambda n: -n.count("."))


def shard_fsdp_(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, units=None,
                **fsdp_kwargs) -> None:
    """(Re-)apply FSDP2 to ``model`` in place: :func:`strip_fsdp_`, ``fully_shard`` on each unit (see
    :func:`fsdp_unit_names`) and on the root with ``fsdp_kwargs``, then ``optimizer`` trains the new
    sharded Parameters, its state laid out like them (sharded state of an unchanged layout is kept,
    anything else is gathered and re-split). Collective.
    """
    from torch.distributed.fsdp import fully_shard

    strip_fsdp_(model)
    before = [(m, n, p) for m in model.modules() for n, p in m._parameters.items() if p is not None]
    for name in fsdp_unit_names(model, units):
        fully_shard(model.get_submodule(name), **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    mapping = {id(p): m._parameters[n] for m, n, p in before}
    with torch.no_grad():
        _rekey_optimizer(optimizer, mapping, _sharded_value)
