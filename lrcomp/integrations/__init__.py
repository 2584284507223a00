"""Integrations of lrcomp with training frameworks (imported on use: each needs its optional dependency).

- :mod:`lrcomp.integrations.trainer`: Hugging Face ``transformers.Trainer``: :class:`LowRankCallback`,
  :class:`LowRankTrainer` and :func:`make_trainer`.
"""

from __future__ import annotations

try:  # registers quant_method "lrcomp" with transformers, lazily (see lrcomp.integrations.hf); cheap without it
    from lrcomp.integrations import hf  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["LowRankCallback", "LowRankTrainer", "make_trainer"]


def __getattr__(name: str):
    # transformers is optional and heavy: import it only when one of these names is used.
    if name in __all__:
        from lrcomp.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'lrcomp.integrations' has no attribute {name!r}")
