"""ACIP's option ``curve_budgets``: the frozen phase trains at several sizes, each as materialize builds it."""

import pytest
import torch
from torch import nn
from toy import pretrained_mlp, task, train

from lrcomp import CompressionConfig, Compressor
from lrcomp.methods.acip import ACIPOptions

CURVE = [0.8, 0.5]


def _config(budget=0.3, steps=60, curve=CURVE, **kw):
    options = {"lora_rank": 2, "lambda_start": 1e-2, "lambda_end": 50.0, "curve_budgets": curve,
               **kw.pop("method_options", {})}
    return CompressionConfig(method="acip", budget=budget, total_steps=steps, target_modules=["0", "2"],
                             method_options=options, **kw)


def _run(config, steps, start=0, comp=None, opt=None, model=None):
    model = model if model is not None else pretrained_mlp(steps=150)
    comp = comp or Compressor(model, config)
    if opt is None:
        opt = torch.optim.AdamW(comp.parameters(), lr=1e-3)
        comp.attach(opt)
    train(comp, opt, steps, start=start)
    return comp, opt


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def _check_rows(comp, X):
    """Each training step computes materialize(b) of its budget; eval mode computes what finalize returns.
    Returns the parameter count of materialize(b) per row."""
    method, model, done = comp.method, comp.model, comp.step_count
    sizes, evaluated = [], []
    try:
        for row, budget in enumerate(method.curve.cycle):
            comp.step_count = row  # the training step that trains at this budget
            with torch.no_grad():
                trained = model.train()(X)
                evaluated.append(model.eval()(X))
            built = method.materialize(budget)
            assert _hooks(built) == 0  # the copy carries no branch
            sizes.append(sum(p.numel() for p in built.parameters()))
            with torch.no_grad():
                torch.testing.assert_close(trained, built.eval()(X), rtol=1e-5, atol=1e-5)
    finally:
        comp.step_count = done
    assert _hooks(model) == len(method.curve._handles) > 0
    final = comp.finalize()
    assert _hooks(final) == 0
    with torch.no_grad():
        for out in evaluated:
            torch.testing.assert_close(out, final.eval()(X), rtol=1e-5, atol=1e-5)
    return sizes


def test_curve_trains_every_budget_as_materialize_builds_it():
    X, _ = task()
    comp, _ = _run(_config(), 60)
    assert comp.method.frozen and comp.method.curve is not None and comp.method.curve.cycle == (0.3, 0.8, 0.5)
    sizes = _check_rows(comp, X)
    assert sizes[1] > sizes[2] > sizes[0]  # the branch really holds directions for the larger budgets
    assert comp.kept_cost() <= 0.3 * comp.total_cost


def test_curve_with_a_layer_past_break_even():
    """A layer that keeps every direction costs its dense weight: materialize makes it dense at every budget
    (the branch leaves it alone) and the other layer's rows still equal materialize(b)."""
    X, _ = task()
    config = _config(budget=0.8, curve=[0.9], method_options={"score_init": 0.3})
    comp = Compressor(pretrained_mlp(steps=150), config)
    comp.method.lowrank_layers()["0"].scores.data.fill_(100.0)  # layer 0 keeps every direction: past break-even
    comp, _ = _run(config, 60, comp=comp)
    method = comp.method
    assert len(method.origin["0"]) == 32 and set(method.curve._handles) == {"2"}
    for b in (0.8, 0.9):
        assert type(method.materialize(b).get_submodule("0")) is nn.Linear
    _check_rows(comp, X)
    assert type(comp.model.get_submodule("0")) is nn.Linear  # finalize made it dense too


def test_curve_steps_train_the_lora_through_the_branch():
    X, y = task()
    comp, _ = _run(_config(), 60)
    layer = comp.method.lowrank_layers()["2"]
    grads = []
    for row in range(3):
        comp.step_count = row
        comp.model.train()
        layer.lora_A.grad = None
        torch.nn.functional.cross_entropy(comp.model(X[:256]), y[:256]).backward()
        grads.append(layer.lora_A.grad.clone())
    assert not torch.allclose(grads[0], grads[1]) and not torch.allclose(grads[1], grads[2])


@pytest.mark.parametrize("cut", [5, 40])  # before the scores freeze, and in the frozen phase
def test_curve_resume_equals_uninterrupted(tmp_path, cut):
    steps = 60
    config = _config(steps=steps, distill_weight=0.5, feature_weight=0.5)
    ref, _ = _run(config, steps)
    assert ref.method.curve is not None
    part, _ = _run(config, cut)
    assert (part.method.curve is not None) == (cut == 40)
    part.save_checkpoint(tmp_path / "ckpt.safetensors")

    fresh = pretrained_mlp(steps=150)
    comp = Compressor(fresh, config)
    opt = torch.optim.AdamW(comp.parameters(), lr=1e-3)
    comp.attach(opt)
    comp.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert (comp.method.curve is not None) == (cut == 40)
    _run(config, steps, start=cut, comp=comp, opt=opt, model=fresh)
    for (n1, p1), (n2, p2) in zip(ref.model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert n1 == n2 and p1.shape == p2.shape and torch.equal(p1, p2), n1


def test_curve_budgets_are_validated():
    for bad in ([0.0], [1.5], ["x"], [True], 0.8):
        with pytest.raises(ValueError, match="curve_budgets"):
            ACIPOptions(curve_budgets=bad)
    assert ACIPOptions(curve_budgets=[0.5, 0.8, 0.5]).curve_budgets == (0.8, 0.5)
    with pytest.raises(ValueError, match=r"above the run's budget \(0.5\)"):
        Compressor(pretrained_mlp(steps=0), _config(budget=0.5, curve=[0.8, 0.5]))
