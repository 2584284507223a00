"""calibrate() and CalibrationStats: every statistic against an explicit fp64 computation, masks, groups, resume."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrcomp.calib import STAT_NAMES, CalibrationStats, calibrate

ALL = STAT_NAMES  # ("input_cov", "grad_cov", "input_abs_mean", "fisher")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ---------------------------------------------------------------------------------------------
# Toy models and their explicit (reference) statistics
# ---------------------------------------------------------------------------------------------
def mlp(dtype=torch.float64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)


MLP_LINEARS = ["0", "2", "4"]


def mlp_data(n=3, dtype=torch.float64):
    # [4, 3, 6] inputs: leading dims flatten into 12 tokens per batch; the offset makes X^T X far from diagonal
    return [(torch.randn(4, 3, 6, dtype=dtype) + 0.3, torch.randn(4, 3, 4, dtype=dtype)) for _ in range(n)]


def mse(outputs, batch):
    return ((outputs - batch[1]) ** 2).sum() / 7.0


def explicit_stats(trace_forward, model, data, names):
    """Reference: inputs/outputs recorded by an explicit forward, dL/dy and dL/dW from torch.autograd.grad."""
    ref = copy.deepcopy(model).double()
    for p in ref.parameters():
        p.requires_grad_(True)
    sums = {n: {"xx": 0, "gg": 0, "abs": 0, "fisher": 0, "T": 0} for n in names}
    for batch in data:
        xs, ys, loss, masks = trace_forward(ref, batch)
        weights = [ref.get_submodule(n).weight for n in names]
        grads = torch.autograd.grad(loss, [ys[n] for n in names] + weights)
        for i, n in enumerate(names):
            X, G = xs[n], grads[i]
            keep = masks.get(n)
            X = X.reshape(-1, X.shape[-1]) if keep is None else X[keep]
            G = G.reshape(-1, G.shape[-1]) if keep is None else G[keep]
            s = sums[n]
            s["xx"] = s["xx"] + X.T @ X
            s["gg"] = s["gg"] + G.T @ G
            s["abs"] = s["abs"] + X.abs().sum(0)
            s["fisher"] = s["fisher"] + (grads[len(names) + i] ** 2).sum(0)  # the true per-batch dL/dW
            s["T"] += X.shape[0]
    return {n: {"input_cov": s["xx"] / s["T"], "grad_cov": s["gg"] / s["T"], "input_abs_mean": s["abs"] / s["T"],
                "fisher": s["fisher"] / len(data), "T": s["T"]} for n, s in sums.items()}


def trace_mlp(model, batch):
    xs, ys = {}, {}
    h = batch[0].double()
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            xs[str(i)] = h
            h = layer(h)
            ys[str(i)] = h
        else:
            h = layer(h)
    return xs, ys, mse(h, batch), {}


class TinyEncoder(nn.Module):
    """Token embeddings -> q -> tanh -> out -> masked mean pool -> pool (logits); dict batches with padding."""

    def __init__(self, vocab=20, dim=6, hidden=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.q = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)
        self.pool = nn.Linear(dim, classes)
        self.trace = None

    def forward(self, input_ids, attention_mask, labels=None):
        x_q = self.emb(input_ids)
        y_q = self.q(x_q)
        x_out = torch.tanh(y_q)
        y_out = self.out(x_out)
        m = attention_mask.unsqueeze(-1).to(y_out.dtype)
        x_pool = (y_out * m).sum(1) / m.sum(1)
        logits = self.pool(x_pool)
        if self.trace is not None:
            self.trace.update(xs={"q": x_q, "out": x_out, "pool": x_pool}, ys={"q": y_q, "out": y_out, "pool": logits})
        loss = F.cross_entropy(logits, labels) + (logits ** 2).sum() * 0.1 if labels is not None else None
        return {"loss": loss, "logits": logits}


ENC_LINEARS = ["q", "out", "pool"]


def enc_data(n=3, B=4, T=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        lengths = torch.randint(2, T + 1, (B,), generator=gen)
        lengths[0] = T  # at least one full row so that the padded width is T
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, 20, (B, T), generator=gen) * mask  # pad id 0: a real, nonzero embedding
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (B,), generator=gen)})
    return batches


def trace_encoder(model, batch):
    model.trace = {}
    out = model(**batch)
    trace, model.trace = model.trace, None
    keep = batch["attention_mask"].bool()
    return trace["xs"], trace["ys"], out["loss"], {"q": keep, "out": keep}  # pool's input [B, 6] is not masked


def encoder(dtype=torch.float64):
    return TinyEncoder().to(dtype)


class Passes:
    """A re-iterable data source that counts passes and can raise after some batches of one pass."""

    def __init__(self, batches, crash_pass=None, crash_after=0):
        self.batches, self.crash_pass, self.crash_after = batches, crash_pass, crash_after
        self.passes = 0
        self.served = 0

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.batches):
            if self.passes == self.crash_pass and i == self.crash_after:
                raise RuntimeError("simulated crash")
            self.served += 1
            yield batch


# ---------------------------------------------------------------------------------------------
# Each statistic equals its explicit computation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frozen", [True, False])
def test_sequential_every_stat_matches_explicit_fp64(frozen):
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(not frozen)
    flags = [p.requires_grad for p in model.parameters()]
    data = mlp_data()
    calib = calibrate(model, data, stats=ALL, loss_fn=mse, progress=False)
    ref = explicit_stats(trace_mlp, model, data, MLP_LINEARS)
    assert calib.layers == MLP_LINEARS and calib.stat_names == ALL
    for name in MLP_LINEARS:
        assert calib.count(name) == ref[name]["T"] == 36 and calib.num_batches(name) == 3
        for stat in ALL:
            got = calib[name][stat]
            assert got.dtype == torch.float64 and got.device.type == "cpu"
            assert got.shape == ref[name][stat].shape
            assert rel(got, ref[name][stat]) <= 1e-10, (name, stat)
    # Parameters untouched: same requires_grad flags, no .grad written.
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_dict_batches_count_only_unpadded_tokens():
    model = encoder()
    data = enc_data()
    calib = calibrate(model, data, stats=ALL, progress=False)  # the loss is outputs["loss"]
    ref = explicit_stats(trace_encoder, model, data, ENC_LINEARS)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in data)
    assert real_tokens < 3 * 4 * 7  # the data is padded
    assert calib.count("q") == calib.count("out") == real_tokens
    assert calib.count("pool") == 12  # [B, K] input: every row is a real example
    for name in ENC_LINEARS:
        for stat in ALL:
            assert rel(calib[name][stat], ref[name][stat]) <= 1e-10, (name, stat)
    # The mask matters: the covariance over every token (padding included) is far from the masked one.
    X = torch.cat([model.emb(b["input_ids"]).reshape(-1, 6) for b in data]).detach()
    unmasked = X.T @ X / X.shape[0]
    assert rel(unmasked, calib["q"]["input_cov"]) > 0.05


class InPlace(nn.Module):
    """Linear -> in-place add and relu_ -> Linear: the gradient must be taken before the in-place ops."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 9)
        self.b = nn.Linear(9, 4)

    def forward(self, x, trace=None):
        y = self.a(x)
        if trace is not None:
            trace["xs"], trace["ys"] = {"a": x}, {"a": y}
            y = y.clone()  # the reference differentiates w.r.t. the unmodified output
        y += 0.5
        y.relu_()
        out = self.b(y)
        if trace is not None:
            trace["xs"]["b"], trace["ys"]["b"] = y, out
        return out


def trace_inplace(model, batch):
    trace = {}
    out = model(batch[0].double(), trace)
    return trace["xs"], trace["ys"], mse(out, batch), {}


@pytest.mark.parametrize("frozen", [True, False])
def test_in_place_ops_after_a_layer_do_not_corrupt_the_gradient(frozen):
    model = InPlace().double()
    for p in model.parameters():
        p.requires_grad_(not frozen)
    data = mlp_data()
    calib = calibrate(model, data, stats=ALL, loss_fn=mse, progress=False)
    ref = explicit_stats(trace_inplace, model, data, ["a", "b"])
    for name in ("a", "b"):
        for stat in ALL:
            assert rel(calib[name][stat], ref[name][stat]) <= 1e-10, (name, stat)


def test_fp32_model_matches_fp64_reference():
    model = mlp(torch.float32)
    data = mlp_data(dtype=torch.float32)
    calib = calibrate(model, data, stats=ALL, loss_fn=mse, progress=False)
    ref = explicit_stats(trace_mlp, model, data, MLP_LINEARS)
    for name in MLP_LINEARS:
        for stat in ALL:
            assert calib[name][stat].dtype == torch.float64
            assert rel(calib[name][stat], ref[name][stat]) <= 1e-5, (name, stat)


def test_input_cov_is_psd_and_symmetric_and_single_string_stats():
    calib = calibrate(mlp(), mlp_data(), stats="input_cov", progress=False)
    assert calib.stat_names == ("input_cov",)
    for name in calib:
        C = calib[name]["input_cov"]
        assert torch.equal(C, C.T)
        assert torch.linalg.eigvalsh(C).min() >= -1e-12 * torch.linalg.eigvalsh(C).max()


def test_max_batches_limits_the_pass_and_does_not_advance_a_generator():
    data = mlp_data(5)
    served = []

    def gen():
        for b in data:
            served.append(1)
            yield b

    calib = calibrate(mlp(), gen(), max_batches=2, progress=False)
    assert len(served) == 2
    assert calib.count("0") == 24 and calib.num_batches("0") == 2
    first_two = calibrate(mlp(), data[:2], progress=False)
    assert torch.equal(calib["0"]["input_cov"], first_two["0"]["input_cov"])


def test_mode_is_eval_during_calibration_and_restored_after():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    model = nn.Sequential(nn.Linear(6, 5), Probe(), nn.Dropout(0.5), nn.Linear(5, 4)).double()
    model.train()
    model[2].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    data = mlp_data(2)
    a = calibrate(model, data, progress=False)
    b = calibrate(model, data, progress=False)
    assert seen and not any(seen)
    assert [m.training for m in model.modules()] == before
    assert torch.equal(a["3"]["input_cov"], b["3"]["input_cov"])  # dropout was off: deterministic


def test_target_and_exclude_modules_follow_find_target_linears():
    calib = calibrate(mlp(), mlp_data(1), target_modules=["2", "4"], exclude_modules=["4"], progress=False)
    assert calib.layers == ["2"]


# ---------------------------------------------------------------------------------------------
# Bounded memory (groups), save and resume
# ---------------------------------------------------------------------------------------------
def test_group_size_one_equals_all_at_once_exactly():
    model, data = encoder(), enc_data()
    full = calibrate(model, data, stats=ALL, progress=False)
    source = Passes(data)
    grouped = calibrate(model, source, stats=ALL, group_size=1, progress=False)
    assert source.passes == 3
    assert grouped.layers == full.layers
    for name in full:
        assert grouped.count(name) == full.count(name)
        for stat in ALL:
            assert torch.equal(grouped[name][stat], full[name][stat]), (name, stat)


def test_resume_after_a_crash_in_the_second_group(tmp_path):
    model, data = encoder(), enc_data()
    path = tmp_path / "calib.safetensors"
    reference = calibrate(model, data, stats=ALL, progress=False)

    crashing = Passes(data, crash_pass=2, crash_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        calibrate(model, crashing, stats=ALL, group_size=1, save_path=path, progress=False)
    partial = CalibrationStats.load(path)
    assert partial.layers == ["q"]  # only the finished group was saved
    assert [f for f in os.listdir(tmp_path) if f != "calib.safetensors"] == []  # no temporary file left

    again = Passes(data)
    resumed = calibrate(model, again, stats=ALL, group_size=1, save_path=path, progress=False)
    assert again.passes == 2  # "q" was loaded, not recomputed
    on_disk = CalibrationStats.load(path)
    for stats in (resumed, on_disk):
        assert stats.layers == reference.layers
        for name in reference:
            assert stats.count(name) == reference.count(name)
            for stat in ALL:
                assert torch.equal(stats[name][stat], reference[name][stat]), (name, stat)


def test_resume_recomputes_layers_missing_a_requested_stat(tmp_path):
    model, data = encoder(), enc_data()
    path = tmp_path / "c.safetensors"
    calibrate(model, data, stats=("input_cov",), save_path=path, progress=False)
    source = Passes(data)
    both = calibrate(model, source, stats=("input_cov", "input_abs_mean"), save_path=path, progress=False)
    assert source.passes == 1 and both.stat_names == ("input_cov", "input_abs_mean")
    fresh = calibrate(model, data, stats=("input_cov", "input_abs_mean"), progress=False)
    assert torch.equal(both["out"]["input_abs_mean"], fresh["out"]["input_abs_mean"])
    nothing = Passes(data)
    calibrate(model, nothing, stats=("input_cov",), save_path=path, progress=False)
    assert nothing.passes == 0  # everything is on disk


def test_resume_rejects_other_max_batches_and_other_shapes(tmp_path):
    path = tmp_path / "c.safetensors"
    calibrate(mlp(), mlp_data(), max_batches=2, save_path=path, progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        calibrate(mlp(), mlp_data(), max_batches=3, save_path=path, progress=False)
    other = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 4)).double()
    with pytest.raises(ValueError, match="save_path.*another model"):
        calibrate(other, mlp_data(), max_batches=2, save_path=path, progress=False)


def test_one_shot_iterator_with_several_groups_is_an_error():
    with pytest.raises(ValueError, match="group_size.*one-shot iterator"):
        calibrate(mlp(), iter(mlp_data()), group_size=1, progress=False)
    calibrate(mlp(), iter(mlp_data()), group_size=3, progress=False)  # one group: one pass is enough


# ---------------------------------------------------------------------------------------------
# CalibrationStats
# ---------------------------------------------------------------------------------------------
def test_stats_mapping_roundtrip_and_repr(tmp_path):
    calib = calibrate(mlp(), mlp_data(), stats=("input_cov", "input_abs_mean"), progress=False)
    entry = calib["2"]
    assert isinstance(entry, dict) and set(entry) == {"input_cov", "input_abs_mean"}
    entry.pop("input_cov")
    assert "input_cov" in calib["2"]  # indexing hands out a copy
    path = tmp_path / "sub" / "s.safetensors"
    calib.save(path)
    loaded = CalibrationStats.load(path)
    assert loaded.layers == calib.layers and loaded.stat_names == calib.stat_names
    for name in calib:
        assert loaded.count(name) == calib.count(name) == 36
        for stat, value in calib[name].items():
            assert torch.equal(loaded[name][stat], value)
    assert repr(loaded) == "CalibrationStats(3 layers, stats=('input_cov', 'input_abs_mean'), tokens=36)"
    with pytest.raises(KeyError, match="nope"):
        calib["nope"]
    plain = CalibrationStats({"a": {"input_cov": torch.eye(2, dtype=torch.float32)}}, {"a": 5})
    assert plain["a"]["input_cov"].dtype == torch.float64 and plain.count("a") == 5


def test_load_rejects_a_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a CalibrationStats file"):
        CalibrationStats.load(path)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_no_matching_target_lists_the_linear_layers():
    with pytest.raises(ValueError, match=r"target_modules=\['nothing'\].*its nn.Linear modules: 0, 2, 4"):
        calibrate(mlp(), mlp_data(), target_modules=["nothing"], progress=False)


def test_empty_data_is_an_error():
    with pytest.raises(ValueError, match="data yielded no batch"):
        calibrate(mlp(), [], progress=False)
    with pytest.raises(TypeError, match="data must be an iterable"):
        calibrate(mlp(), 3, progress=False)


@pytest.mark.parametrize("stat", ["grad_cov", "fisher"])
def test_missing_loss_for_gradient_stats(stat):
    model = mlp()
    with pytest.raises(ValueError, match="loss_fn"):
        calibrate(model, mlp_data(), stats=(stat,), progress=False)  # a tensor output has no .loss
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        calibrate(model, mlp_data(), stats=(stat,), loss_fn="mse", progress=False)
    with pytest.raises(ValueError, match="scalar"):
        calibrate(model, mlp_data(), stats=(stat,), loss_fn=lambda out, b: out, progress=False)
    enc = encoder()
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in enc_data()]
    with pytest.raises(ValueError, match="loss_fn"):
        calibrate(enc, unlabeled, stats=(stat,), progress=False)  # outputs["loss"] is None


def test_missing_loss_is_detected_before_any_batch_for_a_hf_base_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16)
    model = transformers.BertModel(config)
    served = []

    def gen():
        served.append(1)
        yield {"input_ids": torch.ones(1, 4, dtype=torch.long)}

    with pytest.raises(ValueError, match="loss_fn"):
        calibrate(model, gen(), stats=("grad_cov",), progress=False)
    assert served == []


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"stats: unknown statistic\(s\) \['input_covariance'\]"):
        calibrate(mlp(), mlp_data(), stats=("input_covariance",), progress=False)
    with pytest.raises(ValueError, match="stats must name at least one"):
        calibrate(mlp(), mlp_data(), stats=(), progress=False)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_batches"):
            calibrate(mlp(), mlp_data(), max_batches=bad, progress=False)
        with pytest.raises(ValueError, match="group_size"):
            calibrate(mlp(), mlp_data(), group_size=bad, progress=False)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        calibrate(lambda x: x, mlp_data(), progress=False)
    with pytest.raises(TypeError, match="data must yield"):
        calibrate(mlp(), ["text"], progress=False)


def test_a_layer_that_is_never_called_is_left_out_with_a_warning():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(6, 4)
            self.spare = nn.Linear(6, 4)

        def forward(self, x):
            return self.used(x)

    with pytest.warns(UserWarning, match="spare"):
        calib = calibrate(Unused().double(), [torch.randn(3, 6, dtype=torch.float64)], progress=False)
    assert calib.layers == ["used"]


# ---------------------------------------------------------------------------------------------
# The real MiniLM on real sentences
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_on_fortunes_gives_psd_statistics_for_all_37_linears():
    from lrcomp.data import FORTUNES_DIR, load_texts

    if not FORTUNES_DIR.is_dir():
        pytest.skip("fortunes are not installed (/usr/share/games/fortunes)")
    from lrcomp.models import load_encoder, mean_pool

    model, tokenizer = load_encoder()
    texts = load_texts(limit=8, seed=0, max_chars=200)
    batches = [dict(tokenizer(texts[i:i + 4], padding=True, truncation=True, max_length=48, return_tensors="pt"))
               for i in range(0, len(texts), 4)]
    target = torch.nn.functional.normalize(torch.randn(384), dim=0)

    def loss_fn(outputs, batch):  # pull every sentence embedding towards a fixed direction
        emb = torch.nn.functional.normalize(mean_pool(outputs.last_hidden_state, batch["attention_mask"]), dim=-1)
        return (1 - emb @ target).sum()

    calib = calibrate(model, batches, stats=("input_cov", "grad_cov"), loss_fn=loss_fn, progress=False)
    assert len(calib) == 37
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded_tokens = sum(b["attention_mask"].numel() for b in batches)
    assert real_tokens < padded_tokens
    for name in calib:
        expected = len(texts) if name == "pooler.dense" else real_tokens
        assert calib.count(name) == expected, name
        for stat in ("input_cov",) if name == "pooler.dense" else ("input_cov", "grad_cov"):
            C = calib[name][stat]
            assert torch.equal(C, C.T)
            eig = torch.linalg.eigvalsh(C)
            # PSD up to the fp32 rounding of the per-batch products (the accumulator's 1e-6 relative bound):
            # with ~200 tokens and K = 384 or 1536 most eigenvalues are exactly zero in exact arithmetic.
            assert eig.max() > 0 and eig.min() >= -1e-6 * eig.max(), (name, stat)
    # The pooler does not feed last_hidden_state: its output gradient is exactly zero.
    assert torch.count_nonzero(calib["pooler.dense"]["grad_cov"]) == 0
    assert all(p.grad is None for p in model.parameters())
