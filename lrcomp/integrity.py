"""Integrity of the safetensors files lrcomp writes: per-tensor CRC-32 in the metadata, checked on reading.

Every file written by :func:`lrcomp.atomic.save_safetensors` (training checkpoints, calibration
statistics) and every Hugging Face checkpoint saved through lrcomp's quantizer carries the metadata
entry :data:`CHECKSUM_KEY`: a JSON object ``{tensor name: [CRC-32 of its bytes (hex), dtype, shape]}``.
:func:`read_safetensors` reads a whole file and raises a ValueError naming it when the file is
truncated or garbled (safetensors cannot parse it) or when a tensor's bytes differ from the saved ones
(a flipped byte). Files without the entry (written before it existed) are read unchecked.
"""

from __future__ import annotations

import ctypes
import json
import os
import zlib

from torch import Tensor

#: safetensors metadata entry: JSON ``{tensor name: [crc32 hex, dtype, shape]}``
CHECKSUM_KEY = "lrcomp_crc32"


def crc32(tensor: Tensor) -> str:
    """CRC-32 (8 hex digits) of a tensor's bytes as laid out in memory (contiguous, on the CPU).

    These are the bytes safetensors writes for it, so the value can be computed before saving and
    compared after loading without reading the file twice.
    """
    data = tensor.detach().to("cpu").contiguous()
    size = data.numel() * data.element_size()
    if size == 0:
        return f"{zlib.crc32(b''):08x}"
    return f"{zlib.crc32((ctypes.c_ubyte * size).from_address(data.data_ptr())):08x}"


def checksums(tensors: dict[str, Tensor]) -> str:
    """The :data:`CHECKSUM_KEY` metadata value of ``tensors`` (compact JSON)."""
    return json.dumps({key: [crc32(t), str(t.dtype), list(t.shape)] for key, t in tensors.items()},
                      separators=(",", ":"))


def parse_checksums(metadata: dict[str, str] | None, where: str) -> dict[str, list]:
    """The checksum entry of a file's metadata as a dict ({} when absent); ValueError if it is malformed."""
    if not metadata or CHECKSUM_KEY not in metadata:
        return {}
    try:
        entry = json.loads(metadata[CHECKSUM_KEY])
        if not isinstance(entry, dict) or not all(
                isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) for v in entry.values()):
            raise ValueError("not an object of [crc32, dtype, shape] entries")
    except ValueError as err:
        raise ValueError(f"{where} has a corrupted {CHECKSUM_KEY!r} metadata entry ({err}); nothing was loaded") \
            from None
    return entry


def mismatches(tensors: dict[str, Tensor], entry: dict[str, list]) -> list[str]:
    """Names of ``tensors`` whose dtype, shape or bytes differ from the checksum ``entry`` (names not in it pass)."""
    bad = []
    for key, tensor in tensors.items():
        saved = entry.get(key)
        if saved is None:
            continue
        crc, dtype, shape = saved
        if str(tensor.dtype) != dtype or list(tensor.shape) != shape or crc32(tensor) != crc:
            bad.append(key)
    return bad


def describe(names: list[str]) -> str:
    """``'a', 'b', ... (n more)``: at most five names of a list."""
    listed = ", ".join(repr(b) for b in names[:5])
    return listed + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")


def read_safetensors(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor (on the CPU) and the metadata of a safetensors file, checked against its checksums.

    ``what`` names the kind of file in the errors (e.g. "training checkpoint"). FileNotFoundError
    when ``path`` does not exist; ValueError naming the file when it cannot be parsed (truncated or
    garbled), when its checksum entry is malformed, or when tensors differ from their checksums.
    """
    from safetensors import safe_open

    where = f"the {what} {str(path)!r}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors' own SafetensorError (a bare Exception subclass), OSError
        raise ValueError(f"{where} cannot be read as safetensors ({err}): it is truncated or corrupted; "
                         f"nothing was loaded") from err
    bad = mismatches(tensors, parse_checksums(metadata, where))
    if bad:
        raise ValueError(f"{where} is corrupted: {len(bad)} tensor(s) differ from the saved ones (CRC-32 "
                         f"mismatch): {describe(bad)}; nothing was loaded")
    return tensors, metadata


__all__ = ["CHECKSUM_KEY", "checksums", "crc32", "describe", "mismatches", "parse_checksums", "read_safetensors"]
