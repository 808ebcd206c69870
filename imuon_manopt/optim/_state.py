"""Optimizer state of :class:`~imuon_manopt.optim.IMuon`: the dtype it lives in and its step counts."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LOW_PRECISION", "host_step", "work_dtype"]

LOW_PRECISION = (torch.float16, torch.bfloat16)


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype updates and optimizer state live in: at least float32 (half types overflow, e.g. ``g^2``)."""
    return torch.float32 if t.dtype in LOW_PRECISION else t.dtype


def host_step(value: Any) -> int:
    """A stored step count (an int, or a tensor written in device mode) as an int."""
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)
