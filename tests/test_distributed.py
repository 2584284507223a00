"""Calibration and joint training under torch.distributed (2 gloo processes on the CPU, DDP and FSDP2) equal
one process.

One spawn of 2 ranks (module fixture) runs every distributed scenario and saves its results; the tests
compare them with single-process runs in the pytest process. Each rank gets a disjoint half of the data:
calibration batches ``batches[rank::2]``; in training, the 64 indices of each step are split in two
halves of 32, so DDP's averaged gradient is the single-process gradient of the 64 (float64 models, so
that only the summation order differs).

Tolerances: calibration statistics agree to fp64 rounding (``rtol=1e-12``; the token and batch counts
exactly); on every rank they are the same bits. Trained parameters agree with the single-process run
(``ATOL``): ACIP to ``1e-12`` (fp64 throughout; the observed gap is ~2e-16); LPAF to ``1e-6``, because
its movement / first-order scores are fp32 buffers by design (averaged over the ranks in fp32: ~1e-8
apart) and the sparsity-aware SVD at the boundary turns them into the factors (observed ~2e-7); PC-LoRA,
whose feature distillation normalises each layer by the teacher's energy summed over the ranks, to ``1e-12``
(with per-rank normalisation it was ~1.6e-3 away); JACTUS with a dense warm-up, whose calibration at the
boundary (step 12) sums the statistics of the ranks' shards, to ``1e-12`` as well. The two ranks agree
bitwise, and a resumed run bitwise with the uninterrupted one.

FSDP2 (``comp.wrap_fsdp``; FSDP reduce-scatters the averaged gradient, so the same single-process run is
the reference, with the same tolerances): ACIP with one FSDP group (the root: its penalty reads the scores
after the forward), LPAF with the targeted layers as their own groups (resharded after forward), both
with a checkpoint and a resumed run; JACTUS likewise, calibrated at its boundary on the plain model
(the Compressor strips FSDP for a step whose hook runs the model). Calibration of a model sharded with
``fully_shard`` gives the statistics of the plain model.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "methods"))
from toy import pretrained_mlp, task  # noqa: E402

import lrcomp  # noqa: E402
from lrcomp import CompressionConfig, Compressor, atomic  # noqa: E402
from lrcomp import distributed as dist_utils  # noqa: E402
from lrcomp.layers import LowRankLinear  # noqa: E402

WORLD = 2
STEPS = 24
# root only (ACIP's penalty, PC-LoRA) / the targeted layers as groups
FSDP_UNITS = {"acip": None, "acip_warmup": None, "acip_curve": None, "lpaf": ["0", "2"], "pc_lora": None,
              "jactus": ["0", "2"]}
# LPAF's and JACTUS's boundary is step 12: the resumed run factors its layers; ACIP has pruned already, and ACIP
# with a warm-up factored its layers at step 6
CKPT_AT = 9
STATS = ("input_cov", "grad_cov", "input_abs_mean", "fisher")
ATOL = {"acip": 1e-12, "acip_warmup": 1e-12, "acip_curve": 1e-12, "lpaf": 1e-6, "pc_lora": 1e-12, "jactus": 1e-12}
# each case: a method and its options (the key is the method unless named "<method>_<variant>")
OPTIONS = {
    "acip": {"lora_rank": 2, "score_init": 0.3, "score_lr": 0.05, "prune_fraction": 0.5},
    "acip_warmup": {"lora_rank": 2, "score_init": 0.3, "score_lr": 0.05, "prune_fraction": 0.5, "warmup_frac": 0.25},
    # frozen from step 12 (budget 0.5): the steps after it train at 0.5 and 0.8 in turn (a forward-hook branch)
    "acip_curve": {"lora_rank": 2, "score_init": 0.3, "score_lr": 0.05, "prune_fraction": 0.5, "curve_budgets": [0.8]},
    "lpaf": {"prune_frac": 0.5},
    "pc_lora": {"init": "svd"},  # deterministic factors; the decay ends at step 12 (the dense branch is dropped)
    "jactus": {"warmup_frac": 0.5},  # dense to step 12, then calibrated (a collective) on the trained model
}
METHODS = tuple(OPTIONS)


def _method(case):
    return case if case in lrcomp.JOINT_METHODS else case.rsplit("_", 1)[0]


# ---------------------------------------------------------------------------------------------- shared code
def _calib_batches():
    g = torch.Generator().manual_seed(7)
    X, y = task()
    sizes = [40, 24, 56, 32, 48, 16]  # uneven: the ranks see different token counts
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    perm = torch.randperm(len(X), generator=g)
    return [(X[perm[a:b]], y[perm[a:b]]) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _loss_fn(out, batch):
    return nn.functional.cross_entropy(out, batch[1])


def _config(method):
    return CompressionConfig(method=_method(method), budget=0.5, total_steps=STEPS, target_modules=["0", "2"],
                             method_options=OPTIONS[method])


def _build(method, rank=0, world=1):
    model = pretrained_mlp(steps=60).double()
    calib = None
    if method == "jactus":  # this rank's shard of the calibration batches (fp64, like the model)
        calib = [(X.double(), y) for X, y in _calib_batches()[rank::world]]
    comp = Compressor(model, _config(method), calib_data=calib, loss_fn=_loss_fn)
    opt = torch.optim.AdamW(comp.parameters(), lr=3e-3)
    comp.attach(opt)
    return comp, opt


def _train(comp, opt, start, stop, rank, world, ckpt=None):
    """Steps ``start .. stop - 1`` on the toy task: this rank's slice of each step's 64 indices.

    Returns the steps at which ``comp.step()`` reported a structure change."""
    X, y = task()
    X = X.double()
    per_rank = 64 // world
    changed = []
    for step in range(start, stop):
        g = torch.Generator().manual_seed(10_000 + step)
        idx = torch.randint(0, len(X), (64,), generator=g)[rank * per_rank:(rank + 1) * per_rank]
        net = comp.ddp_model if comp.ddp_model is not None else comp.model
        out = net(X[idx])
        loss = comp.loss(nn.functional.cross_entropy(out, y[idx]), inputs=X[idx], outputs=out)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if comp.step():
            changed.append(step + 1)
        if ckpt is not None and step + 1 == CKPT_AT:
            comp.save_checkpoint(ckpt)
    return changed


def _ranks(comp):
    return {n: comp.model.get_submodule(n).rank if isinstance(comp.model.get_submodule(n), LowRankLinear)
            else "dense" for n in comp.targets}


def _snapshot(comp, changed):
    return {"ranks": _ranks(comp), "changed": changed, "kept": comp.kept_cost(),
            "state": {k: v.detach().clone() for k, v in _full_state(comp.model).items()}}


def _full_state(model):
    """The state dict with FSDP's DTensor shards gathered (a collective under FSDP)."""
    return {k: v.full_tensor() if dist_utils.is_dtensor(v) else v for k, v in model.state_dict().items()}


def _joint(method, rank, world, ckpt=None, resume=False, wrap="ddp"):
    comp, opt = _build(method, rank, world)
    start = 0
    if world > 1 and wrap == "ddp":
        comp.wrap_ddp()
    elif world > 1:
        comp.wrap_fsdp(units=FSDP_UNITS[method])
    if resume:
        comp.load_checkpoint(ckpt)
        start = comp.step_count
    changed = _train(comp, opt, start, STEPS, rank, world, ckpt=None if resume else ckpt)
    before = _snapshot(comp, changed)
    out = {"train": before}
    if _method(method) == "acip":  # another size from the same run (under FSDP: a plain copy, the model re-sharded)
        small = comp.materialize(0.4)
        out["materialized"] = {"ranks": {n: small.get_submodule(n).rank for n in comp.targets}, "changed": changed,
                               "kept": None, "state": {k: v.detach().clone() for k, v in small.state_dict().items()}}
    comp.finalize()
    out["final"] = _snapshot(comp, changed)
    return out


# ---------------------------------------------------------------------------------------------- workers
def _worker(rank: int, out_dir: str) -> None:
    out = Path(out_dir)
    torch.set_num_threads(1)  # two processes on a shared CPU: more intra-op threads only contend
    dist.init_process_group("gloo", init_method=f"file://{out / 'pg'}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    writes: list[str] = []
    original = atomic.save_safetensors

    def counting(tensors, path, metadata=None):
        writes.append(os.path.basename(path))
        return original(tensors, path, metadata)

    atomic.save_safetensors = counting
    try:
        results = {"rank": dist_utils.rank(), "world": dist_utils.world_size()}
        model = pretrained_mlp(steps=60)
        calib_path = out / "calib.safetensors"
        shard = _calib_batches()[rank::WORLD]
        stats = lrcomp.calibrate(model, shard, stats=STATS, loss_fn=_loss_fn, group_size=2,
                                 save_path=str(calib_path), progress=False)
        resumed = lrcomp.calibrate(model, shard, stats=STATS, loss_fn=_loss_fn, group_size=2,
                                   save_path=str(calib_path), progress=False)  # every layer read from the file
        local = lrcomp.calibrate(model, shard, stats=STATS, loss_fn=_loss_fn, distributed=False, progress=False)
        results["calib"] = {n: dict(stats[n]) for n in stats}
        results["calib_counts"] = {n: (stats.count(n), stats.num_batches(n)) for n in stats}
        results["calib_resumed"] = {n: dict(resumed[n]) for n in resumed}
        results["calib_local_count"] = {n: local.count(n) for n in local}
        for method in METHODS:
            ckpt = str(out / f"{method}.ckpt.safetensors")
            results[method] = _joint(method, rank, WORLD, ckpt=ckpt)
            results[f"{method}_resumed"] = _joint(method, rank, WORLD, ckpt=ckpt, resume=True)
        _fsdp_scenarios(results, rank, out)
        results["writes"] = writes
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        atomic.save_safetensors = original
        dist.destroy_process_group()


def _fsdp_scenarios(results, rank, out):
    from torch.distributed.fsdp import fully_shard

    # calibration of a sharded model (one FSDP group; target selection leaves an nn.Linear that is itself an
    # FSDP group alone, as any nn.Linear subclass): the hooks see the full activations of the local batch
    model = fully_shard(pretrained_mlp(steps=60))
    stats = lrcomp.calibrate(model, _calib_batches()[rank::WORLD], stats=STATS, loss_fn=_loss_fn, progress=False)
    results["fsdp_calib"] = {n: dict(stats[n]) for n in stats}
    results["fsdp_calib_counts"] = {n: (stats.count(n), stats.num_batches(n)) for n in stats}
    errors = {}
    for key, call in (("sharded", lambda c: c.wrap_fsdp()), ("penalty", lambda c: c.wrap_fsdp(units=["0", "2"]))):
        comp, _ = _build("acip")
        if key == "sharded":
            fully_shard(comp.model)
        try:
            call(comp)
        except ValueError as err:
            errors[key] = str(err)
    try:  # a sharded model given to the Compressor: its targets are FSDP classes, refused at once
        Compressor(fully_shard(pretrained_mlp(steps=60).double()), _config("acip"))
    except ValueError as err:
        errors["sharded_init"] = str(err)
    results["fsdp_errors"] = errors
    for method in METHODS:
        ckpt = str(out / f"fsdp_{method}.ckpt.safetensors")
        results[f"fsdp_{method}"] = _joint(method, rank, WORLD, ckpt=ckpt, wrap="fsdp")
        results[f"fsdp_{method}_resumed"] = _joint(method, rank, WORLD, ckpt=ckpt, resume=True, wrap="fsdp")


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    ctx = mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError("gloo workers did not finish within 180 s")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------- tests
def test_helpers_are_noops_in_one_process():
    assert not dist_utils.is_distributed()
    assert dist_utils.rank() == 0 and dist_utils.world_size() == 1
    t = torch.tensor([1.0, 2.0])
    assert dist_utils.all_reduce_mean_(t) is t and t.tolist() == [1.0, 2.0]
    assert dist_utils.broadcast_object({"a": 1}) == {"a": 1}
    assert dist_utils.all_gather_object(3) == [3]
    with dist_utils.on_rank0_then_barrier() as writer:
        assert writer
    with pytest.raises(RuntimeError, match="initialised"):
        lrcomp.calibrate(pretrained_mlp(steps=0), [torch.randn(4, 32)], distributed=True, progress=False)


def test_calibrate_on_two_ranks_equals_one_process_on_all_batches(ranks_out):
    _, results = ranks_out
    single = lrcomp.calibrate(pretrained_mlp(steps=60), _calib_batches(), stats=STATS, loss_fn=_loss_fn,
                              progress=False)
    for res in results:
        assert res["world"] == WORLD
        assert list(res["calib"]) == list(single)
        for name in single:
            assert res["calib_counts"][name] == (single.count(name), single.num_batches(name))  # exact
            assert res["calib_local_count"][name] < single.count(name)  # distributed=False: this rank only
            for stat in STATS:
                # Each batch's products are the same; only the fp64 order of addition across batches differs.
                torch.testing.assert_close(res["calib"][name][stat], single[name][stat], rtol=1e-12, atol=1e-12)
                assert torch.equal(res["calib"][name][stat], results[0]["calib"][name][stat])  # same bits
                assert torch.equal(res["calib_resumed"][name][stat], res["calib"][name][stat])


@pytest.fixture(scope="module")
def single_runs():
    return {method: _joint(method, 0, 1) for method in METHODS}


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", METHODS)
def test_distributed_run_equals_single_process_run(ranks_out, single_runs, method, wrap):
    _, results = ranks_out
    single = single_runs[method]
    run = method if wrap == "ddp" else f"fsdp_{method}"
    for key in ("train", "materialized", "final") if _method(method) == "acip" else ("train", "final"):
        ref = single[key]
        for res in results:
            got = res[run][key]
            assert got["ranks"] == results[0][run][key]["ranks"] == ref["ranks"]
            assert got["changed"] == ref["changed"]
            assert got["kept"] == ref["kept"]
            assert list(got["state"]) == list(ref["state"])
            for name, value in ref["state"].items():
                assert torch.equal(got["state"][name], results[0][run][key]["state"][name]), name  # bitwise
                if value.is_floating_point():
                    torch.testing.assert_close(got["state"][name], value, rtol=0, atol=ATOL[method], msg=name)
                else:
                    assert torch.equal(got["state"][name], value), name
    # the run did change its structure (compaction / factorisation) and DDP followed
    assert single["train"]["changed"]
    assert any(r != "dense" for r in single["final"]["ranks"].values())


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_written_once_and_resume_on_two_ranks_equals_uninterrupted(ranks_out, method, wrap):
    out, results = ranks_out
    run = method if wrap == "ddp" else f"fsdp_{method}"
    assert (out / f"{run}.ckpt.safetensors").is_file()
    assert results[1]["writes"] == []  # rank 1 never writes
    assert results[0]["writes"].count(f"{run}.ckpt.safetensors") == 1
    assert results[0]["writes"].count("calib.safetensors") == 2  # one write per group (3 layers, group_size 2)
    for res in results:
        for key in ("train", "final"):
            got, ref = res[f"{run}_resumed"][key], res[run][key]
            assert got["ranks"] == ref["ranks"]
            for name, value in ref["state"].items():
                assert torch.equal(got["state"][name], value), name


def test_calibrate_a_fsdp_sharded_model_on_two_ranks_equals_one_process(ranks_out):
    _, results = ranks_out
    single = lrcomp.calibrate(pretrained_mlp(steps=60), _calib_batches(), stats=STATS, loss_fn=_loss_fn,
                              progress=False)
    for res in results:
        assert list(res["fsdp_calib"]) == list(single)
        for name in single:
            assert res["fsdp_calib_counts"][name] == (single.count(name), single.num_batches(name))
            for stat in STATS:
                torch.testing.assert_close(res["fsdp_calib"][name][stat], single[name][stat], rtol=1e-12, atol=1e-12)
                assert torch.equal(res["fsdp_calib"][name][stat], results[0]["fsdp_calib"][name][stat])


def test_wrap_fsdp_refuses_what_it_cannot_follow(ranks_out):
    _, results = ranks_out
    for res in results:
        assert "plain model" in res["fsdp_errors"]["sharded"]  # the Compressor must own the sharding
        assert "plain model" in res["fsdp_errors"]["sharded_init"]
        assert "reshard_after_forward=False" in res["fsdp_errors"]["penalty"]  # ACIP's scores after the forward
    with pytest.raises(RuntimeError, match="initialised"):
        _build("lpaf")[0].wrap_fsdp()
