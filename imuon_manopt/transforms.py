"""Input transforms before the LMO: the Muon variants that are not LMOs of a norm (muon-family.md §3-§5).

A map ``E -> Z`` that is the LMO of some norm has a symmetric Jacobian in ``E`` and is positively 0-homogeneous.
MuonEq's equilibration, ROOT's clipping and MiMuon's switch are not: their Jacobians are asymmetric (MuonEq-R 0.21,
MuonEq-RC 0.43, ROOT 0.33 relative) or the map is discontinuous. They enter iMuon only as an explicit transform
``h`` of the whitened gradient ``H`` before the LMO, ``Z = LMO(h(H))`` with the un-whitening unchanged, on plain
matrices (where ``H`` is the momentum itself). On LoRA pairs they break the gauge invariance (ROOT's clip by 10-15 %
of the step, MuonEq along the rank dimension) and on Stiefel / SPD blocks tangency or equivariance, so the
optimizer refuses them there.

Spec (``input_transform=``): ``None``, ``"muoneq_row"``, ``"muoneq_col"``, ``"muoneq_rowcol"``, ``("root_clip",
percentile)`` (a fraction in (0, 1); ROOT uses 0.9) or ``("mimuon", threshold)`` (a relative singular gap in [0,
1]). Every function works per matrix over the trailing two dims of ``(..., m, n)`` torch tensors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "INPUT_TRANSFORMS",
    "resolve_input_transform",
    "muoneq",
    "root_clip",
    "relative_gap",
    "transformed_lmo",
]

#: Names of the transforms without a parameter, and of those that take one.
INPUT_TRANSFORMS = ("muoneq_row", "muoneq_col", "muoneq_rowcol")
_WITH_PARAMETER = ("root_clip", "mimuon")
#: MuonEq's epsilon inside the row / column sums (its code's default).
MUONEQ_EPS = 1e-8
#: ROOT's epsilon added to the clipping level (its code's default).
ROOT_EPS = 1e-9

_HINT = f"expected None, one of {INPUT_TRANSFORMS}, ('root_clip', percentile) or ('mimuon', threshold)"


def resolve_input_transform(spec: Any) -> tuple[str, float | None] | None:
    """Validate an ``input_transform`` spec; returns ``None`` or ``(name, parameter)`` (``parameter`` ``None`` for
    MuonEq).

    Raises:
        ValueError: an unknown name or a parameter out of range (the message names the valid forms).
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in INPUT_TRANSFORMS:
            raise ValueError(f"unknown input_transform={spec!r}; {_HINT}")
        return spec, None
    if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and spec[0] in _WITH_PARAMETER):
        raise ValueError(f"invalid input_transform={spec!r}; {_HINT}")
    name, v = spec
    real = isinstance(v, numbers.Real) and not isinstance(v, bool)
    if name == "root_clip" and not (real and 0.0 < float(v) < 1.0):
        raise ValueError(
            f"input_transform=('root_clip', percentile) needs the percentile as a fraction in (0, 1) (ROOT: 0.9, the "
            f"90th percentile of the entries' magnitudes), got {v!r}"
        )
    if name == "mimuon" and not (real and 0.0 <= float(v) <= 1.0):
        raise ValueError(
            f"input_transform=('mimuon', threshold) needs a relative singular gap threshold in [0, 1], got {v!r}"
        )
    return name, float(v)


def muoneq(h: torch.Tensor, mode: str, eps: float = MUONEQ_EPS) -> torch.Tensor:
    """MuonEq's equilibration (Chang et al., arXiv 2603.28254; its code's ``rowcol_scale_exponent = -1/2``):
    with ``r_i = sum_j h_ij^2`` and ``c_j = sum_i h_ij^2`` of the input (stateless), ``"row"``: ``diag(r +
    eps)^(-1/2) H``, ``"col"``: ``H diag(c + eps)^(-1/2)``, ``"rowcol"``: both, from the same ``r`` and ``c``."""
    if mode not in ("row", "col", "rowcol"):
        raise ValueError(f"mode must be 'row', 'col' or 'rowcol', got {mode!r}")
    out = h
    if mode in ("row", "rowcol"):
        out = out * (h * h).sum(dim=-1, keepdim=True).add(eps).rsqrt()
    if mode in ("col", "rowcol"):
        out = out * (h * h).sum(dim=-2, keepdim=True).add(eps).rsqrt()
    return out


def root_clip(h: torch.Tensor, percentile: float, eps: float = ROOT_EPS) -> torch.Tensor:
    """ROOT's outlier suppression (He et al., arXiv 2511.20626): ``eps_q = quantile_q(|H|) + eps`` per matrix and
    ``H - soft_eps_q(H) = clip(H, -eps_q, eps_q)`` (the entries above the level are clipped, the soft-thresholded
    outliers discarded). The quantile is the ``ceil(q N)``-th smallest magnitude (``kthvalue``, as ROOT's code)."""
    flat = h.abs().flatten(-2)
    n = flat.shape[-1]
    kth = min(n, max(1, math.ceil(percentile * n)))
    level = flat.kthvalue(kth, dim=-1).values.add(eps)[..., None, None]
    return torch.maximum(torch.minimum(h, level), -level)


def relative_gap(h: torch.Tensor) -> torch.Tensor:
    """MiMuon's separation measure per matrix: ``min_i (s_i - s_{i+1}) / s_1`` over the nonzero singular values
    (above ``eps * max(m, n) * s_1``; ``inf`` with fewer than two of them, where orthogonalizing is exact),
    shape ``h.shape[:-2]``."""
    s = torch.linalg.svdvals(h.to(torch.float64) if h.dtype == torch.float64 else h.float())
    top = s[..., :1]
    tol = torch.finfo(s.dtype).eps * max(h.shape[-2:])
    nonzero = s > tol * top
    gaps = s[..., :-1] - s[..., 1:]
    valid = nonzero[..., 1:]  # both values of a pair nonzero (sorted: the second decides)
    gaps = torch.where(valid, gaps, torch.full_like(gaps, math.inf))
    safe = torch.where(top > 0, top, torch.ones_like(top))
    return (
        (gaps.amin(dim=-1, keepdim=True) / safe)[..., 0] if gaps.shape[-1] else torch.full_like(top[..., 0], math.inf)
    )


def transformed_lmo(
    h: torch.Tensor, spec: tuple[str, float | None], lmo: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``Z`` for the whitened gradient ``h`` (..., m, n) under a resolved transform ``spec``, with ``lmo`` the
    norm's LMO (batched). MuonEq and ROOT: ``lmo(h(H))``. MiMuon (a step-rule switch, not a transform of ``H``):
    ``lmo(H)`` where :func:`relative_gap` is at least the threshold, else the momentum scaled into the spectral
    ball, ``H / ||H||_2`` (a feasible point of the spectral LMO's ball, so one learning rate serves both branches).
    Returns ``(Z, switched)``: ``switched`` is the per-matrix bool "orthogonalized" for MiMuon, else ``None``."""
    name, v = spec
    if name.startswith("muoneq_"):
        return lmo(muoneq(h, name[len("muoneq_") :])), None
    if name == "root_clip":
        return lmo(root_clip(h, float(v))), None  # type: ignore[arg-type]
    gap = relative_gap(h)
    ortho = gap >= float(v)  # type: ignore[arg-type]
    z = lmo(h)
    s1 = torch.linalg.matrix_norm(h, ord=2, keepdim=True)
    plain = h / torch.where(s1 > 0, s1, torch.ones_like(s1))
    return torch.where(ortho[..., None, None], z, plain), ortho
