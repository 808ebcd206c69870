"""Stacking the tensors of one group into batched inputs, without a copy where they already are the rows of one
tensor (e.g. last step's outputs of the same group)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Inputs", "Outputs", "stack"]

Inputs = Sequence[tuple[torch.Tensor, ...]]
Outputs = list[tuple[torch.Tensor, ...]]


def _unbound_from(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor ``ts`` came from by ``unbind(0)``, in order (so stacking them again is a no-op), else None."""
    base = ts[0]._base
    if base is None or base.shape[0] != len(ts) or base.shape[1:] != ts[0].shape:
        return None
    step = base.stride(0)
    for k, t in enumerate(ts):
        offset = base.storage_offset() + k * step
        if t._base is not base or t.storage_offset() != offset or t.stride() != base.stride()[1:]:
            return None
    return base


def stack(inputs: Inputs, i: int, dtype: torch.dtype) -> torch.Tensor:
    """Input ``i`` of every item, stacked along a new leading dim, in ``dtype`` (no copy when the tensors are the
    rows of one tensor, e.g. last step's buffers)."""
    ts = [t[i] for t in inputs]
    if len(ts) == 1:
        return ts[0].unsqueeze(0).to(dtype)
    base = _unbound_from(ts)
    return (torch.stack(ts) if base is None else base).to(dtype)
