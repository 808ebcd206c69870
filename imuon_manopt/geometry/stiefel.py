"""Stiefel manifold ``St(n, p) = {X in R^{n x p} : X^T X = I_p}``, embedded or canonical metric.

- point ``X``: ``(..., n, p)``;
- tangent vectors ``xi = X Omega + K`` with ``Omega`` (p x p) skew and ``X^T K = 0``: two blocks ``(Omega, K)``;
- covector of a Euclidean gradient ``E``: ``Omega_E = skew(X^T E)``, ``K_E = (I - X X^T) E``;
- metrics: embedded ``||xi||^2 = ||Omega||^2 + ||K||^2`` (Pymanopt's ``Stiefel``, geoopt's
  ``EuclideanStiefel``); canonical ``||xi||^2 = 1/2 ||Omega||^2 + ||K||^2`` (geoopt's ``CanonicalStiefel``,
  which ``geoopt.Stiefel()`` returns);
- rank bound: ``K`` has rank at most ``n - p``; when ``n < 2p`` the LMO keeps at most ``n - p`` directions of
  ``K`` (the others are rounding noise, and mapping them to 1 would break tangency);
- lowering map (flat): embedded ``v``; canonical ``v - X X^T v / 2``;
- spectral direction: embedded ``X polar(Omega_E) + polar(K_E)``, canonical
  ``sqrt(2) X polar(Omega_E) + polar(K_E)``. The polar factor of a skew matrix is skew, so the direction is tangent.
"""

from __future__ import annotations

import math

import torch

from .base import Blocks, MetricOperator, drop_rounding, skew

_METRICS = ("embedded", "canonical")


class Stiefel(MetricOperator):
    """Orthonormal frames with the embedded (default) or the canonical metric."""

    structure = ("skew", "general")
    supports_numpy = True

    def __init__(self, metric: str = "embedded") -> None:
        if metric not in _METRICS:
            raise ValueError(f"unknown Stiefel metric {metric!r}; expected one of {_METRICS}")
        self.metric = metric
        # G on the Omega block is 1 (embedded) or 1/2 (canonical): H_Omega = G^{-1/2} Omega_E, xi = G^{-1/2} Z.
        self._omega_scale = 1.0 if metric == "embedded" else math.sqrt(2.0)

    def project(self, state: torch.Tensor, egrad: torch.Tensor) -> Blocks:
        x = state
        xte = x.mT @ egrad
        # skew(X^T E) is exactly zero for costs of X X^T (X^T E symmetric), (I - X X^T) E at a critical point: their
        # rounding noise is not a direction
        terms = x.shape[-2] + x.shape[-1]
        return drop_rounding(skew(xte), xte, terms), drop_rounding(egrad - x @ xte, egrad, terms)

    def whiten(self, state: torch.Tensor, blocks: Blocks) -> Blocks:
        omega, k = blocks
        return (omega * self._omega_scale if self._omega_scale != 1.0 else omega), k

    unwhiten = whiten  # G^{-1/2} acts the same way on covectors and on LMO outputs here

    def block_ranks(self, state: torch.Tensor) -> tuple[int | None, ...]:
        """``K = (I - X X^T) E`` has rank at most ``n - p`` (binding when ``n < 2p``)."""
        n, p = state.shape[-2:]
        return None, (n - p if n - p < p else None)

    def tangent(self, state: torch.Tensor, blocks: Blocks) -> torch.Tensor:
        omega, k = blocks
        return state @ omega + k

    def flat(self, state: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Embedded: ``v``. Canonical ``g(v, w) = tr(v^T (I - X X^T / 2) w)``: ``v - X (X^T v) / 2``."""
        if self.metric == "embedded":
            return v
        return v - 0.5 * (state @ (state.mT @ v))

    def __repr__(self) -> str:
        return f"Stiefel(metric={self.metric!r})"
