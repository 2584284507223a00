"""lrcomp.integrity: CRC-32 metadata written by atomic.save_safetensors and checked on every read.

Covers the reader itself and the two files lrcomp writes through it: training checkpoints
(Compressor.save_checkpoint / load_checkpoint) and calibration statistics (CalibrationStats).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lrcomp import CompressionConfig, Compressor, atomic, integrity
from lrcomp.calib import CalibrationStats


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.arange(5, dtype=torch.int64),
            "c": torch.randn(2, generator=g).half(), "empty": torch.zeros(0, 3)}


def _data_offset(path) -> int:
    """Byte offset of the first tensor byte (after the 8-byte header length and the JSON header)."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _flip(path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_round_trip_writes_and_checks_the_checksums(tmp_path):
    path = tmp_path / "t.safetensors"
    atomic.save_safetensors(_tensors(), path, {"format": "x"})
    with safe_open(str(path), framework="pt") as f:
        entry = json.loads(f.metadata()[integrity.CHECKSUM_KEY])
    assert entry["a"] == [integrity.crc32(_tensors()["a"]), "torch.float32", [4, 3]]
    assert set(entry) == set(_tensors())
    tensors, metadata = integrity.read_safetensors(path)
    assert metadata["format"] == "x"
    for key, t in _tensors().items():
        assert torch.equal(tensors[key], t)


def test_crc32_is_of_the_bytes_not_the_view():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert integrity.crc32(t.t()) == integrity.crc32(t.t().contiguous())
    assert integrity.crc32(t) != integrity.crc32(t.t().contiguous())
    assert integrity.crc32(torch.zeros(0)) == "00000000"


def test_a_flipped_data_byte_is_refused_naming_the_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    atomic.save_safetensors({"a": torch.ones(8), "b": torch.ones(8)}, path)
    _flip(path, _data_offset(path) + 1)  # inside the first tensor in the file
    with safe_open(str(path), framework="pt") as f:  # safetensors itself does not notice
        f.get_tensor("a")
    with pytest.raises(ValueError, match=r"the file .*t\.safetensors.* is corrupted: 1 tensor\(s\) .*CRC-32"):
        integrity.read_safetensors(path)


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    atomic.save_safetensors(_tensors(), path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match="truncated or corrupted; nothing was loaded"):
        integrity.read_safetensors(path, "thing")


def test_a_malformed_checksum_entry_and_a_missing_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(2)}, str(path), metadata={integrity.CHECKSUM_KEY: '{"a": 3}'})
    with pytest.raises(ValueError, match="corrupted 'lrcomp_crc32' metadata entry"):
        integrity.read_safetensors(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        integrity.read_safetensors(tmp_path / "nope.safetensors")


def test_a_file_without_checksums_reads_unchecked(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(2)}, str(path))
    tensors, _ = integrity.read_safetensors(path)
    assert torch.equal(tensors["a"], torch.ones(2))


def _compressor(steps=10):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    comp = Compressor(model, CompressionConfig(method="pc_lora", budget=0.5, total_steps=steps,
                                               target_modules=["0"]))
    opt = torch.optim.AdamW(comp.parameters(), lr=1e-3)
    comp.attach(opt)
    x = torch.randn(16, 8)
    out = model(x)
    comp.loss(out.square().mean(), inputs=x, outputs=out).backward()
    opt.step()
    opt.zero_grad()
    comp.step()
    return comp


def test_training_checkpoint_damage_is_refused_before_loading(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    _compressor().save_checkpoint(path)
    fresh = _compressor()
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes())
    _flip(damaged, damaged.stat().st_size - 3)
    with pytest.raises(ValueError, match=r"training checkpoint .*damaged\.safetensors.*\(CRC-32 mismatch\)"):
        fresh.load_checkpoint(damaged)
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"training checkpoint .*truncated or corrupted"):
        fresh.load_checkpoint(damaged)
    for k, v in fresh.model.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k
    fresh.load_checkpoint(path)  # the intact file still loads
    assert fresh.step_count == 1


def test_calibration_stats_damage_is_refused(tmp_path):
    stats = CalibrationStats({"l": {"input_cov": torch.eye(3, dtype=torch.float64)}}, {"l": 7})
    path = tmp_path / "calib.safetensors"
    stats.save(path)
    assert torch.equal(CalibrationStats.load(path)["l"]["input_cov"], torch.eye(3, dtype=torch.float64))
    _flip(path, _data_offset(path))
    with pytest.raises(ValueError, match=r"calibration statistics file .*\(CRC-32 mismatch\)"):
        CalibrationStats.load(path)
