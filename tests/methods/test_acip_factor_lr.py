"""ACIP option ``factor_lr``: the live factors U and V fine-tune in the frozen phase, in their own group."""

import pytest
import torch
from toy import pretrained_mlp, task, train

from lrcomp import CompressionConfig, Compressor
from lrcomp.methods.acip import FACTOR_GROUP, SCORE_GROUP, ACIPOptions


def _config(budget=0.5, steps=120, **options):
    return CompressionConfig(method="acip", budget=budget, total_steps=steps, target_modules=["0", "2"],
                             method_options={"lora_rank": 2, "factor_lr": 5e-4, **options})


def _start(model, config):
    comp = Compressor(model, config)
    opt = torch.optim.AdamW(comp.parameters(), lr=1e-3)
    comp.attach(opt)
    return comp, opt


def _factor_group(opt):
    groups = [g for g in opt.param_groups if g.get(FACTOR_GROUP)]
    assert len(groups) == 1 and groups[0]["lr"] == 5e-4
    return groups[0]


def test_factors_train_from_the_freeze_on_in_their_own_group():
    X, y = task()
    model = pretrained_mlp(steps=150)
    comp, opt = _start(model, _config())
    assert [bool(g.get(SCORE_GROUP)) for g in opt.param_groups] == [True, False, False]
    seen = {"frozen_at": None}
    init = {n: layer.U.detach().clone() for n, layer in comp.method.lowrank_layers().items()}

    def check(step):
        layers = comp.method.lowrank_layers()
        factors = [p for n in ("0", "2") for p in (layers[n].U, layers[n].V)]
        assert _factor_group(opt)["params"] == factors  # compaction swapped the new parameters in
        if not comp.method.frozen:
            assert not any(p.requires_grad for p in factors)
            for n, layer in layers.items():  # still the SVD of the pretrained weight, column for column
                assert torch.equal(layer.U, init[n][:, comp.method.origin[n]])
            return
        assert all(p.requires_grad for p in factors)
        assert not any(layers[n].scores.requires_grad for n in layers)
        if seen["frozen_at"] is None:
            seen["frozen_at"] = step
            seen["U"] = {n: layers[n].U.detach().clone() for n in layers}

    train(comp, opt, 120, after_step=check)
    frozen_at = seen["frozen_at"]
    assert frozen_at is not None and frozen_at < 100  # the frozen phase has steps to train the factors
    layers = comp.method.lowrank_layers()
    for n, layer in layers.items():
        assert layer.U.shape == seen["U"][n].shape  # the frozen phase prunes nothing more
        assert (layer.U - seen["U"][n]).abs().max() > 1e-4  # and trained the factors
    assert comp.kept_cost() <= 0.5 * comp.total_cost
    final = comp.finalize()
    with torch.no_grad():
        assert (final(X).argmax(1) == y).float().mean() > 0.5  # chance is 0.25


def test_without_factor_lr_the_factors_stay_frozen():
    model = pretrained_mlp(steps=150)
    comp, opt = _start(model, _config(factor_lr=0.0))
    assert not any(g.get(FACTOR_GROUP) for g in opt.param_groups)
    train(comp, opt, 120)
    assert comp.method.frozen
    assert not any(p.requires_grad for layer in comp.method.lowrank_layers().values() for p in (layer.U, layer.V))


@pytest.mark.parametrize("cut", [20, 90])  # before and after the scores freeze
def test_resume_equals_uninterrupted(tmp_path, cut):
    steps = 120
    ref = pretrained_mlp(steps=150)
    comp_a, opt_a = _start(ref, _config(steps=steps))
    train(comp_a, opt_a, steps)
    model = pretrained_mlp(steps=150)
    comp_b, opt_b = _start(model, _config(steps=steps))
    train(comp_b, opt_b, cut)
    assert comp_b.method.frozen == (cut == 90)
    comp_b.save_checkpoint(tmp_path / "ckpt.safetensors")
    fresh = pretrained_mlp(steps=150)
    comp_c, opt_c = _start(fresh, _config(steps=steps))
    comp_c.load_checkpoint(tmp_path / "ckpt.safetensors")
    train(comp_c, opt_c, steps, start=cut)
    for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert n1 == n2 and p1.shape == p2.shape and torch.equal(p1, p2), n1


def test_warmup_boundary_puts_the_factors_in_their_group():
    model = pretrained_mlp(steps=150)
    comp, opt = _start(model, _config(steps=40, warmup_frac=0.25))
    assert _factor_group(opt)["params"] == []
    train(comp, opt, 11)  # the boundary is step 10
    layers = comp.method.lowrank_layers()
    assert _factor_group(opt)["params"] == [p for n in ("0", "2") for p in (layers[n].U, layers[n].V)]


def test_factor_lr_is_validated():
    for bad in (-1e-4, float("nan"), True, "1e-4"):
        with pytest.raises(ValueError, match="factor_lr"):
            ACIPOptions(factor_lr=bad)


def test_warmup_boundary_needs_the_factor_group():
    model = pretrained_mlp(steps=150)
    comp = Compressor(model, _config(steps=40, warmup_frac=0.25))
    groups = [g for g in comp.parameters() if not g.get(FACTOR_GROUP)]  # an optimizer built without it
    opt = torch.optim.AdamW(groups, lr=1e-3)
    comp.attach(opt)
    with pytest.raises(ValueError, match="no acip factor group"):
        train(comp, opt, 11)
