"""Latency cost table: monotone interpolation, JSON round trip, a real (tiny) measurement."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lrcomp import backend
from lrcomp.compression.cost import LatencyTable, break_even_rank, default_ranks, measure_latency_table
from lrcomp.layers.lowrank_linear import LowRankLinear


def _table() -> LatencyTable:
    # Non-monotone raw timings (noise): 30 at r=16 is below 40 at r=8.
    return LatencyTable(
        {(32, 48): {"ranks": [1, 8, 16, 32], "lowrank_us": [10.0, 40.0, 30.0, 90.0], "dense_us": 50.0},
         (64, 64): {"ranks": [4], "lowrank_us": [7.0], "dense_us": 9.0}},
        {"device": "test", "tokens": 128},
    )


def test_interpolation_is_monotone_and_linear():
    table = _table()
    values = [table.lowrank_us(32, 48, r) for r in range(1, 33)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[0] == 10.0 and values[7] == 40.0 and values[31] == 90.0
    assert table.lowrank_us(32, 48, 16) == 40.0  # the running max replaces the noisy 30
    assert table.lowrank_us(32, 48, 4) == pytest.approx(10.0 + 30.0 * 3 / 7)
    assert table.lowrank_us(32, 48, 24) == pytest.approx(40.0 + 50.0 * 8 / 16)
    # Outside the grid: the edge segment's slope, never negative, never decreasing.
    assert table.lowrank_us(32, 48, 40) == pytest.approx(90.0 + 50.0 * 8 / 16)
    assert table.lowrank_us(64, 64, 1) == table.lowrank_us(64, 64, 64) == 7.0
    assert table.dense_us(32, 48) == 50.0
    assert table.break_even_rank(32, 48) == 20  # 40 + 50 (r - 16) / 16 >= 50
    assert table.break_even_rank(64, 64) is None
    assert (32, 48) in table and (48, 32) not in table
    with pytest.raises(ValueError, match=r"cost_table has no timings for shape \(K, N\) = \(48, 32\)"):
        table.lowrank_us(48, 32, 3)


def test_json_round_trip_is_atomic(tmp_path):
    table = _table()
    path = tmp_path / "sub" / "latency.json"
    table.to_json(path)
    again = LatencyTable.from_json(path)
    assert again == table
    assert again.meta == {"device": "test", "tokens": 128}
    assert [again.lowrank_us(32, 48, r) for r in range(1, 40)] == [table.lowrank_us(32, 48, r) for r in range(1, 40)]
    table.to_json(path)  # overwrite in place, no temporary file left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["latency.json"]
    data = json.loads(path.read_text())
    data["format"] = "something else"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="latency table"):
        LatencyTable.from_json(path)


def test_table_validation():
    with pytest.raises(ValueError, match="entries"):
        LatencyTable({})
    with pytest.raises(ValueError, match="strictly increasing"):
        LatencyTable({(4, 4): {"ranks": [2, 1], "lowrank_us": [1.0, 2.0], "dense_us": 1.0}})
    with pytest.raises(ValueError, match="finite"):
        LatencyTable({(4, 4): {"ranks": [1], "lowrank_us": [float("nan")], "dense_us": 1.0}})
    with pytest.raises(ValueError, match="equal length"):
        LatencyTable({(4, 4): {"ranks": [1, 2], "lowrank_us": [1.0], "dense_us": 1.0}})


def test_default_grid_includes_edges_and_break_even():
    assert break_even_rank(384, 384) == 192 and break_even_rank(384, 1536) == 308
    for K, N in ((384, 384), (384, 1536), (7, 5), (1, 9)):
        grid = default_ranks(K, N)
        assert grid[0] == 1 and grid[-1] == min(K, N)
        assert min(min(K, N), break_even_rank(K, N)) in grid
        assert grid == sorted(set(grid)) and len(grid) <= 9


def test_tiny_real_measurement():
    before = backend.get_backend()
    table = measure_latency_table([(16, 24), [24, 16]], tokens=8, repeats=3, progress=False)
    assert backend.get_backend() == before  # the "torch" backend is only set while timing
    assert table.shapes == [(16, 24), (24, 16)]
    for K, N in table.shapes:
        entry = table._entries[(K, N)]
        assert entry["ranks"] == default_ranks(K, N)
        assert all(t > 0 for t in entry["lowrank_us"]) and table.dense_us(K, N) > 0
        assert all(t < 1e5 for t in entry["lowrank_us"])  # microseconds, not seconds or nanoseconds
    assert table.meta["torch"] == torch.__version__ and table.meta["device"]
    assert table.meta["tokens"] == 8 and table.meta["dtype"] == "float32" and table.meta["backend"] == "torch"
    model = nn.Sequential(nn.Linear(8, 12), LowRankLinear(12, 8, 3), nn.Linear(8, 12))
    from_model = measure_latency_table(model, ranks=[1, 4, 100], tokens=4, repeats=2, progress=False)
    assert from_model.shapes == [(8, 12), (12, 8)]
    assert from_model._entries[(8, 12)]["ranks"] == [1, 4, 8]  # clipped to min(K, N)


@pytest.mark.usefixtures("one_thread")  # two intra-op threads on a busy CPU stall at random, whatever the rank
def test_minilm_shapes_plausible():
    table = measure_latency_table([(384, 384), (384, 1536), (1536, 384)], progress=False)
    for K, N in table.shapes:
        # Rank 1 (two skinny GEMMs) is much faster than full rank (two GEMMs as large as the dense one).
        assert table.lowrank_us(K, N, 1) < 0.8 * table.lowrank_us(K, N, min(K, N))


def test_measure_errors():
    with pytest.raises(ValueError, match="shapes"):
        measure_latency_table([(0, 3)], progress=False)
    with pytest.raises(ValueError, match="shapes"):
        measure_latency_table([], progress=False)
    with pytest.raises(TypeError, match="shapes"):
        measure_latency_table("384x384", progress=False)
    with pytest.raises(ValueError, match="repeats"):
        measure_latency_table([(4, 4)], repeats=0, progress=False)
    with pytest.raises(ValueError, match="tokens"):
        measure_latency_table([(4, 4)], tokens=0, progress=False)
    with pytest.raises(ValueError, match="ranks"):
        measure_latency_table([(4, 4)], ranks=[0, 2], progress=False)
    with pytest.raises(TypeError, match="dtype"):
        measure_latency_table([(4, 4)], dtype=torch.int32, progress=False)
    with pytest.raises(ValueError, match="shapes"):
        measure_latency_table(nn.Sequential(nn.ReLU()), progress=False)
