"""Schedules of the joint methods, as functions of the training progress ``p = t / T`` in [0, 1]."""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "sine", "cubic", "constant")


def check_schedule(name: object, argname: str = "schedule") -> str:
    if name not in SCHEDULES:
        raise ValueError(f"{argname} must be one of {SCHEDULES}, got {name!r}")
    return name


def decay(name: str, p: float) -> float:
    """A weight going from 1 at ``p = 0`` to 0 at ``p >= 1``.

    - linear: ``1 - p``; cosine: ``(1 + cos(pi p)) / 2``;
    - sine: ``1 - sin(pi p / 2)`` (TuneComp's ``alpha_t = 1 - sin(pi t / 2T)``);
    - cubic: ``(1 - p)^3`` (the pruning schedule of Zhu & Gupta 2017, as a remaining fraction);
    - constant: 1 until the end.
    """
    p = min(max(p, 0.0), 1.0)
    if name == "linear":
        return 1.0 - p
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if name == "sine":
        return 1.0 - math.sin(0.5 * math.pi * p)
    if name == "cubic":
        return (1.0 - p) ** 3
    if name == "constant":
        return 1.0 if p < 1.0 else 0.0
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
