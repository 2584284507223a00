"""CovarianceAccumulator.all_reduce_ across 2 gloo processes equals one process over all the data."""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lrcomp.calib import CovarianceAccumulator

WORLD = 2
DIM = 24


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(100 + 37 * i, DIM, generator=g).to(torch.bfloat16) for i in range(6)]


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        acc = CovarianceAccumulator(DIM)
        for batch in _data()[rank::WORLD]:  # each rank sees its own shard
            acc.update(batch)
        acc.all_reduce_()
        torch.save({"cov": acc.covariance(normalize=False), "count": acc.count},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_over_two_gloo_processes_equals_one_process(tmp_path):
    ctx = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError("gloo workers did not finish within 120 s")

    single = CovarianceAccumulator(DIM)
    for batch in _data():
        single.update(batch)
    expected = single.covariance(normalize=False)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["count"] == single.count
        # Per-batch fp32 sums are identical; only the fp64 order of addition differs.
        torch.testing.assert_close(got["cov"], expected, rtol=1e-12, atol=1e-9)
