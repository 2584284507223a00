"""LowRankCallback / LowRankTrainer under a real transformers.Trainer (CPU, tiny models, no manual call).

Two kinds of tests:

- against a small stand-in compressor written here (the contract of ``lrcomp.Compressor``:
  ``parameters / attach / loss / step / finalize / save_checkpoint / load_checkpoint``), so the
  wiring is checked today: hooks called once per optimizer step, the optimizer holds only the
  compressor's parameters, the penalty reaches the gradients, the final model is at the budget;
- against ``lrcomp.Compressor`` with every joint method; skipped while the framework does not exist.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lrcomp  # noqa: E402
from lrcomp.integrations import LowRankCallback, make_trainer  # noqa: E402
from lrcomp.integrations.trainer import COMPRESSOR_CHECKPOINT_NAME  # noqa: E402
from lrcomp.layers import LowRankLinear  # noqa: E402
from lrcomp.methods.compressor import OTHER_GROUP  # noqa: E402

HAS_FRAMEWORK = hasattr(lrcomp, "Compressor")
needs_framework = pytest.mark.skipif(not HAS_FRAMEWORK, reason="lrcomp.Compressor does not exist yet")
BUDGET = 0.5
IN, HIDDEN, CLASSES = 24, 48, 3


class TinyClassifier(nn.Module):
    """``x [B, 24] -> logits [B, 3]`` through two hidden linears (the targets) and a head ``classifier``."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(IN, HIDDEN)
        self.mid = nn.Linear(HIDDEN, HIDDEN)
        self.classifier = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x, labels=None):
        logits = self.classifier(torch.relu(self.mid(torch.relu(self.up(x)))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class ToyDataset(torch.utils.data.Dataset):
    """Linearly separable 3-class data: label = argmax of 3 fixed projections of x."""

    def __init__(self, n: int = 256, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, IN, generator=g)
        self.y = (self.x @ torch.randn(IN, CLASSES, generator=g)).argmax(-1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def target_params(model: nn.Module) -> tuple[int, int]:
    """(weights of the targeted layers now, their dense weights ``K N``): compact count, biases left out
    (the budget counts the factors ``r (K + N)`` against ``K N``)."""
    now = dense = 0
    for name in ("up", "mid"):
        m = model.get_submodule(name)
        dense += m.in_features * m.out_features
        if isinstance(m, LowRankLinear):
            now += m.num_parameters(compact=True) - (m.out_features if m.bias is not None else 0)
        else:
            now += m.weight.numel()
    return now, dense


class StubCompressor:
    """A stand-in with the Compressor API: an L2 penalty on the head, one-shot SVD at finalize."""

    def __init__(self, model: nn.Module, budget: float, penalty: float = 0.0):
        self.model = model
        self.budget = budget
        self.penalty = penalty
        self.num_steps = 0
        self.loss_calls = 0
        self.optimizer = None
        self.attach_calls = 0
        self.saved: list[str] = []
        self.loaded: list[str] = []
        self.opt_steps_at_step: list[int] = []

    def parameters(self):
        # the head and the targeted layers are trained; the first layer's bias stays frozen on purpose
        return [p for n, p in self.model.named_parameters() if n != "up.bias"]

    def attach(self, optimizer):
        assert isinstance(optimizer, torch.optim.Optimizer)
        self.optimizer = optimizer
        self.attach_calls += 1
        self.params_at_attach = {id(p) for p in self.parameters()}

    def loss(self, task_loss, *, inputs, outputs):
        assert "labels" in inputs and "logits" in outputs
        self.loss_calls += 1
        return task_loss + self.penalty * self.model.classifier.weight.square().sum()

    def step(self):
        # the optimizer has stepped once more than step() was called
        state = self.optimizer.state[self.model.classifier.weight]
        self.opt_steps_at_step.append(int(state["step"]))
        self.num_steps += 1

    def finalize(self):
        config = lrcomp.CompressionConfig(method="svd", budget=self.budget, allocation="uniform",
                                          target_modules=["up", "mid"])
        return lrcomp.compress(self.model, config)

    def save_checkpoint(self, path):
        with open(path, "w") as handle:
            handle.write(str(self.num_steps))
        self.saved.append(path)

    def load_checkpoint(self, path):
        self.loaded.append(path)


def training_args(tmp_path, **kw):
    base = {"output_dir": str(tmp_path / "out"), "max_steps": 12, "per_device_train_batch_size": 16,
            "learning_rate": 1e-2, "report_to": [], "save_strategy": "no", "logging_strategy": "no",
            "use_cpu": True, "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0}
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_stub_trainer_drives_every_hook(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    comp = StubCompressor(model, BUDGET)
    trainer = make_trainer(model, comp, training_args(tmp_path, gradient_accumulation_steps=2, weight_decay=0.1),
                           ToyDataset())
    frozen_before = model.up.bias.detach().clone()
    trainer.train()  # no manual call of attach / loss / step / finalize
    cb = trainer.lowrank_callback
    assert trainer.state.global_step == 12
    assert comp.num_steps == cb.steps == trainer.state.global_step
    # step() runs after each optimizer step (AdamW's per-parameter step counter), not per micro-batch
    assert comp.opt_steps_at_step == list(range(1, 13))
    assert comp.loss_calls == 2 * 12  # one per micro-batch
    assert comp.attach_calls == 1
    held = {id(p) for g in comp.optimizer.param_groups for p in g["params"]}
    assert held == comp.params_at_attach  # (finalize has since replaced the targeted layers)
    assert torch.equal(model.up.bias.detach(), frozen_before)  # not in compressor.parameters(): untouched
    # weight decay on the matrices, none on the biases
    decay = {g["weight_decay"]: {p.ndim for p in g["params"]} for g in comp.optimizer.param_groups}
    assert decay == {0.1: {2}, 0.0: {1}}
    # finalized at the budget, and the trainer holds the final model
    assert cb.final_model is not None and trainer.model is cb.final_model
    now, dense = target_params(trainer.model)
    assert now <= BUDGET * dense
    assert isinstance(trainer.model.mid, LowRankLinear)


class GroupStub(StubCompressor):
    """parameters() as group dicts: the head in a plain group at its own lr (as config.other_lr makes it), the
    targeted layers in a group that carries a method's mark."""

    def parameters(self):
        m = self.model
        return [{"params": [m.up.weight, m.mid.weight, m.mid.bias], "lr": 0.5, "method_mark": True},
                {"params": [m.classifier.weight, m.classifier.bias], "lr": 0.25, OTHER_GROUP: True}]


def test_group_dicts_keep_their_lr_and_a_plain_group_still_spares_biases_from_decay(tmp_path):
    model = TinyClassifier()
    comp = GroupStub(model, BUDGET)
    trainer = make_trainer(model, comp, training_args(tmp_path, max_steps=2, weight_decay=0.1), ToyDataset(),
                           lowrank_callback=LowRankCallback(comp, finalize=False))
    trainer.train()
    groups = [(g["lr"] if "initial_lr" not in g else g["initial_lr"], g["weight_decay"], bool(g.get(OTHER_GROUP)),
               [tuple(p.shape) for p in g["params"]]) for g in comp.optimizer.param_groups]
    m = model
    assert groups == [
        (0.5, 0.1, False, [tuple(m.up.weight.shape), tuple(m.mid.weight.shape), tuple(m.mid.bias.shape)]),  # whole
        (0.25, 0.1, True, [tuple(m.classifier.weight.shape)]),
        (0.25, 0.0, True, [tuple(m.classifier.bias.shape)]),
    ]


def test_penalty_reaches_the_gradients(tmp_path):
    """A strong L2 penalty through comp.loss must shrink the head far below a run without it."""
    norms = []
    for penalty in (0.0, 1.0):
        torch.manual_seed(0)
        model = TinyClassifier()
        comp = StubCompressor(model, BUDGET, penalty=penalty)
        callback = LowRankCallback(comp, finalize=False)
        trainer = make_trainer(model, comp, training_args(tmp_path, max_steps=20), ToyDataset(),
                               lowrank_callback=callback)
        trainer.train()
        assert callback.final_model is None
        norms.append(model.classifier.weight.norm().item())
    assert norms[1] < 0.5 * norms[0], norms


def test_plain_trainer_is_refused(tmp_path):
    """A plain Trainer would train every parameter and skip comp.loss: the callback says so before step 1."""
    model = TinyClassifier()
    comp = StubCompressor(model, BUDGET)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=ToyDataset(),
                                   callbacks=[LowRankCallback(comp)])
    with pytest.raises(RuntimeError, match="compressor.loss"):
        trainer.train()
    assert comp.num_steps == 0
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=ToyDataset(),
                                   callbacks=[LowRankCallback(comp, require_loss=False)])
    with pytest.raises(ValueError, match="exactly compressor.parameters"):
        trainer.train()
    assert comp.num_steps == 0


def test_several_processes_are_refused_before_step_1(tmp_path, monkeypatch):
    """Under torchrun the Trainer's DDP/FSDP wrapper would go stale at the first compaction: refused up front."""
    from lrcomp import distributed as dist_utils

    monkeypatch.setattr(dist_utils, "world_size", lambda: 2)
    model = TinyClassifier()
    comp = StubCompressor(model, BUDGET)
    trainer = make_trainer(model, comp, training_args(tmp_path), ToyDataset())
    with pytest.raises(RuntimeError, match="one process only.*wrap_ddp"):
        trainer.train()
    assert comp.num_steps == 0


def test_bad_arguments(tmp_path):
    model = TinyClassifier()
    with pytest.raises(TypeError, match="lacks"):
        LowRankCallback(object())
    other = StubCompressor(TinyClassifier(), BUDGET)
    with pytest.raises(ValueError, match="different model"):
        make_trainer(model, other, training_args(tmp_path), ToyDataset())
    comp = StubCompressor(model, BUDGET)
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        make_trainer(model, comp, training_args(tmp_path, load_best_model_at_end=True, eval_strategy="steps",
                                                save_strategy="steps"), ToyDataset(), eval_dataset=ToyDataset(8))


def test_checkpoints_save_and_resume_the_compressor(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    comp = StubCompressor(model, BUDGET)
    args = training_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    trainer = make_trainer(model, comp, args, ToyDataset(), lowrank_callback=LowRankCallback(comp, finalize=False))
    trainer.train()
    out = tmp_path / "out"
    assert comp.saved == [str(out / f"checkpoint-{s}" / COMPRESSOR_CHECKPOINT_NAME) for s in (3, 6)]
    assert all(os.path.isfile(p) for p in comp.saved)

    torch.manual_seed(0)
    model2 = TinyClassifier()
    comp2 = StubCompressor(model2, BUDGET)
    trainer2 = make_trainer(model2, comp2, training_args(tmp_path, max_steps=8, save_strategy="no"), ToyDataset(),
                            lowrank_callback=LowRankCallback(comp2, finalize=False))
    trainer2.train(resume_from_checkpoint=True)  # the last checkpoint: checkpoint-6
    assert comp2.loaded == [str(out / "checkpoint-6" / COMPRESSOR_CHECKPOINT_NAME)]
    assert trainer2.state.global_step == 8 and comp2.num_steps == 2


# ---- the real framework (skipped until lrcomp.Compressor lands) ----

def _joint_methods():
    methods = getattr(lrcomp, "methods", None)
    return tuple(getattr(methods, "JOINT_METHODS", ("acip", "pc_lora", "tunecomp", "jactus", "lpaf")))


def _compressor_steps(comp):
    for name in ("num_steps", "step_count", "global_step", "steps"):
        value = getattr(comp, name, None)
        if isinstance(value, int):
            return value
    return None


@needs_framework
@pytest.mark.parametrize("method", _joint_methods())
def test_compressor_under_trainer(tmp_path, method):
    torch.manual_seed(0)
    steps = 16
    model = TinyClassifier()
    data = ToyDataset()
    calib = [{"x": data.x[i:i + 32], "labels": data.y[i:i + 32]} for i in range(0, 128, 32)]
    comp = lrcomp.Compressor(model, lrcomp.CompressionConfig(method=method, budget=BUDGET, total_steps=steps,
                                                             target_modules=["up", "mid"]),
                             calib_data=calib, loss_fn=lambda out, batch: out["loss"], teacher=None)
    trainer = make_trainer(model, comp, training_args(tmp_path, max_steps=steps, learning_rate=3e-3), data)
    trainer.train()
    cb = trainer.lowrank_callback
    assert cb.steps == trainer.state.global_step == steps
    counted = _compressor_steps(comp)
    if counted is not None:
        assert counted == trainer.state.global_step
    final = trainer.model
    assert final is cb.final_model
    now, dense = target_params(final)
    assert now <= BUDGET * dense * (1 + 1e-9), (method, now, dense)
    # the compact model still classifies: it runs and gives finite logits
    with torch.no_grad():
        out = final(data.x[:8], data.y[:8])
    assert out["logits"].shape == (8, CLASSES) and torch.isfinite(out["logits"]).all()
    assert not math.isnan(out["loss"].item())


@needs_framework
def test_jactus_dense_warmup_under_trainer_trains_the_cores_after_the_boundary(tmp_path):
    """The mid-run factorisation swaps the dense weights for the cores in the Trainer's own optimizer."""
    torch.manual_seed(0)
    steps = 16
    model = TinyClassifier()
    data = ToyDataset()
    calib = [{"x": data.x[i:i + 32], "labels": data.y[i:i + 32]} for i in range(0, 128, 32)]
    config = lrcomp.CompressionConfig(method="jactus", budget=BUDGET, total_steps=steps, target_modules=["up", "mid"],
                                      method_options={"warmup_frac": 0.5})
    comp = lrcomp.Compressor(model, config, calib_data=calib, loss_fn=lambda out, batch: out["loss"], teacher=None)
    trainer = make_trainer(model, comp, training_args(tmp_path, max_steps=steps, learning_rate=3e-3), data,
                           lowrank_callback=LowRankCallback(comp, finalize=False))
    trainer.train()
    cores = comp.method.core_layers()
    assert comp.method.factored and cores
    held = {id(p) for group in comp.optimizer.param_groups for p in group["params"]}
    for core in cores.values():
        assert id(core.core) in held
        off_diagonal = core.core - torch.diag(torch.diag(core.core))
        assert off_diagonal.abs().max() > 1e-4  # initialised diagonal: the optimizer stepped it
    final = comp.finalize()
    now, dense = target_params(final)
    assert now <= BUDGET * dense * (1 + 1e-9)


def test_optimizer_state_restored_in_another_order_is_refused():
    from lrcomp.integrations.trainer import check_optimizer_params

    a, b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(4))

    class Holder:
        def parameters(self):
            return [a, b]

    opt = torch.optim.AdamW([a, b], lr=1e-3)
    (a.sum() + b.sum()).backward()
    opt.step()
    check_optimizer_params(opt, Holder())  # its own state fits
    state = opt.state_dict()
    state["state"] = {0: state["state"][1], 1: state["state"][0]}  # saved in the other order
    opt.load_state_dict(state)
    with pytest.raises(ValueError, match="another parameter order"):
        check_optimizer_params(opt, Holder())
