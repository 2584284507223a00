"""Small helpers for runs under ``torch.distributed`` (``torchrun``, DDP); no-ops in a single process.

Every helper that communicates (:func:`all_reduce_mean_`, :func:`all_reduce_sum_`,
:func:`broadcast_object`, :func:`all_gather_object`, the barrier of :func:`on_rank0_then_barrier`) is a
*collective*: under an initialised process group every rank must call it, in the same order. Without
one (or without ``torch.distributed``) they return at once and leave their argument as it is.

Used by :func:`lrcomp.calibrate` (statistics summed over the ranks), the joint methods (scores from
local gradients averaged before a decision) and the checkpoints (written by rank 0, read by all).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


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
