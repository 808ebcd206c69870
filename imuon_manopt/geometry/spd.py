"""Symmetric positive definite matrices with the affine-invariant metric.

- point ``X``: ``(..., n, n)`` symmetric positive definite;
- tangent vectors: symmetric ``(n, n)``; one symmetric block;
- metric ``g_X(xi, eta) = tr(X^{-1} xi X^{-1} eta)``; covector ``sym(E)``;
- lowering map (flat): ``X^{-1} v X^{-1}``;
- with ``X = L L^T`` (Cholesky): ``H = L^T sym(E) L``, ``xi = L lmo(H) L^T``; spectral:
  ``xi = X^{1/2} sign(X^{1/2} sym(E) X^{1/2}) X^{1/2}`` (the same direction for any square root);
- the exponential map ``X^{1/2} expm(-t Z) X^{1/2}`` stays positive definite for every step ``t``;
- congruence invariance: at ``P X P^T`` with gradient ``P^{-T} E P^{-1}`` the direction is ``P xi P^T``;
- an open subset of the symmetric matrices (``open_in_ambient``): a momentum of Euclidean gradients is summed
  as it is. A tangent buffer carried by parallel transport keeps its norm while the Riemannian gradient
  ``X sym(E) X`` of a loss whose Euclidean gradient stays bounded shrinks with ``X``: near the boundary old momentum
  outweighs every new gradient, and the normalized steps (``lr`` in ``log`` of the eigenvalues per step) drive an
  eigenvalue to rounding level once ``lr > -ln(beta)``. The sum of Euclidean gradients keeps old and new
  gradients on one scale, and is congruence-equivariant like each of its terms.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import Blocks, MetricOperator, sym


def _cholesky(a: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(L, ok)`` with ``L L^T = a`` for every matrix when ``ok``; a torch tensor or a numpy array."""
    if isinstance(a, np.ndarray):
        try:
            return np.linalg.cholesky(a), True
        except np.linalg.LinAlgError:
            return a, False
    chol, info = torch.linalg.cholesky_ex(a)
    return chol, not bool((info != 0).any())


def _cholesky_solve(b: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^{-1} b``: ``torch.cholesky_solve``, or two solves with ``L`` for numpy arrays."""
    if isinstance(b, np.ndarray):
        return np.linalg.solve(chol.mT, np.linalg.solve(chol, b))
    return torch.cholesky_solve(b, chol)


class SPD(MetricOperator):
    """Affine-invariant SPD geometry (the spectral LMO is the matrix sign)."""

    structure = ("symmetric",)
    open_in_ambient = True
    supports_numpy = True

    def at(self, x: torch.Tensor) -> torch.Tensor:
        chol, ok = _cholesky(sym(x))
        if not ok:
            if not bool(abs(x).max() < math.inf):  # (NaN compares False)
                raise ValueError("SPD point has NaN or infinite entries")
            # entries near the dtype's largest value can overflow inside the factorization: X = 4^k (X / 4^k)
            exponent = math.frexp(float(abs(x).max()))[1]
            scale = math.ldexp(1.0, exponent + exponent % 2)
            chol, ok = _cholesky(sym(x / scale))
            chol = chol * math.sqrt(scale)
        if not ok:
            raise ValueError(
                "SPD point is not positive definite (its Cholesky factorization failed); "
                "an SPD point must be symmetric with positive eigenvalues"
            )
        return chol

    def project(self, state: torch.Tensor, egrad: torch.Tensor) -> Blocks:
        return (sym(egrad),)

    def whiten(self, state: torch.Tensor, blocks: Blocks) -> Blocks:
        return (sym(state.mT @ blocks[0] @ state),)

    def unwhiten(self, state: torch.Tensor, blocks: Blocks) -> Blocks:
        return (sym(state @ blocks[0] @ state.mT),)

    def flat(self, state: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``X^{-1} v X^{-1}`` (two Cholesky solves with ``X = L L^T``)."""
        c = _cholesky_solve(_cholesky_solve(v, state).mT, state)
        return sym(c)
