"""Per-layer calibration statistics, as a read-only mapping saved and loaded as safetensors.

``CalibrationStats`` maps a layer name to ``{stat name: tensor}``; every tensor is fp64 on the
CPU and already normalised. For a linear layer ``y = x W^T + b`` with ``W: [N, K]``, over the
``T`` tokens ``x_t`` (rows of the layer input) seen during calibration, in ``B`` batches:

- ``"input_cov"``  ``[K, K]``: ``(1/T) sum_t x_t x_t^T`` (SVD-LLM whitening, JACTUS);
- ``"grad_cov"``   ``[N, N]``: ``(1/T) sum_t g_t g_t^T`` with ``g_t = dL/dy_t`` (JACTUS);
- ``"input_abs_mean"`` ``[K]``: ``(1/T) sum_t |x_t|`` (ASVD activation scaling);
- ``"fisher"``     ``[K]``: ``(1/B) sum_batches sum_n (dL/dW[n, k])^2`` (FWSVD: Hsu et al. 2022,
  "Language model compression with weighted low-rank factorization").

On disk (``save`` / ``load``) the tensors are stored under the keys ``"<layer>::<stat>"`` and the
token and batch counts as JSON in the safetensors metadata. Writes are atomic (temporary file
in the same folder, then ``os.replace``), so a crash never leaves a truncated file behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from lrcomp import atomic

STAT_NAMES = ("input_cov", "grad_cov", "input_abs_mean", "fisher")
"""Every statistic :func:`lrcomp.calib.calibrate` can collect, in canonical order."""

GRADIENT_STATS = ("grad_cov", "fisher")
"""The statistics that need a loss and a backward pass per batch."""

_FORMAT = "lrcomp.CalibrationStats"
_VERSION = "1"
_SEP = "::"


def _nonneg_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return value


class CalibrationStats(Mapping):
    """Read-only mapping ``layer name -> {stat name: fp64 CPU tensor}`` with per-layer token counts.

    Indexing returns a fresh ``dict`` (so ``factorize(..., stats=calib[name])`` gets a plain dict
    and mutating it does not change this object). Statistics are normalised as described in the
    module docstring.

    Args:
        stats: ``{layer: {stat: tensor}}``; tensors are converted to fp64 CPU (a copy).
        counts: ``{layer: T}``, tokens seen by each layer (defaults to 0).
        batches: ``{layer: B}``, batches in which the layer's statistics were collected (defaults to 0).
        config: JSON-serialisable settings of the run that produced the statistics (saved with them).
    """

    def __init__(
        self,
        stats: Mapping[str, Mapping[str, Tensor]],
        counts: Mapping[str, int] | None = None,
        batches: Mapping[str, int] | None = None,
        config: Mapping | None = None,
    ) -> None:
        if not isinstance(stats, Mapping):
            raise TypeError(f"stats must be a mapping layer -> {{stat: tensor}}, got {type(stats).__name__}")
        counts = dict(counts or {})
        batches = dict(batches or {})
        data: dict[str, dict[str, Tensor]] = {}
        for layer, layer_stats in stats.items():
            if not isinstance(layer, str) or _SEP in layer:
                raise ValueError(f"stats: layer names must be strings without {_SEP!r}, got {layer!r}")
            if not isinstance(layer_stats, Mapping):
                raise TypeError(f"stats[{layer!r}] must be a mapping stat -> tensor, "
                                f"got {type(layer_stats).__name__}")
            entry = {}
            for stat, value in layer_stats.items():
                if not isinstance(stat, str) or _SEP in stat:
                    raise ValueError(f"stats[{layer!r}]: stat names must be strings without {_SEP!r}, got {stat!r}")
                if not isinstance(value, Tensor):
                    raise TypeError(f"stats[{layer!r}][{stat!r}] must be a tensor, got {type(value).__name__}")
                entry[stat] = value.detach().to(device="cpu", dtype=torch.float64).contiguous()
            data[layer] = entry
        extra = sorted((set(counts) | set(batches)) - set(data))
        if extra:
            raise ValueError(f"counts/batches name layers that have no statistics: {extra[:5]}")
        self._data = data
        self._counts = {name: _nonneg_int(counts.get(name, 0), f"counts[{name!r}]") for name in data}
        self._batches = {name: _nonneg_int(batches.get(name, 0), f"batches[{name!r}]") for name in data}
        self._config = dict(config or {})

    # -- Mapping -----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> dict[str, Tensor]:
        try:
            return dict(self._data[name])
        except KeyError:
            close = [n for n in self._data if n.endswith(str(name))][:3]
            hint = f" (did you mean {close}?)" if close else ""
            raise KeyError(f"no statistics for layer {name!r}{hint}; {len(self._data)} layers held") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    # -- accessors ---------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Layer names, in the order they were collected (model order for :func:`calibrate`)."""
        return list(self._data)

    @property
    def stat_names(self) -> tuple[str, ...]:
        """Names of the statistics held by any layer: known ones in :data:`STAT_NAMES` order, then others."""
        present = {stat for entry in self._data.values() for stat in entry}
        return tuple(s for s in STAT_NAMES if s in present) + tuple(sorted(present - set(STAT_NAMES)))

    @property
    def config(self) -> dict:
        """Settings of the run that produced these statistics (e.g. ``max_batches``)."""
        return dict(self._config)

    def count(self, name: str) -> int:
        """Tokens ``T`` the layer ``name`` saw (the divisor of its input/gradient statistics)."""
        if name not in self._counts:
            raise KeyError(f"no statistics for layer {name!r}")
        return self._counts[name]

    def num_batches(self, name: str) -> int:
        """Batches ``B`` over which the layer's statistics were collected (the divisor of ``fisher``)."""
        if name not in self._batches:
            raise KeyError(f"no statistics for layer {name!r}")
        return self._batches[name]

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` as safetensors, atomically (temporary file + ``os.replace``)."""
        tensors = {f"{layer}{_SEP}{stat}": t for layer, entry in self._data.items() for stat, t in entry.items()}
        metadata = {
            "format": _FORMAT,
            "version": _VERSION,
            "layers": json.dumps(list(self._data)),
            "counts": json.dumps(self._counts),
            "batches": json.dumps(self._batches),
            "config": json.dumps(self._config),
        }
        atomic.save_safetensors(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        """Read a file written by :meth:`save`."""
        from lrcomp import integrity

        tensors, metadata = integrity.read_safetensors(path, "calibration statistics file")  # damaged: ValueError
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"path={str(path)!r} is not a CalibrationStats file "
                             f"(metadata format={metadata.get('format')!r})")
        order = json.loads(metadata.get("layers", "[]"))
        stats: dict[str, dict[str, Tensor]] = {name: {} for name in order}
        for key, tensor in tensors.items():
            layer, sep, stat = key.rpartition(_SEP)
            if not sep:
                raise ValueError(f"path={str(path)!r}: key {key!r} is not of the form '<layer>{_SEP}<stat>'")
            stats.setdefault(layer, {})[stat] = tensor
        return cls(stats, json.loads(metadata.get("counts", "{}")), json.loads(metadata.get("batches", "{}")),
                   json.loads(metadata.get("config", "{}")))

    def __repr__(self) -> str:
        tokens = sorted(set(self._counts.values()))
        tok = (f"tokens={tokens[0]}" if len(tokens) == 1 else
               f"tokens={tokens[0]}..{tokens[-1]}" if tokens else "tokens=0")
        return f"CalibrationStats({len(self)} layers, stats={self.stat_names}, {tok})"
