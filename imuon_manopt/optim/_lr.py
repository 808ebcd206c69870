"""Learning-rate rules of :class:`~imuon_manopt.optim.IMuon`: the shape-based scaling of a step (``adjust_lr_fn``,
by name: the built-in rules and those registered with :func:`register_adjust_lr_fn`) and the fallback's learning
rate, which follows the group's."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["AdjustLrFn", "adjust_lr_names", "adjusted_lr", "fallback_lr", "register_adjust_lr_fn"]

AdjustLrFn = Callable[[float, tuple[int, int]], float]


def _original(lr: float, shape: tuple[int, int]) -> float:
    a, b = shape
    return lr * math.sqrt(max(1.0, a / b))


def _match_rms_adamw(lr: float, shape: tuple[int, int]) -> float:
    a, b = shape
    return lr * 0.2 * math.sqrt(max(a, b))


_RULES: dict[str, AdjustLrFn] = {"original": _original, "match_rms_adamw": _match_rms_adamw}
_BUILTIN = tuple(_RULES)


def register_adjust_lr_fn(name: str, fn: AdjustLrFn) -> None:
    """Make ``adjust_lr_fn=name`` scale a step's learning rate by ``fn(lr, (a, b)) -> lr``.

    ``(a, b)`` is the matrix shape the step lives in (see :class:`~imuon_manopt.optim.IMuon`). Param groups store the
    name, so ``state_dict()`` pickles; register the same name before loading a state dict that uses it. The built-in
    names ``"original"`` and ``"match_rms_adamw"`` cannot be replaced; registering a name again replaces its rule.

    Raises:
        TypeError: ``name`` is not a string or ``fn`` is not callable.
        ValueError: ``name`` is empty or a built-in name.
    """
    if not isinstance(name, str):
        raise TypeError(f"register_adjust_lr_fn: name must be a str, got {type(name).__name__}")
    if not name or name in _BUILTIN:
        raise ValueError(f"register_adjust_lr_fn: {name!r} is empty or a built-in rule {_BUILTIN}; choose another name")
    if not callable(fn):
        raise TypeError(f"register_adjust_lr_fn: fn must be callable (lr, (a, b)) -> lr, got {fn!r}")
    _RULES[name] = fn


def adjust_lr_names() -> tuple[str, ...]:
    """The names ``adjust_lr_fn`` accepts: the built-in rules, then the registered ones."""
    return tuple(_RULES)


def adjusted_lr(lr: float, fn: str | None, shape: tuple[int, int]) -> float:
    """Shape-based learning-rate scaling by rule name (``torch.optim.Muon``'s conventions, or a registered rule)."""
    if fn is None:
        return lr
    rule = _RULES.get(fn)
    if rule is None:
        raise ValueError(
            f"adjust_lr_fn={fn!r} is not registered (a state dict from a process that registered it?): call "
            f"imuon_manopt.optim.register_adjust_lr_fn({fn!r}, fn) first"
        )
    return float(rule(lr, shape))


def fallback_lr(group: dict[str, Any], flr: float | None) -> float:
    """The fallback's learning rate ``flr`` (given at the group's initial ``lr``) follows later changes of ``lr``
    (schedulers) proportionally; ``None``: the group's ``lr``."""
    lr = float(group["lr"])
    if flr is None:
        return lr
    lr0 = group.get("lr_at_init", lr)
    return flr * (lr / lr0) if lr0 > 0 else flr
