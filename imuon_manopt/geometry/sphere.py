"""Unit spheres ``{x in R^n : ||x||_2 = 1}``, one per row of ``(..., n)``.

- tangent space ``{u : <x, u> = 0}``, embedded metric; one block, the column ``(n, 1)``;
- every unitarily invariant norm of a vector is a multiple of ``||.||_2``, so every LMO gives
  ``xi = P_x(E) / ||P_x(E)||`` up to the budget (and the block rule across rows of a batch).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Blocks, MetricOperator, drop_rounding


class Sphere(MetricOperator):
    """Row-wise unit spheres (geoopt's convention: the last dimension is the vector)."""

    structure = ("general",)
    supports_numpy = True

    def project(self, state: torch.Tensor, egrad: torch.Tensor) -> Blocks:
        x = state
        # <x, E> per row (one numpy vector: a dot product, one operation instead of two)
        radial = x @ egrad if x.ndim == 1 and isinstance(x, np.ndarray) else (x * egrad).sum(-1)[..., None]
        # a gradient along x (a critical point) projects to rounding noise, which is not a direction
        return (drop_rounding((egrad - radial * x)[..., None], egrad[..., None], x.shape[-1]),)

    def whiten(self, state: torch.Tensor, blocks: Blocks) -> Blocks:
        return blocks

    def unwhiten(self, state: torch.Tensor, blocks: Blocks) -> Blocks:
        return blocks

    def tangent(self, state: torch.Tensor, blocks: Blocks) -> torch.Tensor:
        return blocks[0][..., 0]
