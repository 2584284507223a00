"""JACTUS: union-of-subspaces factorisation, frozen bases with a trainable core, global allocation."""

import copy

import pytest
import torch
from torch import nn
from toy import evaluate, pretrained_mlp, task, train

from lrcomp import CompressionConfig, Compressor
from lrcomp.compression.factorizations import factorize
from lrcomp.layers import LowRankLinear
from lrcomp.methods.compressor import OTHER_GROUP
from lrcomp.methods.jactus import CORE_GROUP, CoreLowRankLinear, JACTUSOptions

TARGETS = ["0", "2"]






def _loss_fn(out, batch):
    return nn.functional.cross_entropy(out, batch[1])


def _calib():
    X, y = task(seed=5)
    return [(X[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]


def _config(budget=0.5, steps=100, **kw):
    return CompressionConfig(method="jactus", budget=budget, total_steps=steps, target_modules=TARGETS, **kw)


def _build(model, config, lr=1e-2):
    comp = Compressor(model, config, calib_data=_calib(), loss_fn=_loss_fn)
    opt = torch.optim.AdamW(comp.parameters(), lr=lr)
    comp.attach(opt)
    return comp, opt






@pytest.mark.parametrize("budget", [0.8, 0.5, 0.3])
def test_jactus_ends_within_budget_with_plain_lowrank_layers(budget):
    model = pretrained_mlp()
    comp, opt = _build(model, _config(budget, steps=20))
    ranks = comp.method.ranks
    assert ranks and all(isinstance(model.get_submodule(n), CoreLowRankLinear) for n in ranks)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in TARGETS if n not in ranks)
    train(comp, opt, 20)
    final = comp.finalize()
    assert comp.kept_cost() <= budget * comp.total_cost
    for name in TARGETS:
        module = final.get_submodule(name)
        if name in ranks:
            assert type(module) is LowRankLinear and module.rank == ranks[name]
        else:
            assert type(module) is nn.Linear


def test_jactus_learns_and_finalize_keeps_outputs():
    model = pretrained_mlp()
    comp, opt = _build(model, _config(0.3, steps=150))
    before_loss, before_acc = evaluate(model)
    train(comp, opt, 150)
    trained_loss, trained_acc = evaluate(model)
    X, _ = task()
    with torch.no_grad():
        y_core = model(X)
    final = comp.finalize()
    with torch.no_grad():
        y_final = final(X)
    assert trained_loss < 0.7 * before_loss
    assert trained_acc > max(before_acc, 0.8)  # chance is 0.25
    torch.testing.assert_close(y_final, y_core, atol=1e-5, rtol=1e-5)  # folding the core changes nothing


def test_jactus_bases_stay_frozen_and_only_the_core_trains():
    model = pretrained_mlp()
    comp, opt = _build(model, _config(0.5, steps=30), lr=1e-2)
    cores = comp.method.core_layers()
    assert cores
    saved = {n: (m.U.detach().clone(), m.S.detach().clone(), m.V.detach().clone(), m.core.detach().clone())
             for n, m in cores.items()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == trainable == {id(p) for p in comp.parameters()}
    for m in cores.values():
        assert m.core.requires_grad and m.core.shape == (m.rank, m.rank)
        assert not any(p.requires_grad for p in (m.U, m.S, m.V, m.scores))
        torch.testing.assert_close(m.core.detach(), torch.diag(torch.diag(m.core.detach())))  # diag(s) init
    train(comp, opt, 30)
    for name, m in cores.items():
        U, S, V, core = saved[name]
        assert torch.equal(m.U, U) and torch.equal(m.S, S) and torch.equal(m.V, V)
        assert (m.core - core).abs().max() > 1e-3  # the core moved, off the diagonal too
        assert (m.core - torch.diag(torch.diag(m.core))).abs().max() > 1e-4


def test_jactus_core_layer_equals_its_factorisation_and_folds_on_both_sides():
    torch.manual_seed(0)
    for K, N in ((20, 33), (33, 20)):  # the core multiplies V (K <= N) or U (K > N)
        linear = nn.Linear(K, N)
        X = torch.randn(256, K)
        stats = {"input_cov": X.T.double() @ X.double() / 256, "grad_cov": torch.eye(N, dtype=torch.float64)}
        layer = factorize(linear, 7, method="jactus_union", stats=stats)
        core = CoreLowRankLinear.from_lowrank(layer)
        torch.testing.assert_close(core(X), layer(X), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            core.core.add_(0.1 * torch.randn(7, 7))
        folded = core.fold()
        assert type(folded) is LowRankLinear and folded.rank == 7
        torch.testing.assert_close(folded(X), core(X), atol=1e-5, rtol=1e-5)
        assert core.num_parameters() == folded.num_parameters() == 7 * (K + N) + N
        assert core.num_parameters(compact=False) >= 49 + 7 * (K + N)
        assert bool((folded.S[:-1] >= folded.S[1:]).all())


def test_jactus_needs_the_gradient_covariance():
    model = pretrained_mlp()
    with pytest.raises(ValueError, match="need a loss"):
        Compressor(model, _config(0.5), calib_data=[X for X, _ in _calib()])  # no loss_fn, no labels
    with pytest.raises(ValueError, match="calib"):
        Compressor(model, _config(0.5))  # no calibration data at all


def test_jactus_compact_is_a_noop_and_distillation_reaches_the_core():
    model = pretrained_mlp()
    comp, opt = _build(model, _config(0.5, steps=10, distill_weight=1.0, feature_weight=1.0))
    X, y = task()
    with torch.no_grad():
        before = model(X[:64])
    assert comp.compact() == 0
    with torch.no_grad():
        assert torch.equal(model(X[:64]), before)
    with torch.no_grad():  # move the core away from the teacher so both terms have a gradient
        for m in comp.method.core_layers().values():
            m.core.mul_(0.5)
    out = model(X[:64])
    comp.loss(nn.functional.cross_entropy(out, y[:64]), inputs=X[:64], outputs=out)
    assert {"kd", "feature"} <= set(comp.last_terms)
    distill = comp.distill_weight * 0 + sum(comp.last_terms[k] for k in ("kd", "feature"))
    assert distill > 0
    # gradient of the distillation terms alone
    out = model(X[:64])
    total = comp.loss(torch.zeros((), requires_grad=True), inputs=X[:64], outputs=out)
    total.backward()
    grads = [m.core.grad for m in comp.method.core_layers().values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_jactus_options_are_validated():
    with pytest.raises(ValueError, match="weight_frac"):
        JACTUSOptions(weight_frac=0.5)
    with pytest.raises(ValueError, match="input_frac"):
        JACTUSOptions(input_frac=-1)
    with pytest.raises(ValueError, match="tol"):
        JACTUSOptions(tol=0)
    with pytest.raises(ValueError, match="train_bias"):
        JACTUSOptions(train_bias="yes")
    for bad in (-0.5, 1.5, True, "1"):
        with pytest.raises(ValueError, match="grad_metric"):
            JACTUSOptions(grad_metric=bad)
    with pytest.raises(TypeError, match="grad_fraction"):
        Compressor(pretrained_mlp(steps=0), _config(0.5, method_options={"grad_fraction": 0.5}),
                   calib_data=_calib(), loss_fn=_loss_fn)


def test_jactus_train_bias_option_and_uniform_allocation():
    model = pretrained_mlp()
    comp, opt = _build(model, _config(0.5, steps=5, allocation="uniform", method_options={"train_bias": False}))
    for m in comp.method.core_layers().values():
        assert not m.bias.requires_grad
        K, N = m.in_features, m.out_features
        assert m.rank == int(0.5 * K * N / (K + N))
    train(comp, opt, 5)
    comp.finalize()
    assert comp.kept_cost() <= 0.5 * comp.total_cost


def test_jactus_train_bases_option_trains_u_and_v_and_folds_exactly():
    model = pretrained_mlp()
    comp, opt = _build(model, _config(0.5, steps=20, method_options={"train_bases": True}), lr=1e-2)
    cores = comp.method.core_layers()
    saved = {n: (m.U.detach().clone(), m.V.detach().clone()) for n, m in cores.items()}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for m in cores.values():
        assert m.U.requires_grad and m.V.requires_grad and m.core.requires_grad
        assert id(m.U) in in_opt and id(m.V) in in_opt
        assert not (m.S.requires_grad or m.scores.requires_grad)
    train(comp, opt, 20)
    for name, m in cores.items():
        assert (m.U - saved[name][0]).abs().max() > 1e-4 and (m.V - saved[name][1]).abs().max() > 1e-4
    X, _ = task(seed=9)
    with torch.no_grad():
        before = model(X[:64])
    final = comp.finalize()
    with torch.no_grad():
        torch.testing.assert_close(final(X[:64]), before, rtol=1e-4, atol=1e-4)
    assert comp.kept_cost() <= 0.5 * comp.total_cost
    with pytest.raises(ValueError, match="train_bases"):
        JACTUSOptions(train_bases=1)


# ---------------------------------------------------------------------------------------------- dense warm-up
def _warm(budget=0.5, steps=20, frac=0.5, **kw):
    return _config(budget, steps=steps, method_options={"warmup_frac": frac, **kw.pop("options", {})}, **kw)


@pytest.mark.parametrize("grad_metric", [0.0, 0.7])
def test_jactus_warmup_trains_dense_then_factors_the_trained_weights(grad_metric):
    model = pretrained_mlp()
    comp, opt = _build(model, _warm(steps=20, frac=0.3, options={"grad_metric": grad_metric}), lr=3e-3)  # boundary: 6
    assert comp.method.boundary == 6 and not comp.method.factored and comp.method.ranks == {}
    assert all(type(model.get_submodule(n)) is nn.Linear for n in TARGETS)
    pretrained = {n: model.get_submodule(n).weight.detach().clone() for n in TARGETS}
    seen = {}
    original = comp.calibration_stats

    def recording(**kw):
        seen["model"] = copy.deepcopy(comp.model)  # the model the statistics describe
        seen["stats"] = original(**kw)
        return seen["stats"]

    comp.calibration_stats = recording

    def check(step):
        if step < 6:
            assert "model" not in seen and not comp.method.core_layers()
        if step == 6:
            assert "model" in seen and comp.method.factored
            for n in TARGETS:  # the warm-up trained the dense weights
                assert (seen["model"].get_submodule(n).weight - pretrained[n]).abs().max() > 1e-3
            for n, core in comp.method.core_layers().items():
                expected = CoreLowRankLinear.from_lowrank(
                    factorize(seen["model"].get_submodule(n), comp.method.ranks[n], method="jactus_union",
                              stats=seen["stats"][n], grad_metric=grad_metric))
                for attr in ("U", "V", "core"):
                    torch.testing.assert_close(getattr(core, attr), getattr(expected, attr))
                assert core.bias is seen_bias[n]  # the same Parameter: its optimizer state carries on
            trainable = {id(p) for p in model.parameters() if p.requires_grad}
            assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
            assert not any(id(p) in trainable for core in comp.method.core_layers().values()
                           for p in (core.U, core.V))

    seen_bias = {n: model.get_submodule(n).bias for n in TARGETS}
    train(comp, opt, 20, after_step=check)
    assert comp.method.core_layers()
    final = comp.finalize()
    assert comp.kept_cost() <= 0.5 * comp.total_cost
    assert all(type(final.get_submodule(n)) is LowRankLinear for n in comp.method.ranks)


def test_jactus_warmup_learns_and_ends_within_budget():
    model = pretrained_mlp()
    comp, opt = _build(model, _warm(0.3, steps=150, frac=0.5))
    before_loss, _ = evaluate(model)
    train(comp, opt, 150)
    final = comp.finalize()
    loss, acc = evaluate(final)
    assert loss < 0.7 * before_loss and acc > 0.8
    assert comp.kept_cost() <= 0.3 * comp.total_cost


def test_jactus_warmup_finalize_before_the_boundary_still_factors():
    model = pretrained_mlp()
    comp, opt = _build(model, _warm(steps=20, frac=0.5))
    train(comp, opt, 4)
    assert not comp.method.factored
    final = comp.finalize()
    assert comp.method.factored and comp.kept_cost() <= 0.5 * comp.total_cost
    assert all(type(final.get_submodule(n)) is LowRankLinear for n in comp.method.ranks)


def test_jactus_warmup_reads_a_one_shot_iterator_of_calibration_batches_once():
    model = pretrained_mlp()
    config = _warm(steps=6, frac=0.5, calib_max_batches=3)
    comp = Compressor(model, config, calib_data=iter(_calib()), loss_fn=_loss_fn)
    assert isinstance(comp._calib_data, list) and len(comp._calib_data) == 3  # read at construction
    opt = torch.optim.AdamW(comp.parameters(), lr=1e-3)
    comp.attach(opt)
    train(comp, opt, 6)
    assert comp.method.factored and comp.method.core_layers()


# factored at setup (cut 7); with a dense warm-up to step 5: cut before, at and after the boundary; the cores
# in a group of their own (core_lr) before and after the boundary
@pytest.mark.parametrize("frac,cut,options", [(0.0, 7, {}), (0.3, 2, {}), (0.3, 5, {}), (0.3, 11, {}),
                                              (0.3, 2, {"core_lr": 3e-2}), (0.3, 11, {"core_lr": 3e-2})])
def test_jactus_resume_equals_uninterrupted(tmp_path, frac, cut, options):
    steps = 16
    config = _warm(steps=steps, frac=frac, distill_weight=0.5, feature_weight=0.5, options=options)
    model_a = pretrained_mlp()
    comp_a, opt_a = _build(model_a, config)
    train(comp_a, opt_a, steps)

    comp_b, opt_b = _build(pretrained_mlp(), config)
    train(comp_b, opt_b, cut)
    comp_b.save_checkpoint(tmp_path / "ckpt.safetensors")

    model_c = pretrained_mlp()
    comp_c, opt_c = _build(model_c, config)
    comp_c.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert comp_c.step_count == cut and comp_c.method.factored == (cut >= comp_c.method.boundary)
    train(comp_c, opt_c, steps, start=cut)
    assert comp_c.method.ranks == comp_a.method.ranks
    for (name, pa), (_, pc) in zip(model_a.state_dict().items(), model_c.state_dict().items(), strict=True):
        assert torch.equal(pa, pc), name
    fa, fc = comp_a.finalize(), comp_c.finalize()
    X, _ = task()
    with torch.no_grad():
        assert torch.equal(fa(X), fc(X))


def test_jactus_warmup_feature_distillation_reaches_the_cores_after_the_boundary():
    model = pretrained_mlp()
    comp, opt = _build(model, _warm(steps=10, frac=0.5, feature_weight=1.0))
    train(comp, opt, 6)
    cores = comp.method.core_layers()
    assert cores
    X, _ = task()
    out = model(X[:64])
    comp.loss(torch.zeros((), requires_grad=True), inputs=X[:64], outputs=out).backward()
    assert comp.last_terms["feature"] > 0  # the student's tap reads the core layers, not the replaced Linears
    assert all(m.core.grad is not None and m.core.grad.abs().sum() > 0 for m in cores.values())


def test_jactus_warmup_option_is_validated():
    for bad in (-0.1, 1.0, True, "half"):
        with pytest.raises(ValueError, match="warmup_frac"):
            JACTUSOptions(warmup_frac=bad)


# ---------------------------------------------------------------------------------------------- core_lr
@pytest.mark.parametrize("frac,train_bases,other_lr", [(0.0, False, None), (0.5, False, 1e-3), (0.5, True, None)])
def test_jactus_core_lr_trains_what_replaces_each_weight_in_its_own_group(frac, train_bases, other_lr):
    lr, core_lr = 1e-3, 2e-2
    model = pretrained_mlp()
    config = _warm(steps=10, frac=frac, other_lr=other_lr, options={"core_lr": core_lr, "train_bases": train_bases})
    comp = Compressor(model, config, calib_data=_calib(), loss_fn=_loss_fn)
    # Adam without weight decay: the first step of a parameter with fresh state moves each entry by its lr
    opt = torch.optim.Adam(comp.parameters(), lr=lr)
    comp.attach(opt)
    [cores] = [g for g in opt.param_groups if g.get(CORE_GROUP)]
    assert cores["lr"] == core_lr
    boundary = comp.method.boundary
    if boundary:
        assert cores["params"] == [] and not comp.method.factored
        dense = [model.get_submodule(n).weight for n in TARGETS]
        assert all(any(p is w for p in opt.param_groups[0]["params"]) for w in dense)  # the warm-up at lr
        train(comp, opt, boundary)
    layers = comp.method.core_layers()
    assert layers and comp.method.factored
    expected = [p for n in TARGETS if n in layers for p in (layers[n].core, *((layers[n].U, layers[n].V)
                                                                                if train_bases else ()))]
    assert [id(p) for p in cores["params"]] == [id(p) for p in expected]
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each once
    assert all(g["lr"] == (other_lr if g.get(OTHER_GROUP) else lr) for g in opt.param_groups if g is not cores)
    before = [p.detach().clone() for p in expected]
    train(comp, opt, boundary + 1, start=boundary)
    for p, b in zip(expected, before, strict=True):
        moved = (p.detach() - b).abs().max().item()
        assert 0.99 * core_lr <= moved <= 1.0001 * core_lr


def test_jactus_core_lr_needs_the_optimizer_of_comp_parameters():
    model = pretrained_mlp()
    comp = Compressor(model, _warm(steps=10, frac=0.5, options={"core_lr": 1e-2}), calib_data=_calib(),
                      loss_fn=_loss_fn)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    comp.attach(opt)
    with pytest.raises(ValueError, match="no jactus core group"):
        train(comp, opt, comp.method.boundary)


def test_jactus_core_lr_option_is_validated():
    for bad in (0, -1e-3, float("inf"), float("nan"), True, "1e-3"):
        with pytest.raises(ValueError, match="core_lr"):
            JACTUSOptions(core_lr=bad)
    assert JACTUSOptions(core_lr=5e-4).core_lr == 5e-4 and JACTUSOptions().core_lr is None
