"""Grassmann manifold ``Gr(n, p)``: p-dimensional subspaces of ``R^n``, as a quotient of full-rank ``Y``.

- point: a representative ``Y`` of shape ``(..., n, p)``; the subspace is ``span(Y)``;
- horizontal (tangent) vectors: ``xi`` with ``Y^T xi = 0``; one block ``(n, p)``;
- metric ``g_Y(xi, eta) = tr(S^{-1} xi^T eta)`` with ``S = Y^T Y`` (invariant under ``Y -> Y M``, M in GL(p));
- with ``S = L L^T`` (Cholesky): ``H = Pi(E) L``, ``xi = lmo(H) L^T``, ``Pi(E) = E - Y S^{-1} Y^T E``;
  spectral: ``xi = polar(Pi(E) S^{1/2}) S^{1/2}`` (the same direction, any square root of S).
- ``representative="orthonormal"`` (Pymanopt's and geoopt's convention, ``S = I``): ``xi = lmo((I - Y Y^T) E)``.
- rank bound: the block has rank at most ``n - p`` (used by the LMO's rank cut when ``n < 2p``);
- lowering map (flat): ``v S^{-1}`` (``v`` for orthonormal representatives);
- equivariance: at ``Y M`` with gradient ``E M^{-T}`` the direction is ``xi M``.
"""

from __future__ import annotations

import torch

from .base import Blocks, MetricOperator, drop_rounding

_REPRESENTATIVES = ("orthonormal", "general")


class Grassmann(MetricOperator):
    """Subspaces, represented by orthonormal (default) or general full-rank bases."""

    structure = ("general",)

    def __init__(self, representative: str = "orthonormal") -> None:
        if representative not in _REPRESENTATIVES:
            raise ValueError(f"unknown Grassmann representative {representative!r}; expected one of {_REPRESENTATIVES}")
        self.representative = representative
        # the orthonormal representative's operations are products only; the general one factors Y^T Y in torch
        self.supports_numpy = representative == "orthonormal"

    def at(self, x: torch.Tensor):
        if self.representative == "orthonormal":
            return x, None
        gram = x.mT @ x
        chol, info = torch.linalg.cholesky_ex(gram)
        if bool((info != 0).any()):
            if not bool(torch.isfinite(x).all()):
                raise ValueError("Grassmann representative Y has NaN or infinite entries")
            # a huge representative overflows Y^T Y: factor the Gram of Y / 2^k (k from the largest entry)
            scale = torch.ldexp(torch.ones((), dtype=x.dtype), torch.frexp(x.abs().amax()).exponent)
            chol, info = torch.linalg.cholesky_ex((x / scale).mT @ (x / scale))
            chol = chol * scale
        if bool((info != 0).any()):
            raise ValueError(
                "Grassmann representative Y is rank-deficient (Y^T Y is not positive definite); "
                "a point must have p linearly independent columns"
            )
        return x, chol

    def project(self, state, egrad: torch.Tensor) -> Blocks:
        y, chol = state
        yte = y.mT @ egrad
        if chol is None:  # (at a critical point the projection is rounding noise, which is not a direction)
            return (drop_rounding(egrad - y @ yte, egrad, y.shape[-2] + y.shape[-1]),)
        return (egrad - y @ torch.cholesky_solve(yte, chol),)

    def whiten(self, state, blocks: Blocks) -> Blocks:
        _, chol = state
        return blocks if chol is None else (blocks[0] @ chol,)

    def unwhiten(self, state, blocks: Blocks) -> Blocks:
        _, chol = state
        return blocks if chol is None else (blocks[0] @ chol.mT,)

    def block_ranks(self, state) -> tuple[int | None, ...]:
        """``Pi(E)`` (and ``Pi(E) L``) has rank at most ``n - p`` (binding when ``n < 2p``)."""
        n, p = state[0].shape[-2:]
        return (n - p if n - p < p else None,)

    def tangent(self, state, blocks: Blocks) -> torch.Tensor:
        return blocks[0]

    def flat(self, state, v: torch.Tensor) -> torch.Tensor:
        """Orthonormal representative: ``v``; general: ``v S^{-1}`` (the metric is ``tr(S^{-1} v^T w)``)."""
        _, chol = state
        if chol is None:
            return v
        return torch.cholesky_solve(v.mT, chol).mT

    def __repr__(self) -> str:
        return f"Grassmann(representative={self.representative!r})"
