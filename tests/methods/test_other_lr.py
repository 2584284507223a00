"""``CompressionConfig.other_lr``: the parameters outside the targeted layers train in a group of their own."""

import pytest
import torch
from toy import pretrained_mlp, task, train

from lrcomp import CompressionConfig, Compressor
from lrcomp.methods.acip import SCORE_GROUP
from lrcomp.methods.compressor import OTHER_GROUP, split_off_other

# layers "0" and "2" are targeted; "4" (the head) is not
HEAD = ("4.weight", "4.bias")


def _config(method="acip", other_lr=1e-5, steps=60, **options):
    return CompressionConfig(method=method, budget=0.5, total_steps=steps, target_modules=["0", "2"],
                             other_lr=other_lr, method_options=options)


def _compressor(model, config):
    X, y = task(seed=5)
    calib = [(X[i:i + 128], y[i:i + 128]) for i in range(0, 256, 128)]
    return Compressor(model, config, calib_data=calib,
                      loss_fn=lambda out, batch: torch.nn.functional.cross_entropy(out, batch[1]))


def _names(model, params):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return sorted(name_of[id(p)] for p in params)


@pytest.mark.parametrize("method", ["acip", "pc_lora", "tunecomp", "jactus", "lpaf"])
def test_the_other_group_holds_exactly_the_parameters_outside_the_targets(method):
    model = pretrained_mlp(steps=150)
    comp = _compressor(model, _config(method))
    groups = comp.parameters()
    assert all(isinstance(g, dict) for g in groups)
    assert [bool(g.get(OTHER_GROUP)) for g in groups] == [False] * (len(groups) - 1) + [True]
    other = groups[-1]
    assert other["lr"] == 1e-5
    assert _names(model, other["params"]) == sorted(HEAD)
    inside = [p for g in groups[:-1] for p in g["params"]]
    assert all(not n.startswith("4.") for n in _names(model, inside))
    # the split moves parameters between groups, it neither adds nor drops any
    comp.config.other_lr = None
    plain = comp.parameters()
    flat = [p for g in plain for p in g["params"]] if isinstance(plain[0], dict) else list(plain)
    assert sorted(map(id, flat)) == sorted(map(id, inside + other["params"]))


def test_each_group_steps_at_its_own_lr():
    """AdamW's first step moves an element by its group's lr (|m / (sqrt(v) + eps)| = 1 up to eps), weight decay
    off: the largest move in each tensor is its group's lr."""
    model = pretrained_mlp(steps=150)
    comp = Compressor(model, _config(lora_rank=2))
    opt = torch.optim.AdamW(comp.parameters(), lr=1e-2, weight_decay=0.0)
    comp.attach(opt)
    layer = comp.method.lowrank_layers()["2"]
    before = {"head": model[4].weight.detach().clone(), "lora": layer.lora_B.detach().clone()}
    train(comp, opt, 1)
    head_step = (model[4].weight - before["head"]).abs().max().item()
    lora_step = (layer.lora_B - before["lora"]).abs().max().item()
    assert head_step == pytest.approx(1e-5, rel=1e-2)
    assert lora_step == pytest.approx(1e-2, rel=1e-2)


def test_a_group_with_its_own_lr_keeps_its_parameters():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    groups = split_off_other([{"params": [a, b], "lr": 0.1}, {"params": [b, c]}], inside={id(c)}, lr=0.01)
    assert groups[0]["params"] == [a, b] and groups[0]["lr"] == 0.1
    assert groups[1]["params"] == [c]
    assert groups[2]["params"] == [b] and groups[2]["lr"] == 0.01 and groups[2][OTHER_GROUP]
    flat = split_off_other([a, c], inside={id(c)}, lr=0.01)
    assert [g["params"] for g in flat] == [[c], [a]]


def test_acip_scores_stay_in_their_group():
    model = pretrained_mlp(steps=150)
    comp = Compressor(model, _config(lora_rank=2))
    groups = comp.parameters()
    assert groups[0].get(SCORE_GROUP) and groups[0]["params"] == [
        layer.scores for layer in comp.method.lowrank_layers().values()]


@pytest.mark.parametrize("cut", [15, 45])  # during pruning and after the scores froze
def test_resume_equals_uninterrupted(tmp_path, cut):
    steps = 60

    def start(model):
        comp = Compressor(model, _config(steps=steps, lora_rank=2))
        opt = torch.optim.AdamW(comp.parameters(), lr=1e-3)
        comp.attach(opt)
        return comp, opt

    ref = pretrained_mlp(steps=150)
    comp_a, opt_a = start(ref)
    train(comp_a, opt_a, steps)
    comp_b, opt_b = start(pretrained_mlp(steps=150))
    train(comp_b, opt_b, cut)
    comp_b.save_checkpoint(tmp_path / "ckpt.safetensors")
    fresh = pretrained_mlp(steps=150)
    comp_c, opt_c = start(fresh)
    comp_c.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert opt_c.param_groups[-1][OTHER_GROUP] and opt_c.param_groups[-1]["lr"] == 1e-5
    train(comp_c, opt_c, steps, start=cut)
    for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert n1 == n2 and p1.shape == p2.shape and torch.equal(p1, p2), n1


def test_other_lr_is_validated():
    for bad in (0, -1e-4, float("inf"), True, "1e-4"):
        with pytest.raises(ValueError, match="other_lr"):
            _config(other_lr=bad)
