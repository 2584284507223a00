"""``LowRankLinear``: a masked-singular-value low-rank drop-in for ``nn.Linear``.

    y = ((x @ V^T) * d) @ U^T + b   (+ lora_scale * (x @ A^T) @ B^T)   (+ dense_scale * x @ W0^T)

with ``d = S * g(scores) * active`` (``g`` from :mod:`lrcomp.layers.masks`, ``active`` the
directions not yet pruned). The LoRA branch and the dense branch run inside the same op:
the LoRA factors are concatenated to the low-rank ones (``V' = [V; A]``, ``d' = [d; s]``,
``U' = [U, B]``) and the dense branch is accumulated into the same output.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from lrcomp.layers.masks import apply_mask_fn, validate_mask_fn
from lrcomp.ops import lowrank_linear


def _check_rank(rank: object, in_features: int, out_features: int, name: str = "rank") -> int:
    full = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{name} must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= full:
        raise ValueError(
            f"{name} must be in [1, min(in_features, out_features)] = [1, {full}] for a "
            f"{in_features}->{out_features} layer, got {rank}"
        )
    return rank


def _swap_in_optimizer(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, resize) -> None:
    """Make ``optimizer`` train ``new`` instead of ``old``; per-parameter state shaped like ``old`` is resized."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {k: resize(v) if isinstance(v, Tensor) and v.shape == old.shape else v
                                for k, v in state.items()}


class LowRankLinear(nn.Module):
    """Low-rank linear layer with per-direction singular values and scores.

    Parameters (K = in_features, N = out_features, r = rank):
        U: ``[N, r]`` up factor (left singular vectors).
        S: ``[r]`` singular values.
        V: ``[r, K]`` down factor (right singular vectors, K-contiguous like ``nn.Linear.weight``).
        scores: ``[r]`` mask scores fed to ``mask_fn``.
        bias: ``[N]`` or None.
    Buffers:
        active: ``[r]`` bool, False for pruned directions.
        importance: ``[r]`` fp32 per-direction score for the rank allocator, or None
            (``from_linear``: the energy ``s_i^2``).
        dense_weight: ``[N, K]`` frozen copy of the original weight, or None.

    Args:
        mask_fn: "none", "hard" (scores > 0), "ste" (hard forward, relu gradient) or
            "sigmoid" (``sigmoid(scores / temperature)``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        mask_fn: str = "none",
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        rank = _check_rank(rank, in_features, out_features)
        validate_mask_fn(mask_fn, temperature)
        self.in_features = in_features
        self.out_features = out_features
        self.mask_fn = mask_fn
        self.temperature = float(temperature)
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.S = nn.Parameter(torch.ones(rank, **kw))
        self.V = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.scores = nn.Parameter(torch.ones(rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.register_buffer("active", torch.ones(rank, dtype=torch.bool, device=device))
        self.register_buffer("dense_weight", None)
        # Per-direction importance for the rank allocator (e.g. the energy s_i^2 it removes
        # from the output error when dropped), fp32 [r]; set by from_linear / lrcomp.factorize.
        self.register_buffer("importance", None, persistent=False)
        self._dense_scale = 0.0
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_scale = 0.0
        # Weight of the low-rank branch (TuneComp's sqrt(1 - alpha_t^2)); folded into d.
        self.lowrank_scale = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init with the output scale of ``nn.Linear``'s default init."""
        nn.init.kaiming_uniform_(self.V, a=math.sqrt(5))
        # Columns of U of norm ~1 keep (x V^T) U^T at the scale of x V^T.
        nn.init.normal_(self.U, std=1.0 / math.sqrt(self.rank))
        with torch.no_grad():
            self.S.fill_(1.0)
            self.scores.fill_(1.0)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | None = None,
        *,
        init: str = "svd",
        mask_fn: str = "none",
        temperature: float = 1.0,
        keep_dense: bool = False,
    ) -> LowRankLinear:
        """Factor ``linear`` by truncated SVD: ``W ~= U diag(S) V``.

        ``rank=None`` keeps the full rank ``min(K, N)`` and reproduces ``linear`` to fp32
        round-off; a rank r gives exactly the Eckart-Young optimum
        ``||W - W_r||_F^2 = sum_{i > r} s_i^2``. The SVD runs in fp64 on the weight's
        device, then the factors are cast to the weight's dtype. ``keep_dense=True`` stores
        a frozen copy of W for the decaying dense branch (``dense_scale`` starts at 0).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if init != "svd":
            raise ValueError(f"init must be 'svd', got {init!r}")
        weight = linear.weight.detach()
        if not torch.isfinite(weight).all():
            raise ValueError("linear.weight has non-finite values (nan or inf): cannot factor it")
        if linear.bias is not None and not torch.isfinite(linear.bias.detach()).all():
            raise ValueError("linear.bias has non-finite values (nan or inf)")
        N, K = weight.shape
        rank = min(K, N) if rank is None else _check_rank(rank, K, N)
        layer = cls(K, N, rank, bias=linear.bias is not None, mask_fn=mask_fn, temperature=temperature,
                    device=weight.device, dtype=weight.dtype)
        u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
        with torch.no_grad():
            layer.U.copy_(u[:, :rank])
            layer.S.copy_(s[:rank])
            layer.V.copy_(vh[:rank])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        layer.importance = s[:rank].square().float()
        if keep_dense:
            layer.attach_dense(weight.clone(), scale=0.0)
        return layer

    # ------------------------------------------------------------------ properties
    @property
    def rank(self) -> int:
        return self.S.shape[0]

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.V.dtype

    def mask(self) -> Tensor:
        """``g(scores) * active``: ``[r]``."""
        active = self.active.to(self.scores.dtype)
        if self.mask_fn == "none":
            return active
        return apply_mask_fn(self.scores, self.mask_fn, self.temperature) * active

    @property
    def d(self) -> Tensor:
        """``S * g(scores) * active``: the per-direction scale the op sees, ``[r]``."""
        if self.mask_fn == "none":  # one op instead of three on the hot path
            return self.S * self.active
        return self.S * self.mask()

    @property
    def active_rank(self) -> int:
        """Number of directions that contribute to the output (``d != 0``)."""
        with torch.no_grad():
            return int((self.d != 0).sum())

    @property
    def dense_scale(self) -> float:
        """Weight of the dense branch ``dense_scale * x @ W0^T`` (0 when none is attached)."""
        return self._dense_scale

    @dense_scale.setter
    def dense_scale(self, value: float) -> None:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"dense_scale must be a finite float, got {value!r}")
        if value != 0.0 and self.dense_weight is None:
            raise ValueError("dense_scale is nonzero but no dense weight is attached: call attach_dense() first")
        self._dense_scale = float(value)

    # ------------------------------------------------------------------ branches
    def attach_dense(self, weight: Tensor, scale: float = 1.0) -> None:
        """Attach a frozen dense branch ``W0 [N, K]`` (PC-LoRA, TuneComp) with weight ``scale``."""
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (self.out_features, self.in_features):
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"weight must be [{self.out_features}, {self.in_features}], got {shape}")
        self.dense_weight = weight.detach().to(device=self.V.device, dtype=self.V.dtype)
        self.dense_scale = scale

    def drop_dense(self) -> None:
        """Remove the dense branch (at the end of PC-LoRA / TuneComp)."""
        self._dense_scale = 0.0
        self.dense_weight = None

    def add_lora(self, rank: int, alpha: float | None = None) -> None:
        """Add a LoRA branch ``(alpha / rank) * B @ A`` with A ``[q, K]`` (Kaiming) and B ``[N, q]`` (zeros).

        It runs in the same op as the low-rank factors. ``alpha`` defaults to ``rank``.
        """
        if self.lora_A is not None:
            raise ValueError("this layer already has a LoRA branch")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        kw = {"device": self.V.device, "dtype": self.V.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        self.lora_scale = alpha / rank

    def _factors(self) -> tuple[Tensor, Tensor, Tensor]:
        V, d, U = self.V, self.d, self.U
        if self.lowrank_scale != 1.0:
            d = d * self.lowrank_scale
        if self.lora_A is not None:
            V = torch.cat([V, self.lora_A], 0)
            d = torch.cat([d, d.new_full((self.lora_A.shape[0],), self.lora_scale)])
            U = torch.cat([U, self.lora_B], 1)
        return V, d, U

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """``x [..., K] -> [..., N]`` in the layer's dtype."""
        V, d, U = self._factors()
        dense = self.dense_weight if self._dense_scale != 0.0 else None
        return lowrank_linear(x, V, d, U, self.bias, dense_weight=dense, dense_scale=self._dense_scale)

    # ------------------------------------------------------------------ pruning
    @torch.no_grad()
    def prune_(self, keep: int | Tensor) -> LowRankLinear:
        """Deactivate directions in place and return self.

        ``keep``: an int (keep the top-``keep`` currently active directions by ``|d|``) or a
        bool mask ``[r]`` (True = keep). Pruned directions get ``d = 0``; :meth:`compact`
        drops them physically.
        """
        if isinstance(keep, Tensor):
            if keep.dtype != torch.bool or tuple(keep.shape) != (self.rank,):
                raise ValueError(f"keep must be a bool mask of shape [{self.rank}], got {keep.dtype} "
                                 f"{tuple(keep.shape)}")
            self.active &= keep.to(self.active.device)
            return self
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= self.rank:
            raise ValueError(f"keep must be an int in [0, {self.rank}] or a bool mask, got {keep!r}")
        magnitude = self.d.abs().float()
        magnitude[~self.active] = -1.0
        order = torch.argsort(magnitude, descending=True, stable=True)
        new_active = torch.zeros_like(self.active)
        new_active[order[:keep]] = True
        self.active &= new_active
        return self

    @torch.no_grad()
    def merge_lora_(self) -> LowRankLinear:
        """Fold the LoRA branch (and ``lowrank_scale``) into the factors in place and return self.

        After :meth:`compact_`, ``U [N, r] -> [U, B] [N, r+q]``, ``S -> [d, lora_scale] [r+q]``,
        ``V [r, K] -> [V; A] [r+q, K]``, with ``mask_fn="none"`` and every direction active: the same
        function (up to rounding) and the same deployed parameter count, ``(r + q) (K + N)``, as
        :meth:`num_parameters` already counts the LoRA factors. ``U``, ``S``, ``V`` become new trainable
        parameters (an optimizer holding the old ones must be rebuilt): call it at the end of a run
        (a saved lrcomp checkpoint holds no LoRA branch).
        """
        if self.lora_A is None and self.lowrank_scale == 1.0:
            return self
        self.compact_()
        V, d, U = self._factors()
        self.U, self.S, self.V = (nn.Parameter(t.detach().clone()) for t in (U, d, V))
        self.scores = nn.Parameter(torch.ones_like(self.S), requires_grad=False)
        self.active = torch.ones(self.S.shape[0], dtype=torch.bool, device=self.S.device)
        self.importance = None
        self.mask_fn = "none"
        self.lora_A = self.lora_B = None
        self.lora_scale = 0.0
        self.lowrank_scale = 1.0
        return self

    def compact(self) -> LowRankLinear:
        """A new layer holding only the directions with ``d != 0``; same output, same flags."""
        return copy.deepcopy(self).compact_()

    @torch.no_grad()
    def compact_(self, optimizer: torch.optim.Optimizer | None = None) -> LowRankLinear:
        """Drop the directions with ``d == 0`` in place (physically) and return self.

        The module object stays the same (hooks and references survive); ``U``, ``S``, ``V``
        and ``scores`` become new, smaller parameters. With ``optimizer``, its parameter
        groups point to the new parameters and their per-parameter state (e.g. AdamW's
        ``exp_avg`` / ``exp_avg_sq``) is sliced to the kept directions, so training continues
        exactly as if the dropped directions had never been there.
        """
        keep = (self.d != 0).nonzero().flatten()
        if keep.numel() == 0:
            raise ValueError("every direction of this layer is pruned: nothing is left to compact")
        if keep.numel() == self.rank:
            return self
        for name, dim in (("U", 1), ("S", 0), ("V", 0), ("scores", 0)):
            old = getattr(self, name)
            new = nn.Parameter(old.detach().index_select(dim, keep).clone(), requires_grad=old.requires_grad)
            if optimizer is not None:
                _swap_in_optimizer(optimizer, old, new, lambda t, d=dim: t.index_select(d, keep))
            setattr(self, name, new)
        self.active = self.active.index_select(0, keep)
        if self.importance is not None:
            self.importance = self.importance.index_select(0, keep)
        return self

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """Densify: ``W = U diag(d) V (+ LoRA) (+ dense_scale * W0)`` as an ``nn.Linear`` (computed in fp64)."""
        V, d, U = self._factors()
        weight = (U.double() * d.double()) @ V.double()
        if self.dense_weight is not None and self._dense_scale != 0.0:
            weight += self._dense_scale * self.dense_weight.double()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.V.device, dtype=self.V.dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def num_parameters(self, compact: bool = True) -> int:
        """Parameter count.

        ``compact=True``: what the deployed layer holds once compacted and with S folded into
        a factor: ``active_rank * (K + N)`` plus the bias, the LoRA factors
        ``q * (K + N)`` and the dense weight when its scale is nonzero. ``compact=False``:
        every element of every parameter and buffer held now (the ``active`` flags excluded).
        """
        K, N = self.in_features, self.out_features
        if not compact:
            return sum(p.numel() for p in self.parameters()) + (
                self.dense_weight.numel() if self.dense_weight is not None else 0)
        total = self.active_rank * (K + N)
        if self.bias is not None:
            total += N
        if self.lora_A is not None:
            total += self.lora_A.shape[0] * (K + N)
        if self.dense_weight is not None and self._dense_scale != 0.0:
            total += K * N
        return total

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"active_rank={self.active_rank}, bias={self.bias is not None}, mask_fn={self.mask_fn!r}"
                + (f", lora_rank={self.lora_A.shape[0]}" if self.lora_A is not None else "")
                + (f", dense_scale={self._dense_scale:g}" if self.dense_weight is not None else ""))
