"""Checkpoints of a joint run: one safetensors file, written atomically, no pickle.

Tensors: ``model.*`` (the state dict), ``importance.<layer>`` (the allocator scores, which
are not part of the state dict), ``optim.<index>.<key>`` (per-parameter optimizer state, in
the optimizer's parameter order), ``method.<key>`` (method tensors) and ``rng.cpu``.
Metadata (JSON strings): the step, the structure of every targeted layer (rank, LoRA, dense
branch, scales), the optimizer's parameter groups and scalar state, the method's JSON state.

Every tensor carries a CRC-32 (:mod:`lrcomp.integrity`): a truncated or corrupted file is refused
with a ValueError naming it before anything is loaded. Loading first reshapes each low-rank layer to
the saved rank (new parameters, swapped into the optimizer), so a run that compacted its layers resumes
exactly where it stopped.

Under ``torch.distributed`` both are collective (every rank calls them): the model, optimizer and
method state are the same on every rank, so rank 0 alone writes the file while the others wait at a
barrier; the CPU RNG state of every rank is gathered first (``rng.cpu`` is rank 0's, ``rng.cpu.<r>``
rank r's for r >= 1), so on loading, which every rank does from the same file, each rank gets its own
RNG state back (a rank missing from the file, after a change of world size, takes rank 0's).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lrcomp import atomic, integrity
from lrcomp import distributed as dist_utils
from lrcomp.layers.lowrank_linear import LowRankLinear, _swap_in_optimizer

if TYPE_CHECKING:
    from lrcomp.methods.compressor import Compressor

FORMAT = "lrcomp.checkpoint.v1"


def _structure(module: nn.Module) -> dict[str, Any]:
    if not isinstance(module, LowRankLinear):
        return {"type": "linear"}
    return {"type": "lowrank", "rank": module.rank,
            "lora_rank": module.lora_A.shape[0] if module.lora_A is not None else 0,
            "lora_scale": module.lora_scale, "dense": module.dense_weight is not None,
            "dense_scale": module.dense_scale, "lowrank_scale": module.lowrank_scale,
            "importance": module.importance is not None}


def _split(state: dict[str, Any], prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {f"{prefix}{k}": v.detach().cpu().contiguous().clone() for k, v in state.items() if isinstance(v, Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
    return tensors, scalars


def save(comp: Compressor, path) -> None:
    rng_states = dist_utils.all_gather_object(torch.get_rng_state())  # collective: before rank 0 goes its way
    with dist_utils.on_rank0_then_barrier() as writer:
        if writer:
            _save(comp, path, rng_states)


def _save(comp: Compressor, path, rng_states: list[Tensor]) -> None:
    model = comp.model
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    structure = {n: _structure(model.get_submodule(n)) for n in comp.targets}
    for name in comp.targets:
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear) and module.importance is not None:
            tensors[f"importance.{name}"] = module.importance.detach().cpu().contiguous().clone()
    optim_meta = None
    if comp.optimizer is not None:
        state = comp.optimizer.state_dict()
        scalars = {}
        for index, per_param in state["state"].items():
            t, s = _split(per_param, f"optim.{index}.")
            tensors.update(t)
            scalars[str(index)] = s
        optim_meta = {"param_groups": state["param_groups"], "scalars": scalars}
    method_tensors, method_json = _split(comp.method.state_dict(), "method.")
    tensors.update(method_tensors)
    tensors["rng.cpu"] = rng_states[0]
    for r, state in enumerate(rng_states[1:], start=1):
        tensors[f"rng.cpu.{r}"] = state
    metadata = {
        "format": FORMAT, "method": comp.config.method, "step": str(comp.step_count),
        "structure": json.dumps(structure), "optimizer": json.dumps(optim_meta),
        "method_state": json.dumps(method_json),
    }
    atomic.save_safetensors(tensors, path, metadata)


def _reshape(module: LowRankLinear, info: dict[str, Any], optimizer) -> None:
    """Give ``module`` the saved rank / LoRA / dense branch with fresh parameters (values come from the file)."""
    if module.rank != info["rank"]:
        r = info["rank"]
        shapes = {"U": (module.out_features, r), "S": (r,), "V": (r, module.in_features), "scores": (r,)}
        for name, shape in shapes.items():
            old = getattr(module, name)
            new = nn.Parameter(old.new_zeros(shape), requires_grad=old.requires_grad)
            if optimizer is not None:
                _swap_in_optimizer(optimizer, old, new, lambda t: t)  # state is reloaded from the file
            setattr(module, name, new)
        module.active = module.active.new_ones(info["rank"])
    if info["lora_rank"] and module.lora_A is None:
        module.add_lora(info["lora_rank"])
    if info["dense"] and module.dense_weight is None:
        module.attach_dense(module.V.new_zeros(module.out_features, module.in_features), scale=0.0)
    if not info["dense"] and module.dense_weight is not None:
        module.drop_dense()
    module.lora_scale = info["lora_scale"]
    module.lowrank_scale = info["lowrank_scale"]


def load(comp: Compressor, path) -> None:
    tensors, metadata = integrity.read_safetensors(path, "training checkpoint")  # truncated / corrupted: ValueError
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an lrcomp checkpoint (format {metadata.get('format')!r})")
    if metadata["method"] != comp.config.method:
        raise ValueError(f"{path} is a checkpoint of method {metadata['method']!r}, not {comp.config.method!r}")
    model = comp.model
    structure = json.loads(metadata["structure"])
    if sorted(structure) != sorted(comp.targets):
        raise ValueError(f"{path} holds other targeted layers than this model "
                         f"({len(structure)} vs {len(comp.targets)})")
    comp.method.restore_structure(structure) if hasattr(comp.method, "restore_structure") else None
    for name, info in structure.items():
        module = model.get_submodule(name)
        if (info["type"] == "lowrank") != isinstance(module, LowRankLinear):
            raise ValueError(f"layer {name!r} is {type(module).__name__} here but {info['type']} in {path}")
        if isinstance(module, LowRankLinear):
            _reshape(module, info, comp.optimizer)
    device = next(model.parameters()).device
    model_state = {k[len("model."):]: v.to(device) for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_state, strict=True)
    model.zero_grad(set_to_none=True)  # gradients are never part of a checkpoint: start the next step clean
    for name, info in structure.items():
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            module.dense_scale = info["dense_scale"]
            imp = tensors.get(f"importance.{name}")
            module.importance = imp.to(device) if imp is not None else None
    optim_meta = json.loads(metadata["optimizer"])
    if comp.optimizer is not None and optim_meta is not None:
        state = {}
        for index, scalars in optim_meta["scalars"].items():
            prefix = f"optim.{index}."
            entry = dict(scalars)
            entry.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            state[int(index)] = entry
        groups = optim_meta["param_groups"]
        for saved, current in zip(groups, comp.optimizer.param_groups, strict=False):
            for key, value in current.items():  # JSON turned tuples (AdamW's betas) into lists
                if isinstance(value, tuple) and isinstance(saved.get(key), list):
                    saved[key] = tuple(saved[key])
        comp.optimizer.load_state_dict({"state": state, "param_groups": groups})
    method_state = json.loads(metadata["method_state"])
    method_state.update({k[len("method."):]: v.to(device) for k, v in tensors.items() if k.startswith("method.")})
    comp.method.load_state_dict(method_state)
    torch.set_rng_state(tensors.get(f"rng.cpu.{dist_utils.rank()}", tensors["rng.cpu"]))  # rank 0: "rng.cpu"
    comp.step_count = int(metadata["step"])
