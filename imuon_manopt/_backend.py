"""numpy <-> torch conversion at the public entry points (private).

The core computes in torch. numpy arrays are wrapped zero-copy with :func:`torch.from_numpy` (a copy
is made only when the array has negative strides, which torch cannot represent), and results go back
with ``Tensor.numpy()``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["to_torch", "from_torch"]


def to_torch(x: Any) -> tuple[torch.Tensor, bool]:
    """Return ``(tensor, was_numpy)``; numpy arrays are shared, not copied (unless strides are
    negative).

    Raises:
        TypeError: ``x`` is neither a torch tensor nor a numpy array.
    """
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        if any(st < 0 for st in x.strides):
            x = x.copy()
        try:
            return torch.from_numpy(x), True
        except TypeError as err:  # object, string, ... arrays
            raise TypeError(f"numpy arrays of dtype {x.dtype} are not supported: {err}") from None
    raise TypeError(f"expected a torch.Tensor or a numpy.ndarray, got {type(x).__name__}")


def from_torch(t: torch.Tensor, was_numpy: bool) -> Any:
    """The inverse of :func:`to_torch`: a numpy array (on the host) if the input was numpy, else
    ``t``."""
    if was_numpy:
        return t.detach().cpu().numpy()
    return t
