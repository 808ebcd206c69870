"""Fixed-rank matrices ``X = B A`` as a quotient of full-rank factor pairs by GL(r).

- point: ``(B, A)`` with ``B`` of shape ``(..., m, r)`` and ``A`` of shape ``(..., r, n)``, both of rank ``r``;
  the pairs ``(B M, M^{-1} A)``, M in GL(r), represent the same matrix;
- Euclidean gradient: the factor gradients ``(E_B, E_A)`` (for ``f(B A) = l(X)``: ``E_B = Gamma A^T``,
  ``E_A = B^T Gamma``); tangent vectors ``(xi_B, xi_A)``, two blocks;
- metric ``tr(S_A xi_B^T eta_B) + tr(S_B xi_A eta_A^T)`` with ``S_A = A A^T``, ``S_B = B^T B`` (invariant under
  the gauge); with ``A^T = Q_A R_A`` and ``B = Q_B R_B``:
  ``H_B = E_B R_A^{-1}``, ``H_A = R_B^{-T} E_A``, ``xi_B = Z_B R_A^{-T}``, ``xi_A = R_B^{-1} Z_A``; spectral:
  ``xi_B = polar(E_B S_A^{-1/2}) S_A^{-1/2}``, ``xi_A = S_B^{-1/2} polar(S_B^{-1/2} E_A)``;
- cost ``O((m + n) r^2 + r^3)``: no ``m x n`` matrix is ever formed;
- gauge invariance: at ``(B M, M^{-1} A)`` with gradients ``(E_B M^{-T}, M^T E_A)`` the direction is
  ``(xi_B M, M^{-1} xi_A)``, so the step ``(B - t xi_B)(A - t xi_A)`` is the same matrix for every M.

``factorization="qr"`` (default) takes the triangular factors from thin QR of ``B`` and ``A^T`` (stable);
``factorization="gram"`` from Cholesky of the ``r x r`` Grams (cheaper, squares the condition number).
"""

from __future__ import annotations

import torch

from .base import Blocks, MetricOperator

_FACTORIZATIONS = ("qr", "gram")

RANK_HINT = (
    "both factors must have full rank r. A LoRA adapter started with B = 0 is not a fixed-rank point: "
    "start from full-rank factors and move their product into the frozen base weight "
    "(imuon_manopt.optim.full_rank_lora_init_ does this without changing the model's function)"
)


def _upper_factor(f: torch.Tensor, how: str, name: str) -> torch.Tensor:
    """Upper-triangular ``R`` (r x r) with ``R^T R = f^T f`` for a tall ``f`` of shape (..., k, r)."""
    if how == "qr":
        r = torch.linalg.qr(f, mode="r")[1]
        diag = r.diagonal(dim1=-2, dim2=-1).abs()
        scale = diag.amax(-1, keepdim=True)
        tol = torch.finfo(f.dtype).eps * max(f.shape[-2:]) * 10
        bad = (diag <= tol * scale).any() | (scale == 0).any() | ~torch.isfinite(diag).all()
    else:
        chol, info = torch.linalg.cholesky_ex(f.mT @ f)
        r = chol.mT
        bad = (info != 0).any()
    if bool(bad):
        raise ValueError(f"fixed-rank factor {name} is rank-deficient; {RANK_HINT}")
    return r


class FixedRank(MetricOperator):
    """Invariant geometry of factor pairs ``(B, A)`` representing rank-r matrices ``B A``."""

    structure = ("general", "general")

    def __init__(self, factorization: str = "qr") -> None:
        if factorization not in _FACTORIZATIONS:
            raise ValueError(
                f"unknown factorization {factorization!r}; expected one of {_FACTORIZATIONS}"
            )
        self.factorization = factorization

    def at(self, x):
        b, a = x
        if b.shape[-1] != a.shape[-2] or b.shape[:-2] != a.shape[:-2]:
            raise ValueError(
                f"factor shapes do not chain: B {tuple(b.shape)} and A {tuple(a.shape)}; expected B of shape "
                "(..., m, r) and A of shape (..., r, n)"
            )
        r = b.shape[-1]
        if b.shape[-2] < r or a.shape[-1] < r:
            raise ValueError(
                f"rank r = {r} exceeds a dimension: B {tuple(b.shape)}, A {tuple(a.shape)}; {RANK_HINT}"
            )
        return _upper_factor(b, self.factorization, "B"), _upper_factor(a.mT, self.factorization, "A")

    def project(self, state, egrad) -> Blocks:
        e_b, e_a = egrad
        return e_b, e_a

    def whiten(self, state, blocks: Blocks) -> Blocks:
        r_b, r_a = state
        e_b, e_a = blocks
        h_b = torch.linalg.solve_triangular(r_a, e_b, upper=True, left=False)  # E_B R_A^{-1}
        h_a = torch.linalg.solve_triangular(r_b.mT, e_a, upper=False)  # R_B^{-T} E_A
        return h_b, h_a

    def unwhiten(self, state, blocks: Blocks) -> Blocks:
        r_b, r_a = state
        z_b, z_a = blocks
        xi_b = torch.linalg.solve_triangular(r_a.mT, z_b, upper=False, left=False)  # Z_B R_A^{-T}
        xi_a = torch.linalg.solve_triangular(r_b, z_a, upper=True)  # R_B^{-1} Z_A
        return xi_b, xi_a

    def tangent(self, state, blocks: Blocks):
        return tuple(blocks)

    def __repr__(self) -> str:
        return f"FixedRank(factorization={self.factorization!r})"
