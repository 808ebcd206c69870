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

import torch

from .base import Blocks, MetricOperator, sym


class SPD(MetricOperator):
    """Affine-invariant SPD geometry (the spectral LMO is the matrix sign)."""

    structure = ("symmetric",)
    open_in_ambient = True

    def at(self, x: torch.Tensor) -> torch.Tensor:
        chol, info = torch.linalg.cholesky_ex(sym(x))
        if bool((info != 0).any()):
            if not bool(torch.isfinite(x).all()):
                raise ValueError("SPD point has NaN or infinite entries")
            # entries near the dtype's largest value can overflow inside the factorization: X = 4^k (X / 4^k)
            exponent = torch.frexp(x.abs().amax()).exponent
            scale = torch.ldexp(torch.ones((), dtype=x.dtype), exponent + exponent % 2)
            chol, info = torch.linalg.cholesky_ex(sym(x / scale))
            chol = chol * scale.sqrt()
        if bool((info != 0).any()):
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
        c = torch.cholesky_solve(torch.cholesky_solve(v, state).mT, state)
        return sym(c)
