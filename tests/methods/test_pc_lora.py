"""PC-LoRA (Hwang et al. 2024) through lrcomp.Compressor on a small MLP classifier (CPU)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from toy import HID, IN, small_data, small_mlp

import lrcomp
from lrcomp.compression.config import CompressionConfig
from lrcomp.compression.cost import break_even_rank
from lrcomp.compression.factorizations import factorize
from lrcomp.layers.lowrank_linear import LowRankLinear
from lrcomp.methods.compressor import Compressor
from lrcomp.methods.pc_lora import PCLoRA, PCLoRAOptions, uniform_rank
from lrcomp.methods.schedules import decay

# ---------------------------------------------------------------------- helpers (private to this file)


def _pretrained() -> nn.Sequential:
    """A small MLP trained briefly on the task (the dense 'pretrained' model to compress); a fresh copy."""
    model = small_mlp()
    model.load_state_dict(_pretrained_state())
    return model


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


def _build(budget=0.5, steps=100, options=None, **cfg):
    model = _pretrained()
    cfg.setdefault("target_modules", ["0", "2"])  # the hidden layers; the classifier head stays dense and trains
    config = CompressionConfig(method="pc_lora", budget=budget, total_steps=steps, method_options=options or {}, **cfg)
    torch.manual_seed(0)  # the adapters' Kaiming init: every build starts identical
    comp = Compressor(model, config)
    opt = torch.optim.AdamW(comp.parameters(), lr=5e-3)
    comp.attach(opt)
    return model, comp, opt


def _train(model, comp, opt, steps, start=0):
    x, y = small_data(2048, 1)
    for i in range(start, start + steps):
        xb, yb = x[(i * 32) % 2048:][:32], y[(i * 32) % 2048:][:32]
        out = model(xb)
        loss = comp.loss(nn.functional.cross_entropy(out, yb), inputs=xb, outputs=out)
        loss.backward()
        opt.step()
        opt.zero_grad()
        comp.step()


def _accuracy(model) -> float:
    x, y = small_data(1000, 99)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("budget", [0.8, 0.5, 0.3])
def test_learns_and_ends_within_budget(budget):
    model, comp, opt = _build(budget=budget, steps=100)
    _train(model, comp, opt, 100)
    final = comp.finalize()
    assert comp.kept_cost() <= budget * comp.total_cost
    # the single uniform rank is the largest one within the budget as deployed (a layer at or past break-even
    # costs its dense weights): q + 1 would be over it
    q = uniform_rank([(IN, HID), (HID, HID)], budget)
    def deployed(r):  # 16 -> 48 and 48 -> 48 at rank r, each at most its dense weights
        return min(r * (IN + HID), IN * HID) + min(r * 2 * HID, HID * HID)

    assert deployed(q) <= budget * comp.total_cost < deployed(q + 1)
    assert q == {0.8: 17, 0.5: 9, 0.3: 5}[budget]  # at 0.8 the 16 -> 48 layer (break-even 12) counts 768 weights
    for name in comp.targets:
        layer = final.get_submodule(name)
        K, N = layer.in_features, layer.out_features
        if q * (K + N) >= K * N:  # past break-even (16 -> 48 at 0.8): the factors became the dense weight
            assert type(layer) is nn.Linear
        else:
            assert isinstance(layer, LowRankLinear) and layer.dense_weight is None and layer.dense_scale == 0.0
            assert layer.rank == q
    assert any(type(final.get_submodule(n)) is nn.Linear for n in comp.targets) == (budget == 0.8)
    assert _accuracy(final) > 0.8  # chance is 0.25


def test_starts_at_dense_model_and_lam_schedule():
    dense = _pretrained()
    model, comp, opt = _build(steps=100, options={"decay_ratio": 0.4, "schedule": "cosine"})
    x, _ = small_data(64, 5)
    with torch.no_grad():
        assert torch.allclose(model(x), dense(x), atol=1e-6)  # B = 0, lam = 1
    method = comp.method
    assert method.decay_steps == 40
    for step in (0, 10, 20, 39):
        assert method.lam_at(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * step / 40)), abs=1e-12)
    assert method.lam_at(40) == 0.0 and method.lam_at(100) == 0.0
    _train(model, comp, opt, 39)
    layer = model.get_submodule(comp.targets[0])
    assert layer.dense_scale == pytest.approx(decay("cosine", 39 / 40)) and layer.dense_scale > 0
    assert comp.kept_cost() > comp.total_cost  # W0 still counts while lam > 0
    _train(model, comp, opt, 1, start=39)
    assert method.lam == 0.0
    for name in comp.targets:  # lam is exactly 0 at the end of the decay: the dense branch is gone
        assert model.get_submodule(name).dense_weight is None
    assert comp.kept_cost() <= comp.config.budget * comp.total_cost


@pytest.mark.parametrize("schedule", ["linear", "sine"])
def test_other_schedules_hit_zero(schedule):
    model, comp, _ = _build(steps=50, options={"schedule": schedule, "decay_ratio": 1.0})
    method = comp.method
    assert method.lam_at(25) == pytest.approx(decay(schedule, 0.5))
    assert method.lam_at(49) > 0.0 and method.lam_at(50) == 0.0


def test_dense_weight_has_no_influence_after_decay():
    model, comp, opt = _build(steps=40, options={"decay_ratio": 0.5})
    _train(model, comp, opt, 20)
    layer = model.get_submodule(comp.targets[1])
    assert layer.dense_weight is None
    # put a (random) dense branch back at scale 0: outputs unchanged
    x, _ = small_data(64, 7)
    with torch.no_grad():
        before = model(x)
        layer.attach_dense(torch.randn(HID, HID), scale=0.0)
        after = model(x)
    assert torch.equal(before, after)


def test_feature_distillation_gradient_nonzero():
    model, comp, opt = _build(steps=50)
    _train(model, comp, opt, 5)  # B is no longer 0
    x, y = small_data(32, 3)
    out = model(x)
    comp.loss(nn.functional.cross_entropy(out, y), inputs=x, outputs=out)
    assert comp.last_terms["feature"] > 0
    opt.zero_grad()
    from lrcomp.methods.distill import feature_loss

    feat = feature_loss(comp._student_tap.outputs, comp._teacher_tap.outputs)
    feat.backward()
    layer = model.get_submodule(comp.targets[0])
    assert layer.U.grad is not None and layer.U.grad.abs().sum() > 0
    assert layer.V.grad is not None and layer.V.grad.abs().sum() > 0
    assert layer.dense_weight.grad is None and not layer.S.requires_grad


def test_trainable_parameters_exact():
    model, comp, _ = _build()
    params = {id(p) for p in comp.parameters()}
    for name in comp.targets:
        layer = model.get_submodule(name)
        assert {id(layer.U), id(layer.V), id(layer.bias)} <= params
        assert id(layer.S) not in params and id(layer.scores) not in params
    head = model[4]
    assert id(head.weight) in params  # the classifier head keeps training


def test_svd_init_and_explicit_rank():
    model, comp, _ = _build(budget=0.5, options={"init": "svd", "rank": 4})
    layer = model.get_submodule(comp.targets[1])
    assert layer.rank == 4
    w = dict(_pretrained().named_parameters())["2.weight"].detach()
    u, s, vh = torch.linalg.svd(w.double())
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose((layer.U * layer.d) @ layer.V, best.float(), atol=1e-5)


def test_svd_llm_init_is_the_whitened_truncation():
    x, _ = small_data(256, 5)
    calib = [x[i:i + 64] for i in range(0, 256, 64)]
    model = _pretrained()
    config = CompressionConfig(method="pc_lora", budget=0.5, total_steps=10, target_modules=["0", "2"],
                               method_options={"init": "svd_llm", "rank": 4})
    Compressor(model, config, calib_data=calib)  # replaces the layers of model in place
    stats = lrcomp.calibrate(_pretrained(), calib, stats=("input_cov",), target_modules=["0", "2"], progress=False)
    linear = _pretrained().get_submodule("2")
    ref = factorize(linear, 4, method="svd_llm", stats=stats["2"])
    layer = model.get_submodule("2")
    got = (layer.U * layer.d) @ layer.V
    want = (ref.U * ref.d) @ ref.V
    assert torch.allclose(got, want, atol=1e-5)
    plain = factorize(linear, 4, method="svd")
    assert not torch.allclose(got, (plain.U * plain.d) @ plain.V, atol=1e-3)  # whitening changed the subspace
    assert layer.dense_weight is not None and layer.dense_scale == 1.0  # the dense branch still starts the run
    with pytest.raises(ValueError, match="needs calibration statistics"):
        Compressor(_pretrained(), config)


@pytest.mark.parametrize("budget", [0.8, 0.3])
def test_global_allocation_takes_the_allocators_ranks_and_ends_within_budget(budget):
    x, _ = small_data(256, 5)
    calib = [x[i:i + 64] for i in range(0, 256, 64)]
    model = _pretrained()
    config = CompressionConfig(method="pc_lora", budget=budget, total_steps=100, target_modules=["0", "2"],
                               method_options={"allocation": "global"})
    comp = Compressor(model, config, calib_data=calib)
    stats = lrcomp.calibrate(_pretrained(), calib, stats=("input_cov",), target_modules=["0", "2"], progress=False)
    alloc = lrcomp.allocate_ranks(_pretrained(), budget, stats=stats, score="whitened", target_modules=["0", "2"])
    got = {n: model.get_submodule(n).rank for n in comp.targets}
    # the allocator's rank, or for a layer it keeps dense the break-even rank (which costs the dense weights)
    want = {n: alloc[n] if n in alloc else break_even_rank(model.get_submodule(n).in_features,
                                                           model.get_submodule(n).out_features)
            for n in comp.targets}
    assert got == want
    q = uniform_rank([(IN, HID), (HID, HID)], budget)
    assert set(got.values()) != {q}  # not the single rank of the paper
    opt = torch.optim.AdamW(comp.parameters(), lr=5e-3)
    comp.attach(opt)
    _train(model, comp, opt, 100)
    final = comp.finalize()
    assert comp.kept_cost() <= budget * comp.total_cost
    assert _accuracy(final) > 0.8  # chance is 0.25


def test_resume_equals_uninterrupted(tmp_path):
    steps, k = 30, 13
    options = {"decay_ratio": 0.5}
    model_a, comp_a, opt_a = _build(steps=steps, options=options)
    _train(model_a, comp_a, opt_a, steps)

    model_b, comp_b, opt_b = _build(steps=steps, options=options)
    _train(model_b, comp_b, opt_b, k)
    comp_b.save_checkpoint(tmp_path / "ckpt.safetensors")
    model_c, comp_c, opt_c = _build(steps=steps, options=options)
    comp_c.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert comp_c.method.lam == comp_b.method.lam
    _train(model_c, comp_c, opt_c, steps - k, start=k)
    for (na, pa), (nc, pc) in zip(model_a.state_dict().items(), model_c.state_dict().items(), strict=True):
        assert na == nc and torch.equal(pa, pc), na


def test_finalize_keeps_only_factors_and_compact_is_noop():
    model, comp, opt = _build(steps=20)
    _train(model, comp, opt, 20)
    x, _ = small_data(64, 9)
    with torch.no_grad():
        before = model(x)
    assert comp.compact() == 0
    final = comp.finalize()
    with torch.no_grad():
        assert torch.allclose(final(x), before, atol=1e-6)  # lam was already 0
    for name in comp.targets:
        layer = final.get_submodule(name)
        names = {n for n, _ in layer.named_parameters()} | {n for n, _ in layer.named_buffers()}
        assert "dense_weight" not in names


def test_bad_options():
    with pytest.raises(ValueError, match="decay_ratio"):
        PCLoRAOptions(decay_ratio=0.0)
    with pytest.raises(ValueError, match="decay_ratio"):
        PCLoRAOptions(decay_ratio=1.5)
    with pytest.raises(ValueError, match="schedule"):
        PCLoRAOptions(schedule="cubic")
    with pytest.raises(ValueError, match="init"):
        PCLoRAOptions(init="random")
    with pytest.raises(ValueError, match="rank"):
        PCLoRAOptions(rank=0)
    with pytest.raises(TypeError, match="options"):
        _build(options={"lam": 0.5})
    with pytest.raises(ValueError, match="rank=40"):
        _build(budget=0.3, options={"rank": 40})
    with pytest.raises(ValueError, match="allocation must be one of"):
        PCLoRAOptions(allocation="greedy")
    with pytest.raises(ValueError, match="needs allocation='uniform'"):
        PCLoRAOptions(allocation="global", rank=4)
    with pytest.raises(ValueError, match="needs calibration statistics"):
        _build(options={"allocation": "global"})


def test_registered():
    from lrcomp.methods.compressor import method_class

    assert method_class("pc_lora") is PCLoRA
