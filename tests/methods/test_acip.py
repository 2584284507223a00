"""ACIP and the Compressor's generic behaviour (errors, distillation, compaction, resume) on a toy task."""

import copy

import pytest
import torch
from torch import nn
from toy import pretrained_mlp, task, train

import lrcomp
from lrcomp import CompressionConfig, Compressor
from lrcomp.layers import LowRankLinear
from lrcomp.methods.acip import SCORE_GROUP, ACIPOptions
from lrcomp.methods.compressor import weight_cost


def _accuracy(model, X, y):
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item()


def _run(model, config, steps, comp=None, opt=None, start=0, seed=1):
    """Build the Compressor and its AdamW (unless given), then train steps ``start .. steps - 1``."""
    comp = comp or Compressor(model, config)
    if opt is None:
        opt = torch.optim.AdamW(comp.parameters(), lr=1e-3)
        comp.attach(opt)
    train(comp, opt, steps, start=start, seed=seed)
    return comp, opt


def _config(budget=0.5, steps=150, **kw):
    return CompressionConfig(method="acip", budget=budget, total_steps=steps, target_modules=["0", "2"],
                             method_options={"lora_rank": 2, **kw.pop("method_options", {})}, **kw)


@pytest.mark.parametrize("budget", [0.8, 0.5, 0.3])
def test_acip_ends_within_budget_and_keeps_accuracy(budget):
    X, y = task()
    model = pretrained_mlp(steps=150)
    base = _accuracy(model, X, y)
    comp, _ = _run(model, _config(budget), 150)
    assert comp.method.frozen
    # the step that reaches the budget prunes only what it must (one direction of the widest layer,
    # 64 + 64 weights, is the most it can miss by)
    assert budget * comp.total_cost - 128 < comp.kept_cost() <= budget * comp.total_cost
    # a layer whose factors cost at least its dense weight ends dense (break-even)
    dense = {n: weight_cost(m) >= m.in_features * m.out_features for n, m in comp.method.lowrank_layers().items()}
    final = comp.finalize()
    assert comp.kept_cost() <= budget * comp.total_cost
    for name, is_dense in dense.items():
        assert type(final.get_submodule(name)) is (nn.Linear if is_dense else LowRankLinear)
    assert all(m.active_rank == m.rank for m in comp.method.lowrank_layers().values())  # compact
    assert _accuracy(final, X, y) >= base - (0.05 if budget >= 0.5 else 0.25)
    assert _accuracy(final, X, y) > 0.5  # chance is 0.25


def test_acip_svd_llm_basis_calibrates_and_learns():
    X, y = task()
    model = pretrained_mlp(steps=150)
    base = _accuracy(model, X, y)
    with pytest.raises(ValueError, match="calib_data"):
        Compressor(pretrained_mlp(steps=0), _config(0.5, method_options={"basis": "svd_llm"}))
    comp = Compressor(model, _config(0.5, method_options={"basis": "svd_llm"}), calib_data=[X[:256], X[256:512]])
    layer = comp.method.lowrank_layers()["0"]
    assert layer.mask_fn == "ste" and not layer.U.requires_grad and layer.scores.requires_grad
    # at full rank the whitened factors reproduce the dense layer
    torch.testing.assert_close(model(X[:64]), pretrained_mlp(steps=150)(X[:64]), atol=1e-4, rtol=1e-4)
    comp, _ = _run(model, None, 150, comp=comp)
    final = comp.finalize()
    assert comp.kept_cost() <= 0.5 * comp.total_cost
    assert _accuracy(final, X, y) >= base - 0.05
    with pytest.raises(ValueError, match="basis"):
        ACIPOptions(basis="qr")


def test_acip_prunes_progressively_and_compacts_with_optimizer_state():
    model = pretrained_mlp(steps=150)
    comp, opt = _run(model, _config(0.5), 60)
    ranks = [layer.rank for layer in comp.method.lowrank_layers().values()]
    assert sum(ranks) < 32 + 64  # directions were dropped physically during the run
    for layer in comp.method.lowrank_layers().values():
        for p in (layer.scores,):
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    assert state[key].shape == p.shape
        assert any(p is layer.scores for group in opt.param_groups for p in group["params"])


def test_compaction_keeps_outputs():
    X, _ = task()
    model = pretrained_mlp(steps=150)
    comp, opt = _run(model, _config(0.5), 30)
    layer = comp.method.lowrank_layers()["2"]
    with torch.no_grad():
        layer.scores[:5] = -1.0  # mask five directions off
    before = model(X).detach()
    assert comp.compact() == 5
    assert torch.allclose(model(X), before, atol=1e-6)


def test_materialize_gives_the_whole_curve_from_one_run():
    X, y = task()
    model = pretrained_mlp(steps=150)
    comp, _ = _run(model, _config(0.3), 150)
    comp.finalize()
    accs, costs = [], []
    for budget in (0.2, 0.3, 0.5, 0.8):
        m = comp.method.materialize(budget)
        cost = sum(weight_cost(m.get_submodule(n)) for n in ("0", "2"))
        assert cost <= budget * comp.total_cost
        costs.append(cost)
        accs.append(_accuracy(m, X, y))
        # saveable: LoRA folded in, or dense where the layer reached break-even
        assert all(getattr(m.get_submodule(n), "lora_A", None) is None for n in ("0", "2"))
    assert costs == sorted(costs) and costs[-1] > costs[0]
    assert accs[-1] >= accs[0]  # more directions, no worse
    assert model.get_submodule("2").rank == comp.method.lowrank_layers()["2"].rank  # training model untouched


def test_finalize_folds_the_lora_into_the_factors():
    X, _ = task()
    model = pretrained_mlp(steps=150)
    comp, _ = _run(model, _config(0.5), 150)
    comp.method._freeze()
    comp.compact()
    with torch.no_grad():
        before = model(X)
    lora = {n: comp.method.lowrank_layers()[n].lora_A.shape[0] for n in ("0", "2")}
    ranks = {n: comp.method.lowrank_layers()[n].rank for n in ("0", "2")}
    final = comp.finalize()
    for name in ("0", "2"):
        layer = final.get_submodule(name)
        if isinstance(layer, LowRankLinear):
            assert layer.lora_A is None and layer.rank == ranks[name] + lora[name]
        else:  # past break-even: dense (its function is checked below)
            assert (ranks[name] + lora[name]) * (layer.in_features + layer.out_features) \
                >= layer.in_features * layer.out_features
    assert comp.kept_cost() <= 0.5 * comp.total_cost
    with torch.no_grad():
        torch.testing.assert_close(final(X), before, rtol=1e-5, atol=1e-5)


def test_finalize_makes_a_layer_past_break_even_dense():
    """A layer that kept so many directions that its factors cost more than its dense weight ends as nn.Linear:
    the same function, at the cost the budget counted for it; materialize still gives the curve afterwards."""
    X, y = task()
    config = _config(0.8, steps=60, method_options={"score_init": 0.3, "lambda_start": 1e-2, "lambda_end": 50.0})
    comp = Compressor(pretrained_mlp(steps=150), config)
    comp.method.lowrank_layers()["0"].scores.data.fill_(100.0)  # layer 0 keeps every direction
    comp, _ = _run(comp.model, None, 60, comp=comp)
    layer = comp.method.lowrank_layers()["0"]
    assert layer.rank * (layer.in_features + layer.out_features) >= layer.in_features * layer.out_features
    assert weight_cost(layer) == layer.in_features * layer.out_features  # the budget counts what it will cost
    comp.model.eval()
    with torch.no_grad():
        before = comp.model(X)
    kept = comp.kept_cost()
    final = comp.finalize()
    assert type(final.get_submodule("0")) is nn.Linear and isinstance(final.get_submodule("2"), LowRankLinear)
    assert comp.kept_cost() == kept <= 0.8 * comp.total_cost
    with torch.no_grad():
        torch.testing.assert_close(final(X), before, rtol=1e-5, atol=1e-5)
    for budget in (0.8, 0.95):  # the dense layer stays as it is; the other layer follows the ranking
        m = comp.materialize(budget)
        assert type(m.get_submodule("0")) is nn.Linear
        assert sum(weight_cost(m.get_submodule(n)) for n in ("0", "2")) \
            <= budget * comp.total_cost


def test_resume_equals_uninterrupted(tmp_path):
    steps = 120
    ref_model = pretrained_mlp(steps=150)
    _run(ref_model, _config(0.5, steps), steps)
    model = pretrained_mlp(steps=150)
    comp, opt = _run(model, _config(0.5, steps), 70)
    comp.save_checkpoint(tmp_path / "ckpt.safetensors")
    fresh = pretrained_mlp(steps=150)
    comp2 = Compressor(fresh, _config(0.5, steps))
    opt2 = torch.optim.AdamW(comp2.parameters(), lr=1e-3)
    comp2.attach(opt2)
    comp2.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert comp2.step_count == 70
    _run(fresh, None, steps, comp=comp2, opt=opt2, start=70)
    for (n1, p1), (n2, p2) in zip(ref_model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert n1 == n2 and p1.shape == p2.shape and torch.equal(p1, p2), n1


def test_distillation_gradient_flows_to_the_student():
    model = pretrained_mlp(steps=150)
    config = _config(0.5, distill_weight=1.0, feature_weight=1.0)
    comp = Compressor(model, config)
    X, y = task()
    with torch.no_grad():  # make the student differ from the teacher: mask half of layer 2's directions
        comp.method.lowrank_layers()["2"].scores[::2] = -1.0
    for term in ("kd", "feature"):
        model.zero_grad()
        out = model(X[:64])
        comp.loss(out.sum() * 0.0, inputs=X[:64], outputs=out)  # the task term contributes nothing
        assert comp.last_terms[term] > 1e-4
        comp.distill_weight, comp.feature_weight = (1.0, 0.0) if term == "kd" else (0.0, 1.0)
        out = model(X[:64])
        comp.loss(out.sum() * 0.0, inputs=X[:64], outputs=out).backward()
        lora_b = comp.method.lowrank_layers()["2"].lora_B.grad
        assert lora_b is not None and lora_b.abs().sum() > 0, term


def test_teacher_with_other_outputs_is_rejected():
    model = pretrained_mlp(steps=150)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 7))
    comp = Compressor(model, _config(0.5, distill_weight=1.0), teacher=teacher)
    X, _ = task()
    out = model(X[:8])
    with pytest.raises(ValueError, match="teacher"):
        comp.loss(out.sum(), inputs=X[:8], outputs=out)


def test_default_teacher_is_a_frozen_dense_copy():
    model = pretrained_mlp(steps=150)
    dense = copy.deepcopy(model)
    comp = Compressor(model, _config(0.5, distill_weight=1.0))
    assert all(not p.requires_grad for p in comp.teacher.parameters())
    assert type(comp.teacher.get_submodule("2")) is nn.Linear
    assert torch.equal(comp.teacher.get_submodule("2").weight, dense.get_submodule("2").weight)


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "magic", "total_steps": 10}, "acip"),
    ({"method": "acip", "total_steps": 0}, "total_steps"),
    ({"method": "acip", "total_steps": -3}, "total_steps"),
    ({"method": "acip"}, "total_steps"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig(**kwargs)


def test_compressor_errors():
    model = pretrained_mlp(steps=150)
    with pytest.raises(ValueError, match="lrcomp.compress"):
        Compressor(model, CompressionConfig(method="svd", budget=0.5))
    with pytest.raises(ValueError, match="cannot be reached"):
        Compressor(model, _config(0.01))
    with pytest.raises(ValueError, match=r"matches no nn.Linear.*linear layers are: \[0, 2, 4\]"):
        Compressor(model, CompressionConfig(method="acip", total_steps=5, target_modules=["nope"]))
    with pytest.raises(TypeError, match="lora_rank"):
        Compressor(model, _config(0.5, method_options={"lora_rnk": 3}))
    with pytest.raises(ValueError, match="prune_fraction"):
        Compressor(model, _config(0.5, method_options={"prune_fraction": 0.0}))
    with pytest.raises(ValueError, match="compress"):
        lrcomp.compress(model, _config(0.5))


def test_lora_that_leaves_no_room_is_refused_before_any_change():
    # The LoRA compensation counts in the budget: with lora_rank at the layers' full rank it alone exceeds it.
    # This used to pass construction and fail mid-run with "leaves no direction".
    model = pretrained_mlp(steps=150)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="lora_rank=64"):
        Compressor(model, _config(0.5, method_options={"lora_rank": 64}))
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- dense warm-up
def _warm(budget=0.5, steps=40, frac=0.5, **kw):
    return _config(budget, steps, method_options={"warmup_frac": frac, **kw.pop("method_options", {})}, **kw)


def test_acip_warmup_trains_dense_then_factors_the_trained_weights():
    model = pretrained_mlp(steps=150)
    comp, opt = _run(model, _warm(steps=40, frac=0.25), 0)  # boundary: step 10
    assert comp.method.boundary == 10 and not comp.method.factored
    assert all(type(model.get_submodule(n)) is nn.Linear for n in ("0", "2"))
    assert opt.param_groups[0]["params"] == [] and opt.param_groups[0][SCORE_GROUP]
    pretrained = {n: model.get_submodule(n).weight.detach().clone() for n in ("0", "2")}
    biases = {n: model.get_submodule(n).bias for n in ("0", "2")}
    dense = {}
    factor = comp.method.factor_layers

    def recording(stats):  # the weights the boundary factors
        dense.update({n: model.get_submodule(n).weight.detach().clone() for n in ("0", "2")})
        factor(stats)

    comp.method.factor_layers = recording

    def check(step):
        if step < 10:
            assert comp.method.penalty() is None and not comp.method.lowrank_layers() and not dense
        if step == 10:
            layers = comp.method.lowrank_layers()
            assert comp.method.factored and set(layers) == {"0", "2"}
            for n, layer in layers.items():
                assert (dense[n] - pretrained[n]).abs().max() > 1e-3  # the warm-up trained the dense weights
                torch.testing.assert_close(layer.U @ torch.diag(layer.S) @ layer.V, dense[n], rtol=1e-4, atol=1e-5)
                assert layer.bias is biases[n] and not layer.bias.requires_grad  # same Parameter, frozen
                assert torch.equal(layer.scores, torch.ones_like(layer.scores))
            assert opt.param_groups[0]["params"] == [layers[n].scores for n in ("0", "2")]
            trainable = {id(p) for p in model.parameters() if p.requires_grad}
            assert {id(p) for g in opt.param_groups for p in g["params"]} - {id(b) for b in biases.values()} \
                == trainable
            # the penalty schedule starts at the boundary
            assert comp.method.penalty_weight(10) == comp.method.options.lambda_start
            assert comp.method.prune_end == 10 + 0.6 * 30

    train(comp, opt, 40, after_step=check)
    assert comp.method.lowrank_layers()
    comp.finalize()
    assert comp.kept_cost() <= 0.5 * comp.total_cost


def test_acip_warmup_learns_ends_within_budget_and_gives_the_curve():
    X, y = task()
    model = pretrained_mlp(steps=150)
    comp, _ = _run(model, _warm(0.3, steps=150, frac=0.3), 150)
    assert comp.method.order and min(step for *_, step, _ in comp.method.order) > 45  # pruning after the warm-up
    final = comp.finalize()
    assert comp.kept_cost() <= 0.3 * comp.total_cost
    assert _accuracy(final, X, y) > 0.8
    curve = [_accuracy(comp.method.materialize(b), X, y) for b in (0.3, 0.8)]
    assert curve[1] >= curve[0]


def test_acip_warmup_finalize_before_the_boundary_factors_and_cuts_by_singular_value():
    model = pretrained_mlp(steps=150)
    comp, _ = _run(model, _warm(steps=40, frac=0.5), 5)
    with pytest.raises(RuntimeError, match="warm-up runs until step 20"):
        comp.materialize(0.5)
    final = comp.finalize()
    assert comp.method.factored and comp.kept_cost() <= 0.5 * comp.total_cost
    for n in ("0", "2"):
        layer = final.get_submodule(n)
        assert type(layer) is LowRankLinear and layer.lora_A is None
    # equal scores: the ranking falls back to the singular values, so each layer keeps its top directions
    method = comp.method
    for n in ("0", "2"):
        assert sorted(method.origin[n].tolist()) == list(range(len(method.origin[n])))
    live = [(n, o) for n, o in method.ranking() if o in method.origin[n].tolist()]
    svals = [float(final.get_submodule(n).S.detach()[method.origin[n].tolist().index(o)]) for n, o in live]
    assert svals == sorted(svals, reverse=True)


def test_acip_warmup_needs_the_score_group_in_the_optimizer():
    model = pretrained_mlp(steps=150)
    comp = Compressor(model, _warm(steps=20, frac=0.5))
    opt = torch.optim.AdamW([p for g in comp.parameters() for p in g["params"]], lr=1e-3)
    comp.attach(opt)
    with pytest.raises(ValueError, match="no acip score group"):
        train(comp, opt, 10)


# cut before, at and after the boundary (step 6 of 20); svd_llm calibrates at the boundary
@pytest.mark.parametrize("cut,basis", [(3, "svd"), (6, "svd"), (14, "svd"), (14, "svd_llm")])
def test_acip_warmup_resume_equals_uninterrupted(tmp_path, cut, basis):
    steps = 20
    X, y = task(seed=5)
    calib = [X[i:i + 128] for i in range(0, 512, 128)] if basis == "svd_llm" else None
    config = _warm(steps=steps, frac=0.3, distill_weight=0.5, feature_weight=0.5,
                   method_options={"basis": basis, "lambda_start": 1e-2, "lambda_end": 50.0})
    ref = pretrained_mlp(steps=150)
    comp_a, opt_a = _run(ref, config, steps, comp=Compressor(ref, config, calib_data=calib))
    assert comp_a.method.order  # the run pruned after the boundary

    model_b = pretrained_mlp(steps=150)
    comp_b, _ = _run(model_b, config, cut, comp=Compressor(model_b, config, calib_data=calib))
    comp_b.save_checkpoint(tmp_path / "ckpt.safetensors")

    fresh = pretrained_mlp(steps=150)
    comp_c = Compressor(fresh, config, calib_data=calib)
    opt_c = torch.optim.AdamW(comp_c.parameters(), lr=1e-3)
    comp_c.attach(opt_c)
    comp_c.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert comp_c.step_count == cut and comp_c.method.factored == (cut >= 6)
    _run(fresh, None, steps, comp=comp_c, opt=opt_c, start=cut)
    assert comp_c.method.order == comp_a.method.order
    for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert n1 == n2 and p1.shape == p2.shape and torch.equal(p1, p2), n1


def test_acip_warmup_option_is_validated():
    for bad in (-0.1, 1.0, True, "half"):
        with pytest.raises(ValueError, match="warmup_frac"):
            ACIPOptions(warmup_frac=bad)
