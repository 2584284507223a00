"""Collect per-layer calibration statistics by running a model over data (forward hooks, optional backward).

For every targeted ``nn.Linear`` ``y = x W^T + b`` (``W: [N, K]``) the statistics of
:mod:`lrcomp.calib.stats` are gathered from the rows ``x_t`` of its inputs and ``g_t = dL/dy_t`` of
its output gradients:

- ``input_cov = (1/T) X^T X`` through :class:`~lrcomp.calib.CovarianceAccumulator` (fp32 products
  folded into fp64; fp64 inputs are multiplied in fp64);
- ``input_abs_mean = (1/T) sum_t |x_t|``;
- ``grad_cov = (1/T) G^T G``;
- ``fisher[k] = (1/B) sum_batches sum_n (dW[n, k])^2`` with the per-batch weight gradient
  ``dW = G^T X`` (summed over the batch's tokens and over every call of the layer).

Gradients come from ``torch.autograd.grad(loss, layer outputs)``: parameters need not require
grad (a layer output that does not require grad is replaced by a detached copy that does), no
``.grad`` is written and no ``requires_grad`` flag is touched. The model goes on with a clone of
each targeted output (so in-place ops after a layer are safe; it costs one extra copy of those
outputs while a batch is in flight). Forward-only statistics run under ``torch.no_grad`` and add
no clone.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from lrcomp import distributed as dist_utils
from lrcomp.calib.covariance import CovarianceAccumulator
from lrcomp.calib.stats import GRADIENT_STATS, STAT_NAMES, CalibrationStats
from lrcomp.replace import find_target_linears

_LIST_NAMES = 20


class _Cov:
    """``sum X^T X`` in fp64: CovarianceAccumulator for bf16/fp16/fp32 rows, a plain fp64 GEMM for fp64 rows."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.acc: CovarianceAccumulator | None = None
        self.fp64: Tensor | None = None

    def update(self, x: Tensor) -> None:
        if x.shape[0] == 0:
            return
        if x.dtype == torch.float64:
            prod = x.mT @ x
            self.fp64 = prod if self.fp64 is None else self.fp64 + prod
            return
        if self.acc is None:
            self.acc = CovarianceAccumulator(self.dim, device=x.device)
        self.acc.update(x if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else x.float())

    def total(self) -> Tensor:
        total = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        if self.acc is not None and self.acc.count:
            total += self.acc.covariance(normalize=False).cpu()
        if self.fp64 is not None:
            total += self.fp64.cpu()
        return total


class _LayerStats:
    """Running sums for one layer over one pass."""

    def __init__(self, module: nn.Linear, stats: Sequence[str]) -> None:
        K, N = module.in_features, module.out_features
        self.stats = stats
        self.tokens = 0
        self.input_cov = _Cov(K) if "input_cov" in stats else None
        self.grad_cov = _Cov(N) if "grad_cov" in stats else None
        self.abs_sum = torch.zeros(K, dtype=torch.float64) if "input_abs_mean" in stats else None
        self.fisher_sum = torch.zeros(K, dtype=torch.float64) if "fisher" in stats else None
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []  # (x rows, y, token index) this batch

    def add_input(self, x: Tensor) -> None:
        self.tokens += x.shape[0]
        if self.input_cov is not None:
            self.input_cov.update(x)
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0, dtype=torch.float64).cpu()

    def add_grads(self, grads: list[Tensor | None]) -> None:
        """Consume this batch's calls: output gradients ``dL/dy`` (None = the loss does not depend on y)."""
        dW = None
        for (x, _y, index), g in zip(self.calls, grads, strict=True):
            if g is None:
                continue
            g = g.detach().reshape(-1, g.shape[-1]) if index is None else g.detach()[index]
            if self.grad_cov is not None:
                self.grad_cov.update(g)
            if self.fisher_sum is not None:
                dtype = torch.promote_types(g.dtype, torch.float32)
                part = g.to(dtype).mT @ x.to(dtype)
                dW = part if dW is None else dW + part
        if dW is not None:
            self.fisher_sum += dW.double().square().sum(0).cpu()
        self.calls = []

    def sums(self) -> dict[str, Tensor]:
        """The unnormalised fp64 CPU sums of this pass (what is all-reduced over the ranks)."""
        out = {}
        if self.input_cov is not None:
            out["input_cov"] = self.input_cov.total()
        if self.grad_cov is not None:
            out["grad_cov"] = self.grad_cov.total()
        if self.abs_sum is not None:
            out["input_abs_mean"] = self.abs_sum
        if self.fisher_sum is not None:
            out["fisher"] = self.fisher_sum
        return {name: out[name] for name in STAT_NAMES if name in out}


def _normalise(sums: dict[str, Tensor], tokens: int, batches: int) -> dict[str, Tensor]:
    """Covariances and the mean magnitude per token, the Fisher diagonal per batch."""
    return {name: total / (batches if name == "fisher" else tokens) for name, total in sums.items()}


def _all_reduce_sums(sums: dict[str, dict[str, Tensor]], tokens: dict[str, int], batches: int):
    """Sum every layer's statistics, token counts and the batch count over the ranks (fp64, in place).

    Every rank calls this with the same layers and stats in the same order (the group's names, the
    fixed order of STAT_NAMES), whatever it saw locally: a rank with no batch contributes zeros.
    """
    counts = torch.tensor([float(tokens[name]) for name in sums] + [float(batches)], dtype=torch.float64)
    dist_utils.all_reduce_sum_(counts)  # integers below 2**53: exact in fp64
    for name in sums:
        for total in sums[name].values():
            dist_utils.all_reduce_sum_(total)
    totals = [int(round(c)) for c in counts.tolist()]
    return dict(zip(sums, totals[:-1], strict=True)), totals[-1]


def _check_stats(stats) -> tuple[str, ...]:
    names = (stats,) if isinstance(stats, str) else stats
    if not isinstance(names, Iterable):
        raise TypeError(f"stats must be a stat name or a sequence of them, got {type(stats).__name__}")
    names = tuple(names)
    bad = [s for s in names if s not in STAT_NAMES]
    if bad:
        raise ValueError(f"stats: unknown statistic(s) {bad}; expected some of {STAT_NAMES}")
    if not names:
        raise ValueError(f"stats must name at least one of {STAT_NAMES}")
    return tuple(s for s in STAT_NAMES if s in names)


def _check_positive(value, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def _to_device(batch, device):
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {k: _to_device(v, device) for k, v in batch.items()}
        return moved if type(batch) is dict else _rebuild(batch, moved)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch) if type(batch) in (tuple, list) else batch
    return batch


def _rebuild(batch, moved):
    try:
        return type(batch)(moved)
    except Exception:  # a mapping type that cannot be rebuilt from a dict: pass a plain dict
        return moved


def _call(model: nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("data yielded an empty tuple/list batch: its first element is the model input")
        return model(batch[0])
    raise TypeError(f"data must yield dicts (model(**batch)), tensors (model(batch)) or tuples/lists "
                    f"(model(batch[0])), got a batch of type {type(batch).__name__}")


def _get_loss(outputs, batch, loss_fn, stats) -> Tensor:
    if loss_fn is not None:
        loss = loss_fn(outputs, batch)
    else:
        loss = getattr(outputs, "loss", None)
        if loss is None and isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        if loss is None:
            raise ValueError(f"stats {stats} need a loss, but the model output has no .loss: pass "
                             f"loss_fn=(outputs, batch) -> scalar tensor, or give the model its labels")
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        what = type(loss).__name__ if not isinstance(loss, Tensor) else f"a tensor of shape {tuple(loss.shape)}"
        raise ValueError(f"the loss (from {'loss_fn' if loss_fn is not None else 'outputs.loss'}) must be a "
                         f"scalar tensor, got {what}")
    if not loss.requires_grad:
        raise ValueError(f"the loss (from {'loss_fn' if loss_fn is not None else 'outputs.loss'}) does not "
                         f"depend on any targeted layer's output (it does not require grad): stats {stats} "
                         f"need its gradient")
    return loss.reshape(())


def _cannot_return_loss(model: nn.Module) -> bool:
    """True for a Hugging Face model that never returns a loss: a base model (``model.base_model is model``,
    e.g. ``BertModel``) or one whose ``forward`` takes neither ``labels`` nor ``**kwargs``."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return False
    if getattr(model, "base_model", None) is model:
        return True
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "labels" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values())


def _run_pass(model, data, names, modules, stats, loss_fn, max_batches, progress, desc, distributed=False):
    """One pass over ``data`` collecting ``stats`` for ``names``; returns ({name: stats}, counts, batches).

    ``distributed``: sum the statistics over the ranks before normalising (every rank must call).
    """
    need_grad = any(s in GRADIENT_STATS for s in stats)
    layer_stats = {name: _LayerStats(modules[name], stats) for name in names}
    state: dict = {"mask": None}

    def make_hook(name):
        acc = layer_stats[name]

        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, Tensor) or not isinstance(output, Tensor):
                return None
            mask = state["mask"]
            index = None
            if mask is not None and x.ndim == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                index = mask.to(x.device).bool()
                rows = x.detach()[index]
            else:
                rows = x.detach().reshape(-1, x.shape[-1])
            acc.add_input(rows)
            if not need_grad:
                return None
            # y is the tensor we differentiate with respect to; the model continues with a clone of it, so an
            # in-place op downstream (y += residual) can neither change y nor hit a leaf that requires grad.
            y = output if output.requires_grad else output.detach().requires_grad_(True)  # frozen: start here
            acc.calls.append((rows if "fisher" in stats else rows[:0], y, index))
            return y.clone()

        return hook

    handles = [modules[name].register_forward_hook(make_hook(name), with_kwargs=True) for name in names]
    batches = 0
    device = _model_device(model)
    try:
        from tqdm.auto import tqdm

        total = max_batches
        if hasattr(data, "__len__"):
            try:
                total = len(data) if max_batches is None else min(len(data), max_batches)
            except TypeError:
                pass
        bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False)
        try:
            for batch in data:
                batch = _to_device(batch, device)
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                state["mask"] = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None
                if need_grad:
                    with torch.enable_grad():
                        outputs = _call(model, batch)
                        loss = _get_loss(outputs, batch, loss_fn, stats)
                        calls = [(name, i) for name in names for i in range(len(layer_stats[name].calls))]
                        ys = [layer_stats[name].calls[i][1] for name, i in calls]
                        grads = torch.autograd.grad(loss, ys, allow_unused=True) if ys else []
                    del outputs, loss, ys
                    per_layer: dict[str, list] = {name: [] for name in names}
                    for (name, _), g in zip(calls, grads, strict=True):
                        per_layer[name].append(g)
                    del grads
                    for name in names:
                        layer_stats[name].add_grads(per_layer[name])
                else:
                    with torch.no_grad():
                        _call(model, batch)
                batches += 1
                bar.update(1)
                if max_batches is not None and batches >= max_batches:
                    break  # before fetching another batch: a generator is not advanced past max_batches
        finally:
            bar.close()
    finally:
        for handle in handles:
            handle.remove()
        for acc in layer_stats.values():
            acc.calls = []
        state["mask"] = None
    sums = {name: acc.sums() for name, acc in layer_stats.items()}
    tokens = {name: acc.tokens for name, acc in layer_stats.items()}
    if distributed:
        tokens, batches = _all_reduce_sums(sums, tokens, batches)
    if batches == 0:
        raise ValueError("data yielded no batch" + (" on any rank" if distributed else "")
                         + ": calibration needs at least one")
    results, counts = {}, {}
    for name in layer_stats:
        if tokens[name] == 0:
            continue
        results[name] = _normalise(sums[name], tokens[name], batches)
        counts[name] = tokens[name]
    return results, counts, batches


def calibrate(
    model: nn.Module,
    data: Iterable,
    *,
    stats: str | Sequence[str] = ("input_cov",),
    target_modules: str | Iterable[str] = "all-linear",
    exclude_modules: str | Iterable[str] | None = None,
    loss_fn: Callable | None = None,
    max_batches: int | None = None,
    group_size: int | None = None,
    save_path: str | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> CalibrationStats:
    """Run ``model`` over ``data`` and collect per-layer statistics of the targeted ``nn.Linear`` modules.

    Args:
        model: any ``nn.Module``; put in ``eval()`` during calibration (dropout off), every
            submodule's mode restored afterwards. Batches are moved to the device of its parameters.
        data: an iterable of batches. A mapping is called as ``model(**batch)``, a tensor as
            ``model(batch)``, a tuple or list as ``model(batch[0])`` (the rest is for ``loss_fn``).
            Padding: when a mapping batch holds a 2-D ``"attention_mask"`` ``[B, T]``, a layer input
            ``[B, T, K]`` with the same ``B, T`` contributes only the tokens where the mask is nonzero
            (padding tokens are not data); inputs of any other shape contribute all their rows.
        stats: names from ``("input_cov", "grad_cov", "input_abs_mean", "fisher")``; see
            :mod:`lrcomp.calib.stats` for the formulas and shapes.
        target_modules, exclude_modules: which ``nn.Linear`` to calibrate, with the PEFT rules of
            :func:`lrcomp.replace.find_target_linears`.
        loss_fn: ``loss_fn(outputs, batch) -> scalar tensor``, needed by ``"grad_cov"`` and
            ``"fisher"`` unless the model returns ``outputs.loss``.
        max_batches: use at most this many batches per pass.
        group_size: collect the statistics of ``group_size`` target layers at a time (one pass over
            ``data`` per group), so peak memory holds only that many layers' statistics. ``data``
            must then be re-iterable (a list, a ``DataLoader``), not a one-shot iterator.
        save_path: a safetensors file. After each group the statistics so far are written there
            atomically; if the file exists when ``calibrate`` starts, the layers it completes (same
            shapes, every requested stat) are loaded and skipped, so an interrupted run resumes.
            The file must come from a run with the same ``max_batches`` (and the same data).
        progress: show a tqdm bar over the batches of each pass (on rank 0 only under torch.distributed).
        distributed: sum the statistics over the ranks of the default ``torch.distributed`` process group.
            None (default): when it is initialised (``torchrun``); False: never (each rank calibrates on
            its own data alone). Each rank passes its own shard of the data (``max_batches`` counts the
            batches of each rank); every sum (``X^T X``, ``G^T G``, ``sum |x|``, the Fisher sums, the
            token and batch counts) is all-reduced in fp64 *before* it is normalised, so every rank
            returns the statistics of the union of all the ranks' batches, the same bits on every rank.
            They equal those of one process that sees all the batches up to the order of the fp64
            additions across batches (each batch's own products are the same): the counts are exact,
            the rest agrees to fp64 rounding (relative ~1e-15). Every rank must call ``calibrate``
            (collective). ``save_path`` is then written by rank 0 only, the other ranks waiting at a
            barrier; on resume every rank reads it (a filesystem all the ranks see).

    Returns:
        :class:`CalibrationStats`: ``{layer name: {stat: fp64 CPU tensor}}`` for the targets, in
        model order, with ``count(name)`` the tokens each layer saw. A target never called during
        calibration (or whose tokens were all padding) is left out with a warning.

    Example::

        calib = calibrate(model, loader, stats=("input_cov", "grad_cov"), loss_fn=lambda out, b: out.loss,
                          group_size=8, save_path="calib.safetensors")
        C = calib["encoder.layer.0.attention.self.query"]["input_cov"]       # [384, 384]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be an iterable of batches, got {type(data).__name__}")
    stats = _check_stats(stats)
    _check_positive(max_batches, "max_batches")
    _check_positive(group_size, "group_size")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, batch) -> loss, got {type(loss_fn).__name__}")
    need_grad = any(s in GRADIENT_STATS for s in stats)
    if need_grad and loss_fn is None and _cannot_return_loss(model):
        raise ValueError(f"stats {stats} need a loss, but {type(model).__name__}.forward takes no labels and "
                         f"returns no .loss: pass loss_fn=(outputs, batch) -> scalar tensor")

    targets = find_target_linears(model, target_modules, exclude_modules)
    if not targets:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        shown = ", ".join(linears[:_LIST_NAMES]) + (f", ... ({len(linears)} in all)" if len(linears) > _LIST_NAMES
                                                     else "")
        raise ValueError(f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matches no "
                         f"nn.Linear in {type(model).__name__}; its nn.Linear modules: "
                         f"{shown if linears else 'none'}")
    modules = {name: model.get_submodule(name) for name in targets}
    config = {"max_batches": max_batches}
    if distributed is None:
        distributed = dist_utils.is_distributed()
    elif not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
    elif distributed and not dist_utils.is_distributed():
        raise RuntimeError("distributed=True needs torch.distributed to be initialised (init_process_group)")
    if distributed and dist_utils.rank() != 0:
        progress = False

    done: dict[str, dict[str, Tensor]] = {}
    counts: dict[str, int] = {}
    nbatches: dict[str, int] = {}
    kept: dict[str, dict[str, Tensor]] = {}  # entries of the resumed file that this run does not recompute
    kept_counts: dict[str, int] = {}
    kept_batches: dict[str, int] = {}
    exists = save_path is not None and _exists(save_path)
    if distributed and save_path is not None:
        exists = dist_utils.broadcast_object(exists)  # rank 0's view: every rank resumes the same layers
    if exists:
        previous = CalibrationStats.load(save_path)
        if previous.config.get("max_batches") != max_batches:
            raise ValueError(f"save_path={str(save_path)!r} holds statistics from a run with max_batches="
                             f"{previous.config.get('max_batches')!r}, not {max_batches!r}: use another "
                             f"save_path or the same max_batches")
        for name in previous:
            entry = previous[name]
            complete = name in modules and all(s in entry for s in stats)
            if complete:
                _check_shapes(name, entry, modules[name], save_path)
                done[name] = {s: entry[s] for s in stats}
                counts[name], nbatches[name] = previous.count(name), previous.num_batches(name)
            kept[name], kept_counts[name], kept_batches[name] = entry, previous.count(name), previous.num_batches(name)

    pending = [name for name in targets if name not in done]
    size = group_size or max(len(pending), 1)
    groups = [pending[i:i + size] for i in range(0, len(pending), size)]
    if len(groups) > 1 and isinstance(data, Iterator):
        raise ValueError(f"group_size={group_size} needs {len(groups)} passes over data, but data is a one-shot "
                         f"iterator ({type(data).__name__}): pass a list or a DataLoader, or group_size=None")

    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for g, group in enumerate(groups):
            desc = f"calibrate {g + 1}/{len(groups)}" if len(groups) > 1 else "calibrate"
            results, group_counts, batches = _run_pass(model, data, group, modules, stats, loss_fn, max_batches,
                                                       progress, desc, distributed)
            for name in group:
                if name in results:
                    done[name] = results[name]
                    counts[name] = group_counts[name]
                    nbatches[name] = batches
            if save_path is not None:
                merged = {**kept, **done}
                snapshot = _stats_for(merged, {**kept_counts, **counts}, {**kept_batches, **nbatches}, config)
                if distributed:
                    with dist_utils.on_rank0_then_barrier() as writer:
                        if writer:
                            snapshot.save(save_path)
                else:
                    snapshot.save(save_path)
    finally:
        for module, mode in was_training.items():
            module.training = mode

    missing = [name for name in targets if name not in done]
    if missing:
        warnings.warn(f"{len(missing)} targeted layer(s) saw no token during calibration and have no statistics "
                      f"(never called, or all their tokens were padding): {missing[:5]}; exclude them with "
                      f"exclude_modules", stacklevel=2)
    order = [name for name in targets if name in done]
    return _stats_for({n: done[n] for n in order}, counts, nbatches, config)


def _stats_for(data, counts, batches, config) -> CalibrationStats:
    return CalibrationStats(data, {n: counts[n] for n in data}, {n: batches[n] for n in data}, config)


def _exists(path) -> bool:
    return os.path.exists(path)


def _check_shapes(name: str, entry: Mapping[str, Tensor], module: nn.Linear, save_path) -> None:
    K, N = module.in_features, module.out_features
    expected = {"input_cov": (K, K), "grad_cov": (N, N), "input_abs_mean": (K,), "fisher": (K,)}
    for stat, tensor in entry.items():
        if stat in expected and tuple(tensor.shape) != expected[stat]:
            raise ValueError(f"save_path={str(save_path)!r}: {name}::{stat} has shape {tuple(tensor.shape)}, but the "
                             f"layer needs {expected[stat]} (in {K}, out {N}): the file is from another model")
