"""ACIP's curve training (option ``curve_budgets``, not in the paper): the frozen phase trains every size.

After the scores freeze, ACIP fine-tunes the LoRA compensation and the non-target parameters at the
smallest size only, yet :meth:`ACIP.materialize` later puts pruned directions back for larger budgets:
those directions then meet a LoRA and a head that never saw them. With ``curve_budgets`` the frozen
phase trains at ``(budget, *curve_budgets)`` in turn (training step ``t`` at entry ``t mod n``,
Matryoshka-style nesting): the directions the global ranking gives back at each of those budgets sit,
frozen, in a branch beside their layer and are switched on for the steps of that budget::

    y = layer(x) + ((x V_r^T) * (S_r * m_b)) U_r^T      U_r [N, R], S_r [R], V_r [R, K]; m_b [R] in {0, 1}

``m_b`` marks the reservoir directions that ``materialize(b)`` puts back (every live direction stays: the
frozen model is within ``budget`` and the live directions lead the ranking), so a training step at ``b``
computes exactly the model ``materialize(b)`` returns (before its LoRA is merged and a layer at break-even
made dense); that holds for ``budget`` itself too. The branch is a
forward hook holding plain tensors: no Parameter, buffer or shape of the model changes (DDP and FSDP
need no rebuild, checkpoints hold nothing new: the branch is rebuilt from the ranking and the
reservoir), it adds nothing in eval mode (the training model stays what ``finalize`` returns), and
``finalize`` removes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from lrcomp.methods.acip import ACIP


class CurveBranch:
    """The frozen reservoir directions beside each layer, switched on per training step by budget."""

    def __init__(self, method: ACIP) -> None:
        self.cycle = (method.comp.config.budget, *method.options.curve_budgets)
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        chosen = [method.materialize_ranks(b) for b in self.cycle]
        for name, layer in method.lowrank_layers().items():
            live = {int(o) for o in method.origin[name]}
            picks = [set(c[name]) for c in chosen]
            if any(not live <= p for p in picks):
                raise RuntimeError(f"acip curve: materialize leaves out live directions of {name!r} at a budget "
                                   f"above the run's; the frozen model should be within its budget")
            added = sorted(set().union(*picks) - live)  # reservoir directions put back at some budget
            if not added:
                continue
            res = method.reservoir[name]
            like = layer.U
            U = torch.stack([res[o][0].to(like) for o in added], 1)
            V = torch.stack([res[o][2].to(like) for o in added], 0)
            S = torch.tensor([res[o][1] for o in added], dtype=like.dtype, device=like.device)
            on = torch.tensor([[o in p for o in added] for p in picks])
            d = S * on.to(S.device)  # [len(cycle), R]: row b, the directions that step b switches on
            hook = _branch_hook(method.comp, U.detach().clone(), d, V.detach().clone(), on.any(1).tolist())
            self._handles[name] = layer.register_forward_hook(hook, prepend=True)  # feature taps see the sum

    def remove(self) -> None:
        """Detach the branch from the training model."""
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}

    def strip(self, model: nn.Module) -> None:
        """Remove the branch's hooks from a deep copy of the training model (``copy.deepcopy`` copies hooks)."""
        for name, handle in self._handles.items():
            model.get_submodule(name)._forward_hooks.pop(handle.id, None)


def _branch_hook(comp, U: Tensor, d: Tensor, V: Tensor, used: list[bool]):
    """A forward hook adding ``((x V^T) * d[t mod n]) U^T`` to the layer's output in training mode.

    A closure, not a bound method: ``copy.deepcopy`` of the model then copies the function by reference
    instead of the whole method object (and :meth:`CurveBranch.strip` removes it from the copy)."""

    def hook(module: nn.Module, args, output: Tensor):
        row = comp.step_count % len(used)
        if not module.training or not used[row]:
            return None
        x = args[0]
        return output + F.linear(F.linear(x, V.to(x.dtype)) * d[row].to(x.dtype), U.to(x.dtype))

    return hook
