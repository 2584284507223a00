"""Streaming covariance of layer inputs or output gradients: ``C = sum_batches X^T X``."""

from __future__ import annotations

import torch
from torch import Tensor

from lrcomp.ops import covariance as _cov_op

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class CovarianceAccumulator:
    """Accumulates ``C = sum X^T X`` over many batches of ``x [..., dim]`` (tokens x features).

    Serves input covariance (SVD-LLM, ASVD, JACTUS) and output-gradient covariance
    (``G^T G``, FWSVD, JACTUS) alike: feed it the activations or the gradients.

    Each :meth:`update` computes one triangle of ``X^T X`` (the matrix is symmetric), sums the
    products in fp32 over at most 8192 tokens at a time (bf16/fp16 products are exact in fp32)
    and folds them into an fp64 master, so precision does not degrade over millions of tokens.
    On CUDA with the extension loaded a tensor-core kernel (csrc/covariance.cu) does the update;
    elsewhere the PyTorch reference (:mod:`lrcomp.ops.covariance`).

    Args:
        dim: feature width ``d``; the matrix is ``[d, d]``.
        device: where the fp64 master lives (default: CPU); updates must come on that device.

    Example::

        acc = CovarianceAccumulator(4096, device="cuda")
        for batch in loader:
            acc.update(hidden_states)          # [batch, seq, 4096] bf16
        acc.all_reduce_()                      # under torch.distributed
        C = acc.covariance()                   # [4096, 4096] fp64, divided by acc.count
    """

    def __init__(self, dim: int, *, device: torch.device | str | None = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self._master = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # upper triangle only
        self._count = 0

    @property
    def device(self) -> torch.device:
        return self._master.device

    @property
    def count(self) -> int:
        """Number of tokens (rows of ``x.reshape(-1, dim)``) accumulated so far."""
        return self._count

    def reset(self) -> None:
        self._master.zero_()
        self._count = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add ``X^T X`` for ``X = x.reshape(-1, dim)``; ``x`` is ``[..., dim]`` in bf16/fp16/fp32."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _INPUT_DTYPES:
            raise TypeError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must be [..., dim={self.dim}], got shape {tuple(x.shape)}: its last dim must equal the "
                f"accumulator's dim"
            )
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the accumulator is on {self.device}: move x there")
        x2 = x.detach().reshape(-1, self.dim)
        if x2.shape[0] == 0:
            return
        _cov_op.covariance_update_(self._master, x2)
        self._count += x2.shape[0]

    def covariance(self, normalize: bool = True) -> Tensor:
        """The symmetric ``[dim, dim]`` fp64 matrix ``sum X^T X`` (divided by :attr:`count` if normalize)."""
        C = _cov_op.symmetrize(self._master)
        if normalize:
            if self._count == 0:
                raise ValueError("covariance(normalize=True) needs at least one token: update() was never called")
            C = C / self._count
        return C

    def all_reduce_(self, group=None) -> CovarianceAccumulator:
        """Sum the matrix and the token count over the ranks of ``group`` (torch.distributed), in place.

        Every rank must call it. The master is fp64 (gloo and NCCL reduce it exactly as
        doubles); afterwards every rank holds the totals. Returns ``self``.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce_ needs torch.distributed to be initialised (init_process_group)")
        count = torch.tensor([self._count], dtype=torch.float64, device=self.device)
        dist.all_reduce(self._master, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
        self._count = int(round(count.item()))
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """``{"sum": [dim, dim] fp64 upper triangle, "count": int64 scalar}``; all tensors (safetensors-ready)."""
        return {"sum": self._master.detach().cpu().clone(), "count": torch.tensor(self._count, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Resume from :meth:`state_dict`: the next updates add to the restored sum and count."""
        if not isinstance(state, dict) or "sum" not in state or "count" not in state:
            raise ValueError("state must be a dict with keys 'sum' and 'count' (from CovarianceAccumulator.state_dict)")
        total, count = state["sum"], state["count"]
        if not isinstance(total, Tensor) or tuple(total.shape) != (self.dim, self.dim):
            shape = tuple(total.shape) if isinstance(total, Tensor) else type(total).__name__
            raise ValueError(f"state['sum'] must be a [{self.dim}, {self.dim}] tensor, got {shape}")
        count = int(count.item() if isinstance(count, Tensor) else count)
        if count < 0:
            raise ValueError(f"state['count'] must be >= 0, got {count}")
        self._master.copy_(total.to(torch.float64).triu())
        self._count = count

    def __repr__(self) -> str:
        return f"CovarianceAccumulator(dim={self.dim}, count={self._count}, device={self.device})"
