"""Euclidean space ``R^{m x n}`` with the Frobenius metric: the iMuon direction is Muon's.

- point / gradient / direction: ``(..., m, n)``; a 1-D array is treated as a column ``(n, 1)`` and a 0-D array as
  ``1 x 1`` (every unitarily invariant norm of a vector is a multiple of its 2-norm);
- metric ``G = I``: one block, ``H = E``, ``xi = lmo(E)`` (spectral: ``polar(E)``).
"""

from __future__ import annotations

import torch

from .base import Blocks, MetricOperator


class Euclidean(MetricOperator):
    """Flat matrix space; the spectral direction is ``polar(E)`` (Muon)."""

    structure = ("general",)
    open_in_ambient = True
    supports_numpy = True

    def project(self, state: torch.Tensor, egrad: torch.Tensor) -> Blocks:
        if egrad.ndim == 0:
            return (egrad.reshape(1, 1),)
        if egrad.ndim == 1:
            return (egrad[..., None],)
        return (egrad,)

    def whiten(self, state: torch.Tensor, blocks: Blocks) -> Blocks:
        return blocks

    def unwhiten(self, state: torch.Tensor, blocks: Blocks) -> Blocks:
        return blocks

    def tangent(self, state: torch.Tensor, blocks: Blocks) -> torch.Tensor:
        return blocks[0].reshape(state.shape)
