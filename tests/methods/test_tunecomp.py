"""TuneComp (Chen et al. 2025) through lrcomp.Compressor on a small MLP classifier (CPU)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from toy import small_data, small_mlp

from lrcomp.compression.config import CompressionConfig
from lrcomp.layers.lowrank_linear import LowRankLinear
from lrcomp.methods.compressor import Compressor
from lrcomp.methods.tunecomp import TuneComp, TuneCompOptions, alpha_at

# ---------------------------------------------------------------------- helpers (private to this file)


@functools.lru_cache(maxsize=1)
def _pretrained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = small_mlp()
    x, y = small_data(512, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(60):
        xb, yb = x[(i * 64) % 512:][:64], y[(i * 64) % 512:][:64]
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _pretrained() -> nn.Sequential:
    """A small MLP trained briefly on the task (the dense 'pretrained' model to compress); a fresh copy."""
    model = small_mlp()
    model.load_state_dict(_pretrained_state())
    return model


def _calib():
    x, _ = small_data(256, 11)
    return [x[i:i + 64] for i in range(0, 256, 64)]


def _build(budget=0.5, steps=100, options=None, **cfg):
    model = _pretrained()
    cfg.setdefault("target_modules", ["0", "2"])  # the hidden layers; the classifier head stays dense and trains
    config = CompressionConfig(method="tunecomp", budget=budget, total_steps=steps, method_options=options or {},
                               **cfg)
    torch.manual_seed(0)
    comp = Compressor(model, config, calib_data=_calib())
    opt = torch.optim.AdamW(comp.parameters(), lr=5e-3)
    comp.attach(opt)
    return model, comp, opt


def _train(model, comp, opt, steps, start=0, log=None):
    x, y = small_data(2048, 1)
    for i in range(start, start + steps):
        xb, yb = x[(i * 32) % 2048:][:32], y[(i * 32) % 2048:][:32]
        out = model(xb)
        loss = comp.loss(nn.functional.cross_entropy(out, yb), inputs=xb, outputs=out)
        loss.backward()
        opt.step()
        opt.zero_grad()
        comp.step()
        if log is not None:
            log.append({n: model.get_submodule(n).rank for n in comp.targets})


def _accuracy(model) -> float:
    x, y = small_data(1000, 99)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _check_optimizer(comp, opt):
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in comp.parameters()}  # no dead parameter left in the optimizer
    for p, state in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                assert state[key].shape == p.shape


# ---------------------------------------------------------------------- tests
def test_alpha_formula():
    T = 40
    for t in (0, 1, 10, 20, 30, 39):
        assert alpha_at(t, T) == pytest.approx(1 - math.sin(math.pi * t / (2 * T)), abs=1e-12)
    assert alpha_at(0, T) == 1.0 and alpha_at(T, T) == 0.0 and alpha_at(T + 5, T) == 0.0
    assert alpha_at(20, T) == pytest.approx(1 - math.sqrt(0.5))


@pytest.mark.parametrize("budget", [0.8, 0.5, 0.3])
def test_learns_and_ends_within_budget_with_monotone_ranks(budget):
    model, comp, opt = _build(budget=budget, steps=100)
    ranks = [{n: model.get_submodule(n).rank for n in comp.targets}]
    _train(model, comp, opt, 100, log=ranks)
    for before, after in zip(ranks, ranks[1:], strict=False):
        assert all(after[n] <= before[n] for n in comp.targets)  # ranks only go down
    assert sum(ranks[0].values()) > sum(ranks[-1].values())  # pruned progressively, not at once
    assert len({tuple(r.values()) for r in ranks}) > 2
    _check_optimizer(comp, opt)
    final = comp.finalize()
    assert comp.kept_cost() <= budget * comp.total_cost
    for name in comp.targets:
        layer = final.get_submodule(name)
        assert isinstance(layer, LowRankLinear) and layer.dense_weight is None and layer.lowrank_scale == 1.0
    assert _accuracy(final) > 0.8  # chance is 0.25


@pytest.mark.parametrize("normalize", [True, False])
def test_scales_follow_alpha_and_dense_dropped_at_T(normalize):
    model, comp, opt = _build(steps=40, options={"decay_ratio": 0.5, "normalize_mix": normalize})
    layer = model.get_submodule(comp.targets[1])
    assert layer.dense_scale == 1.0 and layer.lowrank_scale == 0.0
    for t in range(1, 20):
        _train(model, comp, opt, 1, start=t - 1)
        alpha = 1 - math.sin(math.pi * t / 40)
        total = alpha + math.sqrt(1 - alpha ** 2) if normalize else 1.0  # the paper's scales when not normalised
        assert layer.dense_scale == pytest.approx(alpha / total, abs=1e-12)
        assert layer.lowrank_scale == pytest.approx(math.sqrt(1 - alpha ** 2) / total, abs=1e-12)
    _train(model, comp, opt, 1, start=19)
    assert comp.method.alpha == 0.0
    for name in comp.targets:
        assert model.get_submodule(name).dense_weight is None and model.get_submodule(name).lowrank_scale == 1.0


def test_starts_at_dense_model_with_activation_aware_init():
    dense = _pretrained()
    model, comp, _ = _build(budget=0.5, options={"init_rank_multiple": 1.5})
    x, _ = small_data(64, 5)
    with torch.no_grad():
        assert torch.allclose(model(x), dense(x), atol=1e-5)  # alpha_0 = 1: the dense branch alone
    # initial student = SVD-LLM (whitened) factorisation; its importance orders the directions
    layer = model.get_submodule(comp.targets[1])
    assert torch.all(layer.importance[:-1] >= layer.importance[1:])
    comp.method.refresh_importance()  # the output-energy score equals the SVD-LLM importance at init
    assert torch.allclose(layer.importance, layer.S.detach() ** 2, rtol=1e-3)
    assert comp.method.initial_fraction <= 0.75 + 1e-12
    assert comp.method.initial_fraction > 0.5


def test_asvd_init():
    model, comp, opt = _build(budget=0.5, steps=30, options={"init_method": "asvd"})
    assert "input_abs_mean" in comp.method.needed_stats
    _train(model, comp, opt, 30)
    comp.finalize()
    assert comp.kept_cost() <= 0.5 * comp.total_cost


def test_compaction_keeps_outputs_and_optimizer_state():
    model, comp, opt = _build(budget=0.3, steps=60, options={"pruning_events": 4})
    _train(model, comp, opt, 10)
    method = comp.method
    x, _ = small_data(64, 9)
    method.refresh_importance()
    layers = method.lowrank_layers()
    from lrcomp.compression.allocate import importance_keep_mask

    for layer in layers.values():
        layer.prune_(importance_keep_mask(layer, max(1, layer.active_rank - 3)))
    with torch.no_grad():
        before = model(x)
    ranks = {n: layer.rank for n, layer in layers.items()}
    assert comp.compact() > 0
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max() <= 1e-6
    assert all(layers[n].rank == ranks[n] - 3 for n in layers)
    _check_optimizer(comp, opt)
    _train(model, comp, opt, 5, start=10)  # training continues on the compacted layers


def test_cost_schedule_is_cubic_and_reaches_budget():
    model, comp, opt = _build(budget=0.3, steps=80, options={"pruning_events": 4, "prune_end": 0.5})
    method = comp.method
    assert method.event_steps() == [10, 20, 30, 40]
    start = method.initial_fraction
    for k in range(1, 4):
        assert method.target_fraction(k) == pytest.approx(0.3 + (start - 0.3) * (1 - k / 4) ** 3)
    fractions = []
    for t in range(40):
        _train(model, comp, opt, 1, start=t)
        if t + 1 in method.event_steps():
            lowrank = sum(m.active_rank * (m.in_features + m.out_features) for m in method.lowrank_layers().values())
            fractions.append(lowrank / comp.total_cost)
            assert fractions[-1] <= method.target_fraction(len(fractions)) + 1e-12
    assert fractions == sorted(fractions, reverse=True)
    assert comp.kept_fraction() <= 0.3  # dense branch gone (T = 40), at budget from the last event


def test_distillation_gradient_nonzero():
    model, comp, opt = _build(steps=50, feature_weight=1.0)
    _train(model, comp, opt, 3)
    assert comp.distill_weight == 1.0 and comp.teacher is not None
    x, y = small_data(32, 3)
    out = model(x)
    comp.loss(nn.functional.cross_entropy(out, y), inputs=x, outputs=out)
    assert comp.last_terms["kd"] > 0 and comp.last_terms["feature"] > 0
    from lrcomp.methods.distill import feature_loss, kd_loss

    layer = model.get_submodule(comp.targets[0])
    with torch.no_grad():
        teacher_out = comp.teacher(x)
    for term in (kd_loss(out, teacher_out, 2.0), feature_loss(comp._student_tap.outputs, comp._teacher_tap.outputs)):
        opt.zero_grad()
        term.backward(retain_graph=True)
        assert layer.U.grad is not None and layer.U.grad.abs().sum() > 0
        assert layer.V.grad is not None and layer.V.grad.abs().sum() > 0


def test_resume_equals_uninterrupted(tmp_path):
    steps, k = 30, 13  # k is past two pruning events (compacted layers) and inside the transition
    options = {"pruning_events": 5, "prune_end": 0.8}
    model_a, comp_a, opt_a = _build(budget=0.3, steps=steps, options=options)
    _train(model_a, comp_a, opt_a, steps)

    model_b, comp_b, opt_b = _build(budget=0.3, steps=steps, options=options)
    _train(model_b, comp_b, opt_b, k)
    assert comp_b.method.events_done == 2
    comp_b.save_checkpoint(tmp_path / "ckpt.safetensors")
    model_c, comp_c, opt_c = _build(budget=0.3, steps=steps, options=options)
    comp_c.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert comp_c.method.events_done == 2 and comp_c.method.alpha == comp_b.method.alpha
    _train(model_c, comp_c, opt_c, steps - k, start=k)
    for (na, pa), (nc, pc) in zip(model_a.state_dict().items(), model_c.state_dict().items(), strict=True):
        assert na == nc and torch.equal(pa, pc), na


def test_recalibrate_measures_the_inputs_of_the_model_as_it_is():
    model, comp, opt = _build(budget=0.3, steps=60, options={"recalibrate": True, "pruning_events": 4})
    method = comp.method
    pretrained_cov = method._cov["2"].clone()
    _train(model, comp, opt, 23)  # two events (steps 11 and 22), each recalibrated first
    assert method.events_done == 2
    assert not torch.allclose(method._cov["2"], pretrained_cov, rtol=1e-2)  # the events recalibrated
    layers = method.lowrank_layers()
    rows = []  # the inputs of layer "2" (after layer "0", which trains and was pruned), by a hook of the test's own
    handle = layers["2"].register_forward_hook(lambda _m, args, _out: rows.append(args[0].detach().double()))
    with torch.no_grad():
        for batch in _calib():
            model(batch)
    handle.remove()
    x = torch.cat(rows)
    expected = x.T @ x / x.shape[0]
    method.recalibrate()
    assert torch.allclose(method._cov["2"], expected, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(method._cov["2"], pretrained_cov, rtol=1e-2)  # the inputs did move
    assert method.lowrank_layers() == layers  # the same modules are back in the model
    _train(model, comp, opt, 37, start=23)
    _check_optimizer(comp, opt)
    final = comp.finalize()
    assert comp.kept_cost() <= 0.3 * comp.total_cost
    assert _accuracy(final) > 0.8


def test_finalize_early_still_within_budget():
    model, comp, opt = _build(budget=0.3, steps=100)
    _train(model, comp, opt, 5)  # stopped long before the transition and the pruning ended
    x, _ = small_data(64, 4)
    final = comp.finalize()
    assert comp.kept_cost() <= 0.3 * comp.total_cost
    with torch.no_grad():
        assert torch.isfinite(final(x)).all()
    assert all(final.get_submodule(n).dense_weight is None for n in comp.targets)


def test_needs_calibration_and_bad_options():
    config = CompressionConfig(method="tunecomp", budget=0.5, total_steps=10, target_modules=["0", "2"])
    with pytest.raises(ValueError, match="calib_data"):
        Compressor(_pretrained(), config)
    with pytest.raises(ValueError, match="decay_ratio"):
        TuneCompOptions(decay_ratio=0)
    with pytest.raises(ValueError, match="prune_end"):
        TuneCompOptions(prune_end=1.2)
    with pytest.raises(ValueError, match="init_method"):
        TuneCompOptions(init_method="svd")
    with pytest.raises(ValueError, match="init_rank_multiple"):
        TuneCompOptions(init_rank_multiple=0.5)
    with pytest.raises(ValueError, match="pruning_events"):
        TuneCompOptions(pruning_events=0)
    with pytest.raises(ValueError, match="asvd_alpha"):
        TuneCompOptions(asvd_alpha=-1.0)
    with pytest.raises(ValueError, match="recalibrate"):
        TuneCompOptions(recalibrate="yes")
    with pytest.raises(TypeError, match="options"):
        _build(options={"T": 5})


def test_registered():
    from lrcomp.methods.compressor import method_class

    assert method_class("tunecomp") is TuneComp
