"""Learning-rate rules of :class:`~imuon_manopt.optim.IMuon`: the shape-based scaling of a step (``adjust_lr_fn``)
and the fallback's learning rate, which follows the group's."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["AdjustLrFn", "adjusted_lr", "fallback_lr"]

AdjustLrFn = Callable[[float, tuple[int, int]], float]


def adjusted_lr(lr: float, fn: str | AdjustLrFn | None, shape: tuple[int, int]) -> float:
    """Shape-based learning-rate scaling (``torch.optim.Muon``'s conventions, or a callable)."""
    if fn is None:
        return lr
    a, b = shape
    if fn == "original":
        return lr * math.sqrt(max(1.0, a / b))
    if fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(a, b))
    return float(fn(lr, (a, b)))


def fallback_lr(group: dict[str, Any]) -> float:
    """``fallback_lr`` follows later changes of ``lr`` (schedulers) proportionally; default: the group's ``lr``."""
    lr = float(group["lr"])
    flr = group["fallback_lr"]
    if flr is None:
        return lr
    lr0 = group.get("lr_at_init", lr)
    return flr * (lr / lr0) if lr0 > 0 else flr
