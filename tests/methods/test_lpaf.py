"""LPAF: movement pruning, sparsity-aware SVD initialisation at the boundary, mixed-rank fine-tuning."""

import pytest
import torch
from torch import nn
from toy import evaluate, pretrained_mlp, task, train

from lrcomp import CompressionConfig, Compressor
from lrcomp.layers import LowRankLinear
from lrcomp.methods.base import swap_params_in_optimizer
from lrcomp.methods.lpaf import LPAFOptions, MaskedLinear

TARGETS = ["0", "2"]






def _config(budget=0.5, steps=40, options=None, **kw):
    return CompressionConfig(method="lpaf", budget=budget, total_steps=steps, target_modules=TARGETS,
                             method_options=dict(options or {}), **kw)


def _build(model, config, lr=3e-3):
    comp = Compressor(model, config)
    opt = torch.optim.AdamW(comp.parameters(), lr=lr)
    comp.attach(opt)
    return comp, opt






def _optimizer_holds_exactly_the_trainable_params(model, opt):
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(in_opt) == len({id(p) for p in in_opt})
    assert {id(p) for p in in_opt} == {id(p) for p in trainable}
    for p, state in opt.state.items():
        assert any(p is q for q in in_opt)  # no state of a dead parameter
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.shape == p.shape


def test_lpaf_schedule_is_cubic_between_warmup_and_cooldown():
    comp = Compressor(pretrained_mlp(steps=0), _config(0.5, steps=100,
                                                        options={"target_sparsity": 0.6, "prune_frac": 0.5}))
    method = comp.method
    assert method.boundary == 50
    tw, tf = 5, 40  # round(0.1 * 50), 50 - round(0.2 * 50)
    assert method.sparsity(0) == method.sparsity(tw) == 0.0
    assert method.sparsity(tf) == method.sparsity(50) == 0.6
    for t in (6, 20, 33, 39):
        assert method.sparsity(t) == pytest.approx(0.6 * (1 - (1 - (t - tw) / (tf - tw)) ** 3), abs=1e-12)
    values = [method.sparsity(t) for t in range(51)]
    assert values == sorted(values)
    default = Compressor(pretrained_mlp(steps=0), _config(0.3, steps=10)).method
    assert default.final_sparsity == pytest.approx(0.7)  # 1 - budget


def test_lpaf_movement_scores_accumulate_minus_w_times_grad():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    layer = MaskedLinear.from_linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    layer.mask[0, :3] = False
    x = torch.randn(8, 6)
    out = layer(x)
    torch.testing.assert_close(out, x @ (linear.weight * layer.mask).T + linear.bias)
    out.square().sum().backward()
    # dL/dW' for W' = W * mask (straight-through: pruned weights get a score too)
    grad_eff = 2 * out.detach().T @ x
    expected = -(linear.weight.detach() * grad_eff)
    torch.testing.assert_close(layer.movement, expected)
    torch.testing.assert_close(layer.first_order, expected.abs())
    assert torch.all(linear.weight.grad[0, :3] == 0)  # the masked weights do not move
    with torch.no_grad():
        layer(x)  # no graph: nothing accumulated
    torch.testing.assert_close(layer.movement, expected)
    layer.prune_to(7)
    assert int((~layer.mask).sum()) == 7
    assert bool(layer.movement[~layer.mask].max() <= layer.movement[layer.mask].min())
    layer.prune_to(7, "first_order")  # the Taylor score: |W dL/dW'|
    assert int((~layer.mask).sum()) == 7
    assert bool(layer.first_order[~layer.mask].max() <= layer.first_order[layer.mask].min())


def test_lpaf_reaches_the_exact_sparsity_then_factors_within_budget():
    steps = 40
    model = pretrained_mlp()
    comp, opt = _build(model, _config(0.5, steps=steps, options={"target_sparsity": 0.6}))
    method = comp.method
    t1 = method.boundary
    seen = {}

    def check(step):
        if step < t1:
            for name, layer in method.masked_layers().items():
                pruned = int((~layer.mask).sum())
                assert pruned == method.pruned_count(step, layer.weight.numel()) == round(
                    method.sparsity(step) * layer.weight.numel())
                seen[(name, step)] = pruned / layer.weight.numel()
        elif step == t1:
            assert method.factored
            assert comp.kept_cost() <= 0.5 * comp.total_cost
            _optimizer_holds_exactly_the_trainable_params(model, opt)
            for name in method.ranks:
                layer = model.get_submodule(name)
                assert type(layer) is LowRankLinear and layer.rank == method.ranks[name]
                assert not layer.scores.requires_grad and layer.U.requires_grad

    train(comp, opt, steps, after_step=check)
    for name in TARGETS:  # end of phase 1: the final sparsity exactly (0.6 of 2048 and of 4096)
        assert seen[(name, t1 - 1)] == round(0.6 * model.get_submodule(name).in_features
                                             * model.get_submodule(name).out_features) / (
            model.get_submodule(name).in_features * model.get_submodule(name).out_features)
    assert abs(seen[("2", t1 - 1)] - 0.6) < 1e-3
    _optimizer_holds_exactly_the_trainable_params(model, opt)


@pytest.mark.parametrize("budget", [0.8, 0.5, 0.3])
def test_lpaf_ends_within_budget(budget):
    model = pretrained_mlp()
    comp, opt = _build(model, _config(budget, steps=16))
    train(comp, opt, 16)
    final = comp.finalize()
    assert comp.kept_cost() <= budget * comp.total_cost
    for name in TARGETS:
        module = final.get_submodule(name)
        assert type(module) in (nn.Linear, LowRankLinear)
        if type(module) is LowRankLinear:
            assert module.rank == comp.method.ranks[name] == module.active_rank


def test_lpaf_learns_the_task():
    model = pretrained_mlp(steps=0)  # from scratch: the whole run must teach it
    comp, opt = _build(model, _config(0.3, steps=160), lr=1e-2)
    before_loss, before_acc = evaluate(model)
    train(comp, opt, 160)
    final = comp.finalize()
    loss, acc = evaluate(final)
    assert loss < 0.5 * before_loss
    assert acc > 0.85  # chance is 0.25
    assert comp.kept_cost() <= 0.3 * comp.total_cost


def test_lpaf_finalize_before_the_boundary_still_factors():
    model = pretrained_mlp()
    comp, opt = _build(model, _config(0.5, steps=40))
    train(comp, opt, 3)
    final = comp.finalize()
    assert comp.method.factored and comp.kept_cost() <= 0.5 * comp.total_cost
    assert not any(isinstance(m, MaskedLinear) for m in final.modules())


def test_lpaf_compaction_after_the_boundary_keeps_outputs_and_optimizer_state():
    model = pretrained_mlp()
    comp, opt = _build(model, _config(0.8, steps=12, options={"prune_frac": 0.5}))
    train(comp, opt, 8)
    layers = comp.method.lowrank_layers()
    assert layers
    name, layer = next(iter(layers.items()))
    rank = layer.rank
    layer.prune_(rank - 2)
    X, _ = task()
    with torch.no_grad():
        before = model(X[:64])
    assert comp.compact() == 2
    with torch.no_grad():
        after = model(X[:64])
    assert (after - before).abs().max() <= 1e-6
    assert layer.rank == rank - 2
    _optimizer_holds_exactly_the_trainable_params(model, opt)
    train(comp, opt, 12, start=8)


@pytest.mark.parametrize("cut", [5, 14])  # before the boundary (t1 = 10) and after it (restore_structure)
def test_lpaf_resume_across_the_boundary_equals_uninterrupted(tmp_path, cut):
    steps = 20
    model_a = pretrained_mlp()
    comp_a, opt_a = _build(model_a, _config(0.5, steps=steps))
    train(comp_a, opt_a, steps)
    assert comp_a.method.boundary == 10

    model_b = pretrained_mlp()
    comp_b, opt_b = _build(model_b, _config(0.5, steps=steps))
    train(comp_b, opt_b, cut)
    comp_b.save_checkpoint(tmp_path / "ckpt.safetensors")

    model_c = pretrained_mlp()
    comp_c, opt_c = _build(model_c, _config(0.5, steps=steps))
    comp_c.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert comp_c.method.factored == (cut >= 10)
    _optimizer_holds_exactly_the_trainable_params(model_c, opt_c)
    train(comp_c, opt_c, steps, start=cut)
    sa, sc = model_a.state_dict(), model_c.state_dict()
    assert list(sa) == list(sc)
    for key in sa:
        assert torch.equal(sa[key], sc[key]), key
    fa, fc = comp_a.finalize(), comp_c.finalize()
    X, _ = task()
    with torch.no_grad():
        assert torch.equal(fa(X), fc(X))


def test_lpaf_distillation_gradient_reaches_the_factors_after_the_boundary():
    model = pretrained_mlp()
    comp, opt = _build(model, _config(0.5, steps=10, distill_weight=1.0, feature_weight=1.0))
    train(comp, opt, 6)  # past the boundary (t1 = 5): the feature taps follow the new modules
    layers = comp.method.lowrank_layers()
    assert layers
    X, _ = task()
    out = model(X[:64])
    total = comp.loss(torch.zeros((), requires_grad=True), inputs=X[:64], outputs=out)
    assert comp.last_terms["kd"] > 0 and comp.last_terms["feature"] > 0
    total.backward()
    for layer in layers.values():
        assert layer.U.grad is not None and layer.U.grad.abs().sum() > 0


def test_lpaf_first_order_importance_option():
    model = pretrained_mlp()
    comp, opt = _build(model, _config(0.5, steps=10, options={"importance": "first_order"}))
    train(comp, opt, 10)
    comp.finalize()
    assert comp.kept_cost() <= 0.5 * comp.total_cost


@pytest.mark.filterwarnings("ignore:input_cov .* is not positive definite")  # dead ReLU units
def test_lpaf_input_metric_factors_in_the_inputs_metric_calibrated_at_the_boundary(monkeypatch):
    """input_metric: at the boundary the input covariance is calibrated on the pruned model (layer "2" sees
    relu of the *sparse* layer "0") and every layer is factored by sparsity_aware with input_metric."""
    import lrcomp.methods.lpaf as lpaf_module
    from lrcomp.compression.factorizations import factorize

    X, y = task(seed=5)
    calib = [(X[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]
    seen = {}

    def recording(linear, rank, **kw):
        seen[len(seen)] = (linear.weight.detach().clone(), linear.bias.detach().clone(), kw)
        return factorize(linear, rank, **kw)

    monkeypatch.setattr(lpaf_module, "factorize", recording)
    model = pretrained_mlp()
    config = _config(0.5, steps=20, options={"input_metric": True})
    comp = Compressor(model, config, calib_data=calib, loss_fn=lambda out, b: nn.functional.cross_entropy(out, b[1]))
    opt = torch.optim.AdamW(comp.parameters(), lr=3e-3)
    comp.attach(opt)
    train(comp, opt, 20)
    assert comp.method.factored and set(seen) == {0, 1}
    (W0, b0, kw0), (_, _, kw2) = seen[0], seen[1]
    assert kw0["input_metric"] is kw2["input_metric"] is True and kw0["method"] == "sparsity_aware"
    X64 = X[:512].double()
    torch.testing.assert_close(kw0["stats"]["input_cov"], X64.T @ X64 / 512, rtol=1e-6, atol=1e-6)
    assert bool((W0 == 0).any())  # layer "0" was pruned when layer "2"'s inputs were calibrated
    H = torch.relu(X64 @ W0.double().T + b0.double())
    torch.testing.assert_close(kw2["stats"]["input_cov"], H.T @ H / 512, rtol=1e-5, atol=1e-5)
    assert comp.kept_cost() <= 0.5 * comp.total_cost
    # the same run without the option factors differently (the option is not a no-op)
    seen.clear()
    plain = pretrained_mlp()
    comp2 = Compressor(plain, _config(0.5, steps=20))
    opt2 = torch.optim.AdamW(comp2.parameters(), lr=3e-3)
    comp2.attach(opt2)
    train(comp2, opt2, 20)
    assert seen[0][2]["input_metric"] is False and seen[0][2]["stats"] is None
    with pytest.raises(ValueError, match="calib"):
        Compressor(pretrained_mlp(), config)  # the option needs calibration data


def test_swap_params_in_optimizer_keeps_position_and_drops_state():
    a, b, c = (nn.Parameter(torch.randn(3)) for _ in range(3))
    opt = torch.optim.AdamW([a, b, c], lr=0.1)
    (a.sum() + b.sum() + c.sum()).backward()
    opt.step()
    new = [nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(4))]
    swap_params_in_optimizer(opt, b, new)
    params = opt.param_groups[0]["params"]
    assert [id(p) for p in params] == [id(a), id(new[0]), id(new[1]), id(c)]
    assert b not in opt.state and all(p not in opt.state for p in new) and a in opt.state
    with pytest.raises(ValueError, match="does not hold"):
        swap_params_in_optimizer(opt, b, new)
    swap_params_in_optimizer(None, a, new)  # no optimizer: nothing to do


def test_lpaf_options_are_validated():
    with pytest.raises(ValueError, match="target_sparsity"):
        LPAFOptions(target_sparsity=1.0)
    with pytest.raises(ValueError, match="prune_frac"):
        LPAFOptions(prune_frac=1.0)
    with pytest.raises(ValueError, match="warmup_frac"):
        LPAFOptions(warmup_frac=-0.1)
    with pytest.raises(ValueError, match="warmup_frac \\+ cooldown_frac"):
        LPAFOptions(warmup_frac=0.6, cooldown_frac=0.5)
    with pytest.raises(ValueError, match="importance"):
        LPAFOptions(importance="magnitude")
    with pytest.raises(ValueError, match="prune_score"):
        LPAFOptions(prune_score="magnitude")
    with pytest.raises(ValueError, match="min_scale"):
        LPAFOptions(min_scale=0)
    with pytest.raises(ValueError, match="input_metric"):
        LPAFOptions(input_metric="yes")
    with pytest.raises(TypeError, match="sparsity"):
        Compressor(pretrained_mlp(steps=0), _config(0.5, options={"sparsity": 0.5}))
