"""Swap a model's ``nn.Linear`` modules for :class:`LowRankLinear` in place.

Target selection follows PEFT's ``target_modules``:

- ``"all-linear"``: every ``nn.Linear`` except the output head (the module returned by
  ``model.get_output_embeddings()``, and modules whose last name component is
  ``lm_head``, ``classifier`` or ``score``);
- a list of strings: a module matches when its name equals an entry or ends with
  ``"." + entry``;
- any other string: a regular expression that must match the whole module name.

``exclude_modules`` takes a list or a regex the same way and wins over the targets.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from lrcomp.layers.lowrank_linear import LowRankLinear

HEAD_NAMES = ("lm_head", "classifier", "score")

RankSpec = int | None | Mapping[str, int | None] | Callable[[str, nn.Linear], int | None]


def _check_pattern(pattern: object, argname: str) -> str | tuple[str, ...]:
    """A regex string (compiled once to check it) or the tuple of names of a list, else the documented error.

    Checked before any module is looked at, so a bad pattern fails the same way on every model (also one without
    linear layers), and a one-shot iterable of names is read once, not consumed by the first module.
    """
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{argname}={pattern!r} is not a valid regular expression ({err}); pass a list of "
                             f"module names to match names literally") from None
        return pattern
    if isinstance(pattern, Iterable) and not isinstance(pattern, (bytes, bytearray)):
        names = tuple(pattern)
        bad = [p for p in names if not isinstance(p, str)]
        if not bad:
            return names
        raise TypeError(f"{argname} must be 'all-linear', a regex string or a list of names, got a list with "
                        f"entries that are not strings: {bad[:3]!r}")
    raise TypeError(f"{argname} must be 'all-linear', a regex string or a list of names, "
                    f"got {type(pattern).__name__}")


def _matches(name: str, pattern: str | tuple[str, ...]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _head_names(model: nn.Module) -> set[str]:
    heads = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads |= {name for name, module in model.named_modules() if module is out}
    return heads


def find_target_linears(
    model: nn.Module,
    target_modules: str | Iterable[str] = "all-linear",
    exclude_modules: str | Iterable[str] | None = None,
    *,
    include_lowrank: bool = False,
    required: bool = False,
) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that the target rules select, in model order.

    ``include_lowrank=True`` selects already-factored :class:`LowRankLinear` layers too (the
    allocator scores both). ``required=True`` raises a ValueError listing the model's linear
    layers when nothing matches.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; a pattern is neither a string nor a list of strings.
        ValueError: a pattern string is not a valid regular expression; nothing matches (``required=True``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    all_linear = isinstance(target_modules, str) and target_modules == "all-linear"
    target = None if all_linear else _check_pattern(target_modules, "target_modules")
    exclude = None if exclude_modules is None else _check_pattern(exclude_modules, "exclude_modules")
    kinds = (LowRankLinear,) if include_lowrank else ()
    heads = _head_names(model) if all_linear else set()
    names = []
    for name, module in model.named_modules():
        # subclasses of nn.Linear (already wrapped, quantized) are left alone
        if type(module) is not nn.Linear and not isinstance(module, kinds):
            continue
        if all_linear:
            if name in heads:
                continue
        elif not _matches(name, target):
            continue
        if exclude is not None and _matches(name, exclude):
            continue
        names.append(name)
    if required and not names:
        existing = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LowRankLinear))]
        listed = ", ".join(existing[:30]) + (f", ... ({len(existing) - 30} more)" if len(existing) > 30 else "")
        raise ValueError(f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matches no "
                         f"nn.Linear of {type(model).__name__}; its linear layers are: [{listed or 'none'}]")
    return names


def _rank_for(rank: RankSpec, name: str, module: nn.Linear) -> tuple[bool, int | None]:
    """(replace?, rank) for one module."""
    if rank is None or isinstance(rank, int) and not isinstance(rank, bool):
        return True, rank
    if isinstance(rank, Mapping):
        return (name in rank), rank.get(name)
    if callable(rank):
        value = rank(name, module)
        return value is not None, value
    raise TypeError(f"rank must be an int, None, a dict name -> rank or a callable, got {type(rank).__name__}")


def replace_linears(
    model: nn.Module,
    rank: RankSpec,
    target_modules: str | Iterable[str] = "all-linear",
    exclude_modules: str | Iterable[str] | None = None,
    **layer_kwargs,
) -> list[str]:
    """Replace the targeted ``nn.Linear`` modules of ``model`` by :meth:`LowRankLinear.from_linear`.

    Args:
        rank: an int (or None for full rank) for every target; a dict name -> rank (targets
            without an entry stay dense; an entry that names no target is an error); or a
            callable ``(name, linear) -> rank | None`` (None leaves the module dense).
        layer_kwargs: passed to ``from_linear`` (``mask_fn``, ``keep_dense``, ...).

    Returns:
        The names of the replaced modules, in model order.
    """
    targets = find_target_linears(model, target_modules, exclude_modules, required=True)
    if isinstance(rank, Mapping):
        unknown = sorted(set(rank) - set(targets))
        if unknown:
            raise ValueError(f"rank names modules that are not targets: {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''}")
    plan = []
    for name in targets:
        module = model.get_submodule(name)
        replace, r = _rank_for(rank, name, module)
        if replace:
            plan.append((name, module, r))
    # Build every new layer before swapping any in: a bad rank for one module leaves the model untouched.
    layers = []
    for name, module, r in plan:
        try:
            layer = LowRankLinear.from_linear(module, r, **layer_kwargs)
        except (TypeError, ValueError) as err:
            raise type(err)(f"module {name!r}: {err}") from err
        layers.append(layer.train(module.training))
    for (name, _, _), layer in zip(plan, layers, strict=True):
        model.set_submodule(name, layer)
    return [name for name, _, _ in plan]


def compact_lowrank(model: nn.Module) -> list[str]:
    """Replace every :class:`LowRankLinear` of ``model`` by its :meth:`~LowRankLinear.compact` form, in place.

    Pruned directions are dropped physically, so the model holds fewer parameters and runs
    fewer FLOPs with the same output. Returns the names of the layers that shrank.
    """
    shrunk = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear) and module.active_rank < module.rank:
            model.set_submodule(name, module.compact())
            shrunk.append(name)
    return shrunk
