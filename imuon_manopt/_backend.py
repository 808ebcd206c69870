"""The core's array types: torch tensors, and numpy arrays for small host computations (private).

The core's kernels (the LMO kernel, the exact polar / eigh paths, the built-in geometries) are written once and run
on either array type: arithmetic, ``@`` and ``.mT`` are shared by both libraries, and the few calls whose spelling
differs go through the helpers here (:func:`namespace` gives the module whose functions share a name and signature in
both, e.g. ``where``, ``linalg.svd``, ``linalg.eigh``, ``isfinite``). Which type a computation uses is decided by
:func:`native_numpy`: numpy inputs to :func:`imuon_manopt.direction.intrinsic_direction` stay numpy when the geometry,
the norm and the solver all have a numpy path and the input is small (there torch's fixed cost per operation, several
microseconds, dominates; numpy's is below one); everything else computes in torch as before. numpy arrays crossing
into torch are wrapped zero-copy with :func:`torch.from_numpy` (a copy only for negative strides), and results go back
with ``Tensor.numpy()``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "to_torch",
    "from_torch",
    "namespace",
    "is_numpy",
    "finfo",
    "astype",
    "numel",
    "NUMPY_MAX_ELEMENTS",
    "native_numpy",
]

#: Inputs (all leaves together) up to this many elements stay numpy in the core. Measured on the 2-core Xeon, one
#: thread, a Grassmann direction per call (CPU time; numpy / torch): 1000 x 10 0.28 / 0.36 ms, 1000 x 100 6.9 / 6.7
#: ms, 4000 x 32 3.6 / 3.3 ms, 300 x 300 17.1 / 17.6 ms: below ~1e5 elements numpy's ~1 us per operation (torch's:
#: 3-8 us) wins, around 1e5 the factorizations decide and the two are within 10%; above, torch's multi-threaded
#: kernels can win.
NUMPY_MAX_ELEMENTS = 2**17


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


def is_numpy(x: Any) -> bool:
    """True for a numpy array (the core's numpy path), False for a torch tensor."""
    return isinstance(x, np.ndarray)


def namespace(x: Any) -> Any:
    """``numpy`` for a numpy array, else ``torch``: the module for calls spelled alike in both (``where``,
    ``zeros_like``, ``ones_like``, ``full_like``, ``isfinite``, ``sign``, ``linalg.svd(..., full_matrices=False)``,
    ``linalg.eigh``, ``linalg.vector_norm(..., axis=, keepdims=)``)."""
    return np if isinstance(x, np.ndarray) else torch


_NP_FINFO = {np.dtype(t): np.finfo(t) for t in (np.float16, np.float32, np.float64)}


def finfo(dtype: Any) -> Any:
    """``finfo`` of a numpy or torch floating dtype (``eps``, ``tiny``, ``max``)."""
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype)
    info = _NP_FINFO.get(dtype)
    return info if info is not None else np.finfo(dtype)


def astype(x: Any, dtype: Any) -> Any:
    """``x`` in ``dtype`` (no copy when it already is): ``Tensor.to`` or ``ndarray.astype``."""
    if isinstance(x, (np.ndarray, np.generic)):  # (numpy reductions over a single matrix give scalars)
        return x if x.dtype == dtype else x.astype(dtype)
    return x.to(dtype)


def numel(x: Any) -> int:
    """Number of elements of a tensor or array."""
    return x.size if isinstance(x, np.ndarray) else x.numel()


def native_numpy(leaves: list[Any]) -> bool:
    """Whether a computation on these leaves runs in numpy: every leaf is a real floating numpy array of float32 or
    float64 and together they hold at most :data:`NUMPY_MAX_ELEMENTS` elements."""
    total = 0
    for leaf in leaves:
        if not isinstance(leaf, np.ndarray) or leaf.dtype not in (np.float32, np.float64):
            return False
        total += leaf.size
    return total <= NUMPY_MAX_ELEMENTS
