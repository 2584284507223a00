"""Distillation from a frozen dense teacher: logit KL with temperature and per-layer feature MSE.

    L_kd   = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))        (Hinton et al. 2015)
    L_feat = mean over layers of ||y_s - y_t||^2 / ||y_t||^2      (outputs of each targeted layer)

Both terms keep the student's graph (nothing is detached on the student side), so their
gradients reach every trainable parameter; the teacher runs under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrcomp import distributed as dist_utils


def logits_of(outputs) -> Tensor | None:
    """The logits of a model output: ``.logits``, ``["logits"]``, a tensor, or the first tensor of a tuple."""
    if isinstance(outputs, Tensor):
        return outputs
    value = getattr(outputs, "logits", None)
    if value is None and isinstance(outputs, Mapping):
        value = outputs.get("logits")
    if value is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        value = outputs[0]
    return value


def call_model(model: nn.Module, batch):
    """Call ``model`` the way lrcomp calls it everywhere: dict -> ``**batch``, tuple -> ``batch[0]``, tensor."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 KL(p_t || p_s)`` over the last dim, averaged over the other dims."""
    t = float(temperature)
    log_s = F.log_softmax(_wide(student) / t, dim=-1)
    log_t = F.log_softmax(_wide(teacher) / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean() * t * t


class FeatureTap:
    """Forward hooks that keep the latest output of each named module (student side keeps the graph)."""

    def __init__(self, model: nn.Module, names: list[str], detach: bool) -> None:
        self.outputs: dict[str, Tensor] = {}
        self._handles = []
        self._detach = detach
        self.bind(model, names)

    def bind(self, model: nn.Module, names: list[str]) -> None:
        self.remove()
        for name in names:
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output.detach() if self._detach else output
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.outputs = {}


def _wide(t: Tensor) -> Tensor:
    """``t`` in at least fp32 (fp64 stays fp64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def feature_loss(student: dict[str, Tensor], teacher: dict[str, Tensor], *, over_ranks: bool = False) -> Tensor | None:
    """Mean over the shared layers of the relative squared error of the student's outputs.

    ``over_ranks=True`` is for a model trained under DDP / FSDP, which average the gradients over
    the ranks: each layer's denominator ``||y_t||^2`` is summed over the ranks' batches and the
    term scaled by the world size, so the averaged gradient is that of the relative error over
    the whole global batch (as one process on all the data), not the mean of per-rank ratios.
    """
    errors, norms = [], []
    for name, ys in student.items():
        yt = teacher.get(name)
        if yt is None:
            continue
        if ys.shape != yt.shape:
            raise ValueError(f"feature distillation: layer {name!r} gives {tuple(ys.shape)} in the student but "
                             f"{tuple(yt.shape)} in the teacher")
        errors.append((_wide(ys) - _wide(yt)).square().sum())
        norms.append(_wide(yt).detach().square().sum())
    if not errors:
        return None
    norms_t, scale = torch.stack(norms), 1
    if over_ranks and dist_utils.world_size() > 1:
        dist_utils.all_reduce_sum_(norms_t)
        scale = dist_utils.world_size()
    return (torch.stack(errors) / norms_t.clamp_min(1e-12)).mean() * scale
