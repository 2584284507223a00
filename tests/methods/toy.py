"""The toy task shared by the joint-method tests: a 4-class linear-boundary problem and a small MLP.

``pretrained_mlp`` stands for the foundation model (trained briefly, gradients cleared);
``train`` is the training loop of the Compressor docstring, with batches that depend only on
the step index, so a resumed run sees exactly the batches of an uninterrupted one.
"""

import torch
from torch import nn


def task(seed=0):
    """``X [1024, 32]``, labels ``y [1024]`` in 0..3."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, 32, generator=g)
    y = (X @ torch.randn(32, 4, generator=g)).argmax(1)
    return X, y


def pretrained_mlp(seed=0, steps=60):
    """32 -> 64 -> 64 -> 4 MLP trained ``steps`` Adam steps on :func:`task`."""
    torch.manual_seed(seed)
    X, y = task()
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(X), (64,))
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model


def train(comp, opt, steps, start=0, seed=1, after_step=None):
    """Steps ``start .. steps - 1`` of the Compressor loop on :func:`task`."""
    X, y = task()
    model = comp.model
    for step in range(start, steps):
        g = torch.Generator().manual_seed(seed * 10_000 + step)
        idx = torch.randint(0, len(X), (64,), generator=g)
        out = model(X[idx])
        loss = comp.loss(nn.functional.cross_entropy(out, y[idx]), inputs=X[idx], outputs=out)
        loss.backward()
        opt.step()
        opt.zero_grad()
        comp.step()
        if after_step is not None:
            after_step(step + 1)


# The smaller task of the PC-LoRA and TuneComp tests: 16 inputs, 4 classes, a 16 -> 48 -> 48 -> 4 MLP.
IN, HID, CLASSES = 16, 48, 4


def small_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [n, 16]`` and labels ``[n]`` in 0..3 from a fixed linear boundary."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(IN, CLASSES, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, IN, generator=g)
    return x, (x @ w_true).argmax(1)


def small_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, HID), nn.ReLU(), nn.Linear(HID, CLASSES))


def evaluate(model) -> tuple[float, float]:
    """(cross-entropy, accuracy) of ``model`` on the whole :func:`task`."""
    X, y = task()
    with torch.no_grad():
        out = model(X)
    return nn.functional.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()
