"""Hugging Face native ``save_pretrained`` / ``from_pretrained`` for models holding :class:`LowRankLinear` layers.

The low-rank layers travel through transformers' quantizer registry (``quant_method = "lrcomp"``), so no
``trust_remote_code`` is involved: ``import lrcomp`` registers a quantization config and an ``HfQuantizer``
with transformers, and any Auto class then rebuilds the low-rank layers before the weights are read.

Usage::

    import lrcomp
    from lrcomp.integrations.hf import mark_lowrank, to_dense

    model = AutoModel.from_pretrained("base")
    lrcomp.compress(model, lrcomp.CompressionConfig(method="svd", budget=0.5), calib_data)
    mark_lowrank(model)              # compacts, then attaches quantization_config + the quantizer
    model.save_pretrained("small")   # model.safetensors + config.json["quantization_config"]

    import lrcomp                    # in the loading process: registers quant_method "lrcomp"
    model = AutoModel.from_pretrained("small")   # LowRankLinear layers, same outputs bit for bit

    to_dense(model).save_pretrained("dense")     # an ordinary checkpoint (nn.Linear, no quantization_config)

``lrcomp.compress`` and ``Compressor.finalize`` do not mark the model (they work on any ``nn.Module``, and a
marked transformers model refuses ``.half()`` / ``.float()`` like every quantized one: use
``.to(torch.float16)``): call :func:`mark_lowrank` before ``save_pretrained``. Once marked (or loaded),
every ``save_pretrained`` re-reads the ranks from the model, so training, pruning and compacting in between
is fine; only a LoRA branch, a dense branch or a ``lowrank_scale`` other than 1 is refused (finalize first, or
:func:`to_dense`): the ValueError comes before any file is written (transformers has created the directory).

Format, version 1. ``config.json`` holds::

    "quantization_config": {
      "quant_method": "lrcomp",
      "version": 1,
      "lrcomp_version": "0.1.0",
      "rank_pattern": {
        "encoder.layer.0.attention.self.query": {"rank": 96, "in_features": 384, "out_features": 384,
                                                 "bias": true, "mask_fn": "none", "temperature": 1.0},
        ...
      }
    }

``rank_pattern`` names every :class:`LowRankLinear` by its module name in the saved model; ``rank`` is the
stored rank r (``U [N, r]``), ``in_features`` K and ``out_features`` N those of the ``nn.Linear`` it replaces.
The safetensors file holds the model's state dict as it is (per low-rank layer ``U [N, r]``, ``S [r]``,
``V [r, K]``, ``scores [r]``, ``bias [N]``, ``active [r]`` bool) plus one-element guard tensors: one named
``<layer>.weight`` per low-rank layer, and :data:`HINT_KEY` (``lrcomp.import_lrcomp_to_load_this_checkpoint``).
A loader that ignores the quantization config (transformers without ``import lrcomp`` only logs "Unknown
quantization type, got lrcomp ... we will skip the quantization", and would then fill every factored layer with
random weights) fails on the guards' shapes instead (``RuntimeError`` "You set `ignore_mismatched_sizes` to
`False`"), and its load report lists the hint key as UNEXPECTED. With ``import lrcomp`` the guards are
expected and ignored.

Integrity: the safetensors metadata holds ``lrcomp_crc32``, a JSON object ``{tensor name: [CRC-32 of its bytes,
dtype, shape]}`` over the saved state dict. Loading checks the file headers before anything is read (a truncated or
garbled file: ``ValueError`` naming the file) and, once the weights are in, that every tensor of the model listed
there holds the saved bytes (a flipped byte anywhere in the data, or a tensor name garbled so that transformers
initialised the tensor afresh: ``ValueError`` listing the tensors); either way ``from_pretrained`` raises and
returns no model. A tensor loaded in another dtype than saved (``from_pretrained(..., dtype=...)``) is not checked.
Checkpoints without the entry (written before it existed) load unchecked.

Layers are saved as they are: a layer with pruned directions (``active`` False) round-trips exactly too, but
holds dead weight; :func:`mark_lowrank` compacts by default (:func:`lrcomp.compact_lowrank`).

Needs transformers >= 5 (written against 5.23: ``HfQuantizer.preprocess_model`` passes ``checkpoint_files``,
``save_pretrained`` takes its state dict from ``HfQuantizer.get_state_dict_and_metadata``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lrcomp import integrity
from lrcomp.layers.lowrank_linear import LowRankLinear
from lrcomp.layers.masks import validate_mask_fn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QUANT_METHOD = "lrcomp"
FORMAT_VERSION = 1
_PATTERN_KEYS = ("rank", "in_features", "out_features", "bias", "mask_fn", "temperature")
_HOOK_TARGET = "transformers.quantizers.auto"
# A one-element tensor every lrcomp checkpoint holds: transformers without `import lrcomp` lists it as UNEXPECTED
# in its load report, so the report itself tells what is missing.
HINT_KEY = "lrcomp.import_lrcomp_to_load_this_checkpoint"
# safetensors metadata entry: JSON {tensor name: [crc32 hex, dtype, shape]} of the saved state dict
CHECKSUM_KEY = integrity.CHECKSUM_KEY

__all__ = [
    "FORMAT_VERSION",
    "HINT_KEY",
    "QUANT_METHOD",
    "LowRankHfQuantizer",  # noqa: F822 (built on first use: see __getattr__)
    "LowRankQuantizationConfig",  # noqa: F822
    "mark_lowrank",
    "rank_pattern",
    "register",
    "to_dense",
]


# ---------------------------------------------------------------------------------------------- rank pattern
def rank_pattern(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {"rank", "in_features", "out_features", "bias", "mask_fn", "temperature"}}`` of every
    :class:`LowRankLinear` of ``model``, in model order (the ``rank_pattern`` of the quantization config)."""
    return {name: {"rank": m.rank, "in_features": m.in_features, "out_features": m.out_features,
                   "bias": m.bias is not None, "mask_fn": m.mask_fn, "temperature": m.temperature}
            for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_pattern(pattern: object) -> dict[str, dict[str, Any]]:
    """A checked copy of a rank pattern (ValueError naming the first bad layer)."""
    if not isinstance(pattern, dict):
        raise ValueError(f"quantization_config.rank_pattern must be a dict of layer name -> layer entry, "
                         f"got {type(pattern).__name__}")
    out = {}
    for name, entry in pattern.items():
        where = f"quantization_config.rank_pattern[{name!r}]"
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: layer names must be non-empty strings")
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a dict with keys {list(_PATTERN_KEYS)}, got {type(entry).__name__}")
        missing = [k for k in ("rank", "in_features", "out_features", "bias") if k not in entry]
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        rank, k, n, bias = entry["rank"], entry["in_features"], entry["out_features"], entry["bias"]
        if not (_is_int(k) and _is_int(n) and k >= 1 and n >= 1):
            raise ValueError(f"{where}: in_features / out_features must be positive ints, got {k!r} / {n!r}")
        if not _is_int(rank) or not 1 <= rank <= min(k, n):
            raise ValueError(f"{where}: rank must be an int in [1, min(in_features, out_features)] = "
                             f"[1, {min(k, n)}], got {rank!r}")
        if not isinstance(bias, bool):
            raise ValueError(f"{where}: bias must be true or false, got {bias!r}")
        mask_fn, temperature = entry.get("mask_fn", "none"), entry.get("temperature", 1.0)
        try:
            validate_mask_fn(mask_fn, temperature)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        out[name] = {"rank": rank, "in_features": k, "out_features": n, "bias": bias, "mask_fn": mask_fn,
                     "temperature": float(temperature)}
    return out


def _lowrank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _check_saveable(model: nn.Module) -> None:
    """Refuse the transitional states a checkpoint of this format cannot represent."""
    bad = []
    for name, layer in _lowrank_layers(model).items():
        if layer.lora_A is not None:
            bad.append(f"{name!r} has a LoRA branch (rank {layer.lora_A.shape[0]})")
        if layer.dense_weight is not None:
            bad.append(f"{name!r} has a dense branch attached (dense_scale={layer.dense_scale:g})")
        if layer.lowrank_scale != 1.0:
            bad.append(f"{name!r} has lowrank_scale={layer.lowrank_scale:g} (not folded into S)")
    if bad:
        listed = "; ".join(bad[:5]) + (f"; ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
        raise ValueError(
            f"cannot save this model in the lrcomp format: {listed}. Finalize the run first "
            f"(lrcomp.Compressor.finalize() drops dense branches, folds scales and compacts), or merge every branch "
            f"into ordinary nn.Linear layers with lrcomp.integrations.hf.to_dense(model) and save that.")


# ---------------------------------------------------------------------------------------------- name resolution
def _model_name(model: nn.Module, name: str, modules: dict[str, nn.Module]) -> str | None:
    """The module name in ``model`` of the checkpoint's layer ``name`` (base_model_prefix added or dropped)."""
    if name in modules:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if f"{prefix}.{name}" in modules:
            return f"{prefix}.{name}"
        if name.startswith(prefix + ".") and name[len(prefix) + 1:] in modules:
            return name[len(prefix) + 1:]
    return None


def _read_headers(checkpoint_files: list[str]) -> tuple[dict[str, tuple[int, ...]], dict[str, list]] | None:
    """``(tensor name -> shape, checksums)`` of a safetensors checkpoint (headers only), None for other formats.

    ``checksums`` is the :data:`CHECKSUM_KEY` entry of the metadata (empty when absent). ValueError naming the file
    when a header cannot be read (truncated, garbled) or its checksum entry is not what lrcomp writes.
    """
    from safetensors import safe_open

    if not checkpoint_files or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
        return None
    shapes, checksums = {}, {}
    for file in checkpoint_files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
                metadata = handle.metadata() or {}
        except Exception as err:  # safetensors' own SafetensorError (a bare Exception subclass), OSError
            raise ValueError(f"the lrcomp checkpoint file {str(file)!r} cannot be read as safetensors ({err}): it is "
                             f"truncated or corrupted; nothing was loaded") from err
        checksums.update(integrity.parse_checksums(metadata, f"the lrcomp checkpoint file {str(file)!r}"))
    return shapes, checksums


def _verify_checksums(model: nn.Module, checksums: dict[str, list], where: str) -> None:
    """ValueError listing the tensors of ``model`` whose bytes differ from the saved ones (after loading)."""
    if not checksums:
        return
    state = model.state_dict()
    loaded = {}
    for key, (_, dtype, shape) in checksums.items():
        name = _model_name(model, key, state)
        if name is None:
            continue  # not part of this model (e.g. the head of a checkpoint loaded into its base model)
        tensor = state[name]
        if tensor.device.type == "meta" or str(tensor.dtype) != dtype or list(tensor.shape) != shape:
            continue  # cast while loading (from_pretrained(dtype=...)) or offloaded: the saved bytes are not there
        loaded[key] = tensor
    bad = [_model_name(model, key, state) for key in integrity.mismatches(loaded, checksums)]
    if bad:
        raise ValueError(f"the lrcomp checkpoint {where} is corrupted: {len(bad)} tensor(s) differ from the saved "
                         f"ones (CRC-32 mismatch): {integrity.describe(bad)}; load it again from an intact copy")


def _check_checkpoint(shapes: dict[str, tuple[int, ...]], pattern: dict[str, dict[str, Any]], where: str) -> None:
    """ValueError naming the layers whose tensors do not match the rank pattern (before anything is loaded)."""
    problems = []
    for name, e in pattern.items():
        r, k, n = e["rank"], e["in_features"], e["out_features"]
        expected = {"U": (n, r), "S": (r,), "V": (r, k), "scores": (r,), "active": (r,)}
        if e["bias"]:
            expected["bias"] = (n,)
        missing = [f"{name}.{p}" for p in expected if f"{name}.{p}" not in shapes]
        wrong = {p: shapes[f"{name}.{p}"] for p, shape in expected.items()
                 if f"{name}.{p}" in shapes and shapes[f"{name}.{p}"] != shape}
        if not e["bias"] and f"{name}.bias" in shapes:
            problems.append(f"layer {name!r}: config.json says bias=false, the weights hold {name}.bias")
        if missing:
            problems.append(f"layer {name!r}: {', '.join(repr(m) for m in missing)} missing from the weights")
        elif wrong:
            stored = shapes[f"{name}.S"]
            held = f"rank {stored[0]}" if len(stored) == 1 and stored[0] != r else "other shapes"
            detail = ", ".join(f"{p} {list(got)} (expected {list(expected[p])})" for p, got in wrong.items())
            problems.append(f"layer {name!r}: config.json says rank {r} ({k} -> {n}), the weights hold {held}: "
                            f"{detail}")
    for key in shapes:
        layer = key[:-2] if key.endswith(".U") else None
        if layer and layer not in pattern and f"{layer}.V" in shapes and f"{layer}.S" in shapes:
            problems.append(f"layer {layer!r} has low-rank factors in the weights but no entry in "
                            f"quantization_config.rank_pattern")
    if problems:
        listed = "\n  ".join(problems[:10]) + (f"\n  ... ({len(problems) - 10} more)" if len(problems) > 10 else "")
        raise ValueError(f"the lrcomp checkpoint {where} does not match its quantization_config "
                         f"(config.json rank_pattern vs. the safetensors weights):\n  {listed}")


def _swap_in_lowrank(model: nn.Module, pattern: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Replace the listed ``nn.Linear`` modules by empty :class:`LowRankLinear` of the saved rank.

    Runs on the meta-device skeleton (nothing is allocated); every layer is checked before any is swapped.
    Returns checkpoint name -> model name.
    """
    modules = dict(model.named_modules())
    plan, problems = [], []
    for name, e in pattern.items():
        target = _model_name(model, name, modules)
        if target is None:
            problems.append(f"layer {name!r} is not a module of {type(model).__name__}")
            continue
        module = modules[target]
        if not isinstance(module, nn.Linear):
            problems.append(f"layer {name!r} is a {type(module).__name__} in {type(model).__name__}, not an nn.Linear")
            continue
        if (module.in_features, module.out_features, module.bias is not None) != (
                e["in_features"], e["out_features"], e["bias"]):
            problems.append(f"layer {name!r}: the config says {e['in_features']} -> {e['out_features']} "
                            f"(bias={e['bias']}), the model builds {module.in_features} -> {module.out_features} "
                            f"(bias={module.bias is not None})")
            continue
        plan.append((name, target, module, e))
    if problems:
        raise ValueError(f"the lrcomp rank_pattern does not fit {type(model).__name__}:\n  " + "\n  ".join(problems))
    for _, target, module, e in plan:
        layer = LowRankLinear(e["in_features"], e["out_features"], e["rank"], bias=e["bias"], mask_fn=e["mask_fn"],
                              temperature=e["temperature"], device=module.weight.device, dtype=module.weight.dtype)
        model.set_submodule(target, layer.train(module.training))
    return {name: target for name, target, _, _ in plan}


def _densify(model: nn.Module) -> list[str]:
    """Replace every :class:`LowRankLinear` by :meth:`LowRankLinear.to_linear` in place; the names replaced."""
    names = []
    for name, layer in list(_lowrank_layers(model).items()):
        linear = layer.to_linear().train(layer.training)
        model.set_submodule(name, linear)
        names.append(name)
    return names


def _set_is_quantized(model: nn.Module, value: bool) -> None:
    """``config._is_quantized`` on every transformers sub-model (what ``HfQuantizer.postprocess_model`` sets)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(module, "base_model_prefix"):
            continue
        if value:
            config._is_quantized = True
        elif "_is_quantized" in vars(config):
            del config._is_quantized


# ---------------------------------------------------------------------------------------------- transformers classes
_CLASSES: tuple[type, type] | None = None


def _build_classes() -> tuple[type, type]:
    """Define the config and quantizer classes (their bases need transformers, imported only now)."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LowRankQuantizationConfig(QuantizationConfigMixin):
        """``quantization_config`` of an lrcomp low-rank checkpoint (``quant_method = "lrcomp"``).

        Args:
            rank_pattern: ``{layer name: {"rank": r, "in_features": K, "out_features": N, "bias": bool,
                "mask_fn": str, "temperature": float}}`` (see :func:`rank_pattern`); the layers are
                ``nn.Linear(K, N)`` in the model's architecture and become ``LowRankLinear`` of rank r.
            version: format version (1); a newer one is refused with a hint to upgrade lrcomp.
            lrcomp_version: the lrcomp release that wrote the checkpoint (informative).
        """

        def __init__(self, rank_pattern: dict | None = None, version: int = FORMAT_VERSION,
                     lrcomp_version: str | None = None, **kwargs) -> None:
            quant_method = kwargs.pop("quant_method", QUANT_METHOD)
            if str(getattr(quant_method, "value", quant_method)) != QUANT_METHOD:
                raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
            if not _is_int(version) or version < 1:
                raise ValueError(f"quantization_config.version must be a positive int, got {version!r}")
            if version > FORMAT_VERSION:
                raise ValueError(f"this checkpoint uses lrcomp format version {version}, this lrcomp reads up to "
                                 f"{FORMAT_VERSION}: upgrade lrcomp (pip install -U lrcomp)")
            if lrcomp_version is None:
                from lrcomp import __version__ as lrcomp_version
            self.quant_method = QUANT_METHOD
            self.version = version
            self.lrcomp_version = lrcomp_version
            self.rank_pattern = _validate_pattern({} if rank_pattern is None else rank_pattern)

    class LowRankHfQuantizer(HfQuantizer):
        """Loads lrcomp checkpoints: swaps the listed ``nn.Linear`` for ``LowRankLinear`` before the weights
        are read, checks the checkpoint against the rank pattern first; on save, checks the model and
        refreshes the rank pattern. Pre-quantized checkpoints only: to compress a dense model use
        :func:`lrcomp.compress` / :class:`lrcomp.Compressor`, then :func:`mark_lowrank`."""

        requires_calibration = True  # pre-quantized checkpoints only

        def __init__(self, quantization_config, **kwargs) -> None:
            if not kwargs.get("pre_quantized", True):
                raise ValueError(
                    "lrcomp does not compress while loading: quantization_config=LowRankQuantizationConfig(...) only "
                    "describes a checkpoint written by lrcomp. Load the dense model, compress it (lrcomp.compress or "
                    "lrcomp.Compressor), then lrcomp.integrations.hf.mark_lowrank(model) and save_pretrained().")
            super().__init__(quantization_config, **kwargs)

        def validate_environment(self, *args, **kwargs) -> None:
            return None

        def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
            return dtype  # the factors are ordinary floating-point tensors: any dtype works

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return False  # tensors load as they are

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            pattern = self.quantization_config.rank_pattern
            headers = _read_headers(list(checkpoint_files or []))
            where = str(getattr(model.config, "name_or_path", "") or "")
            where = repr(where) if where else ""
            self._lrcomp_checksums = (headers[1] if headers is not None else {}, where)
            if headers is not None:
                _check_checkpoint(headers[0], pattern, where)
            names = _swap_in_lowrank(model, pattern)
            # the guard tensors `<layer>.weight` are expected in the file: keep them out of the load report
            prefix = getattr(model, "base_model_prefix", "") or ""
            guards = {re.escape(t.removeprefix(prefix + ".") if prefix else t) for t in names.values()}
            ignore = {r"(^|\.)" + re.escape(HINT_KEY) + "$"}
            if guards:
                ignore.add(r"(^|\.)(" + "|".join(sorted(guards)) + r")\.weight$")
            model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | ignore
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            checksums, where = getattr(self, "_lrcomp_checksums", ({}, ""))
            self._lrcomp_checksums = ({}, "")
            _verify_checksums(model, checksums, where)
            # names in this model's namespace (a base-model checkpoint loaded into a model with a head)
            self.quantization_config.rank_pattern = rank_pattern(model)
            return model

        def get_state_dict_and_metadata(self, model):
            """Called by ``save_pretrained``: check the model, refresh the rank pattern, add the guards."""
            _check_saveable(model)
            pattern = rank_pattern(model)
            if not pattern:
                raise ValueError("this model is marked as an lrcomp low-rank model but holds no LowRankLinear: "
                                 "save it as an ordinary model with lrcomp.integrations.hf.to_dense(model)")
            self.quantization_config.rank_pattern = pattern
            model.config.quantization_config = self.quantization_config
            state_dict = model.state_dict()
            checksums = integrity.checksums(state_dict)
            guards = {f"{name}.weight": layer.V.dtype for name, layer in _lowrank_layers(model).items()}
            guards[HINT_KEY] = next(iter(guards.values()))  # the model's dtype, whatever infers it from the file
            for key, dtype in guards.items():
                if key in state_dict:  # cannot happen with LowRankLinear; never overwrite a real tensor
                    raise ValueError(f"state dict already holds {key!r}")
                state_dict[key] = torch.zeros(1, dtype=dtype)
            from lrcomp import __version__

            return state_dict, {"lrcomp_format": str(FORMAT_VERSION), "lrcomp_version": __version__,
                                CHECKSUM_KEY: checksums}

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

        @property
        def is_qat_trainable(self) -> bool:
            # transformers.Trainer fine-tunes a quantized model without adapters only if this is True
            return True

        @property
        def is_compileable(self) -> bool:
            return True

        def _dequantize(self, model, dtype=None):
            """``model.dequantize()``: ordinary ``nn.Linear`` layers (``W = U diag(d) V``, computed in fp64)."""
            _densify(model)
            return model

    for cls in (LowRankQuantizationConfig, LowRankHfQuantizer):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return LowRankQuantizationConfig, LowRankHfQuantizer


def _classes() -> tuple[type, type]:
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _build_classes()
    return _CLASSES


def __getattr__(name: str):
    # The classes subclass transformers' bases: build them (importing transformers) on first use only.
    if name == "LowRankQuantizationConfig":
        return _classes()[0]
    if name == "LowRankHfQuantizer":
        return _classes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- registration
def register() -> None:
    """Register quant_method ``"lrcomp"`` with transformers (idempotent).

    ``import lrcomp`` does it by itself, lazily: at once if transformers' quantizer registry is already imported,
    else the moment it is (a one-shot import hook), so ``import lrcomp`` does not import transformers.
    """
    from transformers.quantizers import auto

    config_cls, quantizer_cls = _classes()
    registries = ((auto.AUTO_QUANTIZATION_CONFIG_MAPPING, config_cls, auto.register_quantization_config),
                  (auto.AUTO_QUANTIZER_MAPPING, quantizer_cls, auto.register_quantizer))
    for mapping, cls, decorator in registries:
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None and getattr(current, "__module__", None) != __name__:
            raise ValueError(f"transformers already has a quantization method {QUANT_METHOD!r} "
                             f"({current.__module__}.{current.__qualname__}) that is not lrcomp's")
        mapping.pop(QUANT_METHOD, None)  # a class from an earlier import of this module (reload)
        decorator(QUANT_METHOD)(cls)


def _register_quietly() -> None:
    try:
        register()
    except Exception as err:  # never break transformers' own import
        warnings.warn(f"lrcomp could not register its Hugging Face quantizer ({type(err).__name__}: {err}); "
                      f"call lrcomp.integrations.hf.register() to see why", RuntimeWarning, stacklevel=2)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: registers lrcomp right after ``transformers.quantizers.auto`` is executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _HOOK_TARGET:
            return None
        try:
            return self._wrapped_spec(fullname, path, target)
        except Exception as err:  # a bug here must not break importing transformers: import it unhooked
            _remove_hook()
            warnings.warn(f"lrcomp could not hook transformers' import ({type(err).__name__}: {err}); call "
                          f"lrcomp.integrations.hf.register() after importing transformers", RuntimeWarning,
                          stacklevel=2)
            return None

    def _wrapped_spec(self, fullname, path, target):
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        # File loaders are one instance per module: wrapping exec_module on it touches nothing else.
        if spec is None or not isinstance(spec.loader, _FILE_LOADERS):
            return None  # let the regular machinery import it; lrcomp.integrations.hf.register() is still there
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _remove_hook()
            _register_quietly()

        loader.exec_module = exec_and_register
        return spec


_FILE_LOADERS = (importlib.machinery.SourceFileLoader, importlib.machinery.SourcelessFileLoader)
_HOOK: _RegisterOnImport | None = None


def _remove_hook() -> None:
    global _HOOK
    if _HOOK is not None and _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
    _HOOK = None


def _install() -> None:
    """Register now if transformers' registry is loaded, else hook its import; nothing without transformers."""
    global _HOOK
    if _HOOK_TARGET in sys.modules:
        _register_quietly()
        return
    if importlib.util.find_spec("transformers") is None:
        return
    if _HOOK is None:
        _HOOK = _RegisterOnImport()
        sys.meta_path.insert(0, _HOOK)


_install()


# ---------------------------------------------------------------------------------------------- public helpers
def _require_hf_model(model: nn.Module) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (it needs save_pretrained and a config), "
                        f"got {type(model).__name__}")


def mark_lowrank(model: PreTrainedModel, *, compact: bool = True) -> PreTrainedModel:
    """Make ``model.save_pretrained(dir)`` write an lrcomp checkpoint; returns ``model`` (changed in place).

    Sets what ``from_pretrained`` sets on a model it loads through a quantizer: ``model.hf_quantizer`` (a
    :class:`LowRankHfQuantizer`), ``model.config.quantization_config`` (a :class:`LowRankQuantizationConfig`
    holding :func:`rank_pattern`), ``model.is_quantized``, ``model.quantization_method = "lrcomp"`` and
    ``config._is_quantized`` on every sub-model. ``compact=True`` first drops pruned directions physically
    (:func:`lrcomp.compact_lowrank`: same outputs, fewer parameters, new parameter objects, so do it before
    building an optimizer). Marking again refreshes the rank pattern.

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``.
        ValueError: it holds no :class:`LowRankLinear`, or another quantization method owns it.
    """
    _require_hf_model(model)
    register()
    config_cls, quantizer_cls = _classes()
    current = getattr(model, "hf_quantizer", None)
    if current is not None and not isinstance(current, quantizer_cls):
        method = current.quantization_config.quant_method
        raise ValueError(f"model is already quantized with {getattr(method, 'value', method)!r}: it cannot also be "
                         f"marked as an lrcomp low-rank model")
    if compact:
        from lrcomp.replace import compact_lowrank

        compact_lowrank(model)
    pattern = rank_pattern(model)
    if not pattern:
        raise ValueError(f"{type(model).__name__} holds no LowRankLinear: compress it first "
                         f"(lrcomp.compress / lrcomp.replace_linears / lrcomp.Compressor)")
    config = config_cls(rank_pattern=pattern)
    model.hf_quantizer = quantizer_cls(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.config.quantization_config = config
    _set_is_quantized(model, True)
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every :class:`LowRankLinear` by an ordinary ``nn.Linear`` and drop the lrcomp marking, in place.

    Each layer becomes ``nn.Linear(K, N)`` with ``W [N, K] = U diag(d) V`` (+ LoRA, + ``dense_scale * W0``:
    any branch is merged), computed in fp64 and cast to the layer's dtype, so outputs match the low-rank model
    to fp32 round-off. On a transformers model, ``hf_quantizer``, ``config.quantization_config`` and the
    quantized flags are removed: ``save_pretrained`` then writes a checkpoint any engine loads. Returns ``model``.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) != QUANT_METHOD:
        raise ValueError("model is quantized with another method: to_dense only removes lrcomp's marking")
    _densify(model)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # hf_quantizer, config.quantization_config, is_quantized
    elif getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        qc = model.config.quantization_config
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if method == QUANT_METHOD:
            del model.config.quantization_config
    if hasattr(model, "config"):
        _set_is_quantized(model, False)
    return model
