"""One-shot compression: calibrate, factorise, allocate, replace. And the per-layer summary."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from lrcomp.calib.calibrate import calibrate
from lrcomp.compression.allocate import allocate_ranks, importance_keep_mask
from lrcomp.compression.config import ONE_SHOT_METHODS, CompressionConfig
from lrcomp.compression.cost import resolve_cost_table
from lrcomp.compression.factorizations import OPTIONAL_STATS, factorize, required_stats
from lrcomp.layers.lowrank_linear import LowRankLinear
from lrcomp.replace import find_target_linears

# Methods whose rank-r result is not the top r directions of the full-rank one: the full-rank
# factorisation only scores the directions for the allocator, then each layer is refactored.
_SUBSPACE_DEPENDS_ON_RANK = ("jactus_union",)


def _exact(names: Iterable[str]) -> str:
    """A target_modules regex that matches exactly these module names."""
    return "|".join(re.escape(n) for n in names)



def layer_sensitivity(grad_cov: torch.Tensor) -> float:
    """``tr(G) / N``: the mean squared loss gradient per output unit of a layer (G = E[g g^T], g = dL/dy).

    An output error e costs about ``E[g . e]^2``-order loss; with errors spread over the output
    directions, ``E[(g . e)^2] ~ tr(G) / N * ||e||^2``. Multiplying a layer's per-direction
    output-error reductions by it makes them comparable across layers in units of the loss:
    without it a global allocator treats an error in a query projection (damped by the
    softmax) like one in a residual-stream projection.
    """
    return float(torch.diagonal(grad_cov).sum() / grad_cov.shape[0])


def _uniform_ranks(model: nn.Module, names: list[str], budget: float) -> dict[str, int]:
    """Every layer keeps ``budget`` of its own parameters: ``r = floor(budget * K N / (K + N))``.

    A layer whose r is at or past break-even (``r (K + N) >= K N``, only possible at ``budget = 1``) stays dense
    (no entry). ValueError when a layer can keep neither rank 1 nor its dense weights within its share (r = 0 and
    ``budget < 1``): rank 1 would break the budget, or for a layer past break-even at rank 1 (``K + N >= K N``,
    e.g. a 1-output head) even make it larger than dense.
    """
    ranks, short = {}, []
    for name in names:
        linear = model.get_submodule(name)
        K, N = linear.in_features, linear.out_features
        r = int(budget * K * N / (K + N))
        while r > 0 and r * (K + N) > budget * K * N:  # float round-off at the edge
            r -= 1
        if r >= 1 and r * (K + N) < K * N:
            ranks[name] = r
        elif K * N > budget * K * N:
            short.append((name, K, N))
    if short:
        need = max(min(1.0, (K + N) / (K * N)) for _, K, N in short)
        name, K, N = short[0]
        raise ValueError(f"budget={budget:g} leaves layer {name!r} ({K} -> {N}) no rank under allocation='uniform': "
                         f"rank 1 keeps {(K + N) / (K * N):.4g} of its parameters ({len(short)} layer(s) like it); use "
                         f"budget >= {need:.4g}, exclude such layers (exclude_modules), or allocation='global'")
    return ranks


def compress(model: nn.Module, config: CompressionConfig, calib_data: Iterable | None = None) -> nn.Module:
    """Compress ``model`` in place with a one-shot factorisation and return it.

    Steps: resolve the targets; calibrate the statistics the method needs on ``calib_data``
    (:func:`lrcomp.calibrate`); factorise every target at full rank with its per-direction
    importance (:func:`lrcomp.factorize`); allocate ranks (global greedy on marginal gain per
    unit cost, or uniform); keep the top directions of each layer, physically (compacted), and
    put back the original ``nn.Linear`` where the allocation keeps a layer dense.

    The resulting :class:`RankAllocation` (global) or rank dict (uniform) is stored on the
    model as ``model.lrcomp_allocation``. On an error the model is left as it was.

    Raises:
        TypeError / ValueError: a bad model, config or target pattern; no target; missing calibration data;
            a budget below what ``min_rank`` costs (global) or that leaves a layer no rank (uniform).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
    if config.method not in ONE_SHOT_METHODS:
        raise ValueError(f"compress() runs the one-shot methods {ONE_SHOT_METHODS}; {config.method!r} trains "
                         f"jointly: use lrcomp.Compressor")
    targets = find_target_linears(model, config.target_modules, config.exclude_modules,
                                  required=True)
    needed = required_stats(config.method, config.method_options)
    if config.loss_fn is not None:  # gradient statistics the method uses when it can have them
        needed = needed + OPTIONAL_STATS[config.method]
    if config.sensitivity and config.allocation == "global":
        needed = tuple(dict.fromkeys(needed + ("grad_cov",)))
    stats = None
    if needed:
        if calib_data is None:
            raise ValueError(f"method {config.method!r} needs calibration statistics {needed}: pass calib_data")
        stats = calibrate(model, calib_data, stats=needed, target_modules=_exact(targets),
                          loss_fn=config.loss_fn, max_batches=config.calib_max_batches,
                          group_size=config.calib_group_size, save_path=config.calib_save_path)

    originals = {name: model.get_submodule(name) for name in targets}
    try:
        if config.allocation == "uniform":
            ranks = _uniform_ranks(model, targets, config.budget)
        else:
            for name in targets:
                layer = factorize(originals[name], None, method=config.method,
                                  stats=stats[name] if stats is not None else None, **config.method_options)
                if config.sensitivity:
                    layer.importance = layer.importance * layer_sensitivity(stats[name]["grad_cov"])
                model.set_submodule(name, layer)
            table = resolve_cost_table(config.cost_table)
            ranks = allocate_ranks(model, config.budget, score="importance", cost=config.cost, cost_table=table,
                                   min_rank=config.min_rank, target_modules=_exact(targets))

        result = {}
        for name in targets:
            if name not in ranks:
                result[name] = originals[name]
                continue
            current = model.get_submodule(name)
            if isinstance(current, LowRankLinear) and config.method not in _SUBSPACE_DEPENDS_ON_RANK:
                layer = current.prune_(importance_keep_mask(current, ranks[name])).compact()
            else:
                layer = factorize(originals[name], ranks[name], method=config.method,
                                  stats=stats[name] if stats is not None else None, **config.method_options)
            result[name] = layer.train(originals[name].training)
    except BaseException:
        # the global allocator scores full-rank factorisations swapped into the model: put the originals back,
        # so that an error (a budget below min_rank, a bad option) leaves the model as it was
        for name, module in originals.items():
            model.set_submodule(name, module)
        raise
    for name, layer in result.items():
        model.set_submodule(name, layer)
    model.lrcomp_allocation = ranks
    return model


def summary(model: nn.Module, *, file=None) -> str:
    """Print (and return) the per-layer table of the low-rank layers of ``model``.

    Columns: layer name, K x N, rank, kept fraction of the dense parameters, parameters before
    (``K N`` + bias) and after (``rank (K + N)`` + bias, S folded into a factor).
    """
    rows = []
    before_total = after_total = 0
    for name, module in model.named_modules():
        if not isinstance(module, LowRankLinear):
            continue
        K, N = module.in_features, module.out_features
        bias = N if module.bias is not None else 0
        before, after = K * N + bias, module.num_parameters(compact=True)
        before_total += before
        after_total += after
        rows.append((name, f"{K}x{N}", str(module.active_rank), f"{after / before:.3f}", f"{before:,}", f"{after:,}"))
    header = ("layer", "K x N", "rank", "kept", "params before", "params after")
    rows.append(("total", "", "", f"{after_total / max(before_total, 1):.3f}", f"{before_total:,}", f"{after_total:,}"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, file=file)
    return text
