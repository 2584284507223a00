"""Mask functions ``g`` of the low-rank layer: ``d = S * g(scores)``.

Each is a few r-length PyTorch ops, so the op itself only ever sees ``d``.

- ``none``: g = 1 (plain truncated SVD; scores unused).
- ``hard``: g = 1[scores > 0]; no gradient reaches the scores.
- ``ste``: hard in the forward pass, the gradient of relu(scores) in the backward pass
  (the straight-through estimator of ACIP, Genzel et al. 2025).
- ``sigmoid``: g = sigmoid(scores / temperature).
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK_FNS = ("none", "hard", "ste", "sigmoid")


def validate_mask_fn(mask_fn: object, temperature: object) -> None:
    if mask_fn not in MASK_FNS:
        raise ValueError(f"mask_fn must be one of {MASK_FNS}, got {mask_fn!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def apply_mask_fn(scores: Tensor, mask_fn: str, temperature: float = 1.0) -> Tensor:
    """``g(scores)`` as a tensor of the scores' shape and dtype."""
    if mask_fn == "none":
        return torch.ones_like(scores)
    if mask_fn == "hard":
        return (scores > 0).to(scores.dtype)
    if mask_fn == "ste":
        soft = torch.relu(scores)
        return soft + ((scores > 0).to(scores.dtype) - soft).detach()
    if mask_fn == "sigmoid":
        return torch.sigmoid(scores / temperature)
    raise ValueError(f"mask_fn must be one of {MASK_FNS}, got {mask_fn!r}")
