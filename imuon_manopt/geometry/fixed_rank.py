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
``factorization="gram"`` from Cholesky of the ``r x r`` Grams (cheaper, squares the condition number);
``factorization="balanced"`` is for points already in balanced SVD form, ``B = U diag(s)^{1/2}`` and
``A = diag(s)^{1/2} V^T`` with orthonormal ``U``, ``V`` (Pymanopt's ``FixedRankEmbedded`` points ``(u, s, vt)``): then
``B^T B = A A^T = diag(s)``, the triangular factors are ``diag(s)^{1/2}`` (the column norms of ``B``, row norms of
``A``), and whitening and un-whitening are divisions by them (spec §2: ``H_B = Gamma V``, ``H_A = U^T Gamma``). The
caller guarantees the form; nothing checks the orthogonality.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Blocks, MetricOperator

_FACTORIZATIONS = ("qr", "gram", "balanced")

RANK_HINT = (
    "both factors must have full rank r. A LoRA adapter started with B = 0 is not a fixed-rank point: "
    "start from full-rank factors and move their product into the frozen base weight "
    "without changing the model's function: imuon_manopt.optim.full_rank_lora_model_init_(model) for a PEFT "
    "model (prepare_lora_(model) also returns IMuon's params and pairs), full_rank_lora_init_ for one layer"
)


def _upper_factor(
    f: torch.Tensor, how: str, name: str, *, check: bool = True, with_q: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(Q, R)`` with ``R`` upper triangular (r x r), ``R^T R = f^T f``, for a tall ``f`` of shape (..., k, r).

    ``Q`` (``f = Q R``) is returned only with ``with_q`` (``how == "qr"``), else ``None``. With ``check`` a
    rank-deficient or non-finite ``f`` raises a ``ValueError`` (one host synchronization); without it the
    triangular solves downstream produce non-finite values that the caller must detect.
    """
    q = None
    if isinstance(f, np.ndarray):  # the numpy path (FixedRank("qr") only: supports_numpy)
        if with_q:
            q, r = np.linalg.qr(f)
        else:
            r = np.linalg.qr(f, mode="r")
        if not check:
            return q, r
        diag = np.abs(np.diagonal(r, axis1=-2, axis2=-1))
        tol = np.finfo(f.dtype).eps * max(f.shape[-2:]) * 10
        bad = not bool((diag > diag.max(-1, keepdims=True) * tol).all())
    elif how == "qr":
        if with_q:
            q, r = torch.linalg.qr(f)
        else:
            r = torch.linalg.qr(f, mode="r")[1]
        if not check:
            return q, r
        diag = r.diagonal(dim1=-2, dim2=-1).abs()
        tol = torch.finfo(f.dtype).eps * max(f.shape[-2:]) * 10
        # one comparison covers every failure: a zero or NaN diagonal fails "diag > tol * max" and an
        # infinite one makes the bound infinite, which nothing exceeds
        bad = not bool((diag > diag.amax(-1, keepdim=True) * tol).all())
    else:
        chol, info = torch.linalg.cholesky_ex(f.mT @ f)
        r = chol.mT
        if not check:
            return q, r
        bad = bool((info != 0).any())
        if bad and bool(torch.isfinite(f).all()):  # a huge factor overflows f^T f: factor the Gram of f / 2^k
            scale = torch.ldexp(torch.ones((), dtype=f.dtype, device=f.device), torch.frexp(f.abs().amax()).exponent)
            chol, info = torch.linalg.cholesky_ex((f / scale).mT @ (f / scale))
            r, bad = chol.mT * scale, bool((info != 0).any())
    if bool(bad):
        raise ValueError(f"fixed-rank factor {name} is rank-deficient; {RANK_HINT}")
    return q, r


def _solve_triangular(a: torch.Tensor, b: torch.Tensor, *, upper: bool, left: bool = True) -> torch.Tensor:
    """``a^{-1} b`` (``left``) or ``b a^{-1}`` for a triangular ``a``: ``torch.linalg.solve_triangular``, or for numpy
    arrays ``numpy.linalg.solve`` (numpy has no triangular solver; on a triangular matrix the LU factorization is
    the matrix itself up to pivoting, so the result is the substitution's to rounding)."""
    if isinstance(a, np.ndarray):
        return np.linalg.solve(a, b) if left else np.linalg.solve(a.mT, b.mT).mT
    r = a.shape[-1]
    long = b.shape[-1] if left else b.shape[-2]
    if r <= _INVERSE_MAX_RANK and long >= 4 * r:
        # a thin factor's r x r triangle: its inverse (r substitutions) times the long block is one batched matmul,
        # where the solver would first copy the long block into LAPACK's column-major layout and back (2-4x slower
        # for LoRA shapes on a CPU); the inverse of a triangular matrix is as accurate as the substitution
        # (Higham, ch. 8), the product adds one rounding per entry
        eye = torch.eye(r, dtype=a.dtype, device=a.device).expand(a.shape)
        inv = torch.linalg.solve_triangular(a, eye, upper=upper)
        return inv @ b if left else b @ inv
    return torch.linalg.solve_triangular(a, b, upper=upper, left=left)


#: Largest rank whose triangular solves against long blocks go through the explicit inverse.
_INVERSE_MAX_RANK = 64


def _check_chain(b: torch.Tensor, a: torch.Tensor) -> None:
    if b.shape[-1] != a.shape[-2] or b.shape[:-2] != a.shape[:-2]:
        raise ValueError(
            f"factor shapes do not chain: B {tuple(b.shape)} and A {tuple(a.shape)}; expected B of shape "
            "(..., m, r) and A of shape (..., r, n)"
        )
    r = b.shape[-1]
    if r == 0:
        raise ValueError(f"rank r = 0 (B {tuple(b.shape)}, A {tuple(a.shape)}): a fixed-rank point needs r >= 1")
    if b.shape[-2] < r or a.shape[-1] < r:
        raise ValueError(f"rank r = {r} exceeds a dimension: B {tuple(b.shape)}, A {tuple(a.shape)}; {RANK_HINT}")


def _balanced_roots(b: torch.Tensor, a: torch.Tensor, *, check: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_B, r_A)``: the column norms of ``B`` and the row norms of ``A`` (..., r), the diagonal triangular factors
    of balanced factors; with ``check`` a numerically rank-deficient pair raises a ``ValueError``."""
    if isinstance(b, np.ndarray):
        r_b, r_a = np.sqrt((b * b).sum(axis=-2)), np.sqrt((a * a).sum(axis=-1))
    else:
        r_b, r_a = torch.linalg.vector_norm(b, dim=-2), torch.linalg.vector_norm(a, dim=-1)
    if check:
        tol = float(_finfo_eps(b)) * max(b.shape[-2], a.shape[-1]) * 10
        for name, r in (("B", r_b), ("A", r_a)):
            r_min, r_max = float(r.min()), float(r.max())
            if not (r_max < float("inf") and r_min > tol * r_max):
                raise ValueError(f"fixed-rank factor {name} is rank-deficient; {RANK_HINT}")
    return r_b, r_a


def _finfo_eps(t: torch.Tensor) -> float:
    return np.finfo(t.dtype).eps if isinstance(t, np.ndarray) else torch.finfo(t.dtype).eps


class FixedRank(MetricOperator):
    """Invariant geometry of factor pairs ``(B, A)`` representing rank-r matrices ``B A``."""

    structure = ("general", "general")

    def __init__(self, factorization: str = "qr", *, check: bool = True) -> None:
        if factorization not in _FACTORIZATIONS:
            raise ValueError(f"unknown factorization {factorization!r}; expected one of {_FACTORIZATIONS}")
        self.factorization = factorization
        self.supports_numpy = factorization in ("qr", "balanced")
        #: raise on a rank-deficient factor in ``at`` (one host synchronization); ``False`` leaves the
        #: detection (non-finite directions) to the caller, e.g. an optimizer that avoids host syncs.
        self.check = check

    def at(self, x):
        b, a = x
        _check_chain(b, a)
        if self.factorization == "balanced":
            return _balanced_roots(b, a, check=self.check)
        _, r_b = _upper_factor(b, self.factorization, "B", check=self.check)
        _, r_a = _upper_factor(a.mT, self.factorization, "A", check=self.check)
        return r_b, r_a

    def project(self, state, egrad) -> Blocks:
        e_b, e_a = egrad
        return e_b, e_a

    def whiten(self, state, blocks: Blocks) -> Blocks:
        r_b, r_a = state
        e_b, e_a = blocks
        if self.factorization == "balanced":  # R_A = R_B = diag(r): E_B R_A^{-1}, R_B^{-T} E_A
            return e_b / r_a[..., None, :], e_a / r_b[..., :, None]
        h_b = _solve_triangular(r_a, e_b, upper=True, left=False)  # E_B R_A^{-1}
        h_a = _solve_triangular(r_b.mT, e_a, upper=False)  # R_B^{-T} E_A
        return h_b, h_a

    def unwhiten(self, state, blocks: Blocks) -> Blocks:
        r_b, r_a = state
        z_b, z_a = blocks
        if self.factorization == "balanced":
            return z_b / r_a[..., None, :], z_a / r_b[..., :, None]
        xi_b = _solve_triangular(r_a.mT, z_b, upper=False, left=False)  # Z_B R_A^{-T}
        xi_a = _solve_triangular(r_b, z_a, upper=True)  # R_B^{-1} Z_A
        return xi_b, xi_a

    def tangent(self, state, blocks: Blocks):
        return tuple(blocks)

    def flat(self, state, v):
        """``(v_B S_A, S_B v_A)`` with ``S_A = R_A^T R_A = A A^T`` and ``S_B = R_B^T R_B = B^T B``."""
        r_b, r_a = state
        v_b, v_a = v
        if self.factorization == "balanced":
            return v_b * (r_a * r_a)[..., None, :], (r_b * r_b)[..., :, None] * v_a
        return (v_b @ r_a.mT) @ r_a, r_b.mT @ (r_b @ v_a)

    def captured(self, state, egrad, xi):
        """The part of the factor gradients (or momenta) ``(E_B, E_A)`` that a low-rank step ``xi`` used, for error
        feedback: with the whitened step ``(Z_B, Z_A) = (xi_B R_A^T, R_B xi_A)`` of a Ky Fan LMO (``Z = U_k V_k^T``
        per block, so ``Z Z^T`` and ``Z^T Z`` are orthogonal projectors), the projections of ``H_B`` on the columns
        of ``Z_B`` and of ``H_A`` on the rows of ``Z_A``, the sides the whitening does not act on, lowered back:
        ``(Z_B (Z_B^T E_B), (E_A Z_A^T) Z_A)``. Shapes as ``egrad``; ``O((m + n) r^2)``."""
        r_b, r_a = state
        xi_b, xi_a = xi
        e_b, e_a = egrad
        z_b = xi_b @ r_a.mT
        z_a = r_b @ xi_a
        return z_b @ (z_b.mT @ e_b), (e_a @ z_a.mT) @ z_a

    def __repr__(self) -> str:
        return f"FixedRank(factorization={self.factorization!r})"


class AmbientFixedRank(MetricOperator):
    """The reference LoRA "ambient momentum" step on factor pairs (spec §3); only O(r)-invariant.

    Same point and gradient representation as :class:`FixedRank`. With ``B = Q_B R_B``, ``A^T = Q_A R_A`` and
    the never-formed ambient matrix ``M = E_B A + B E_A`` (for momentum-combined factor gradients ``E_B``,
    ``E_A``): ``H_B = M Q_A = E_B R_A^T + B (E_A Q_A)`` and ``H_A = Q_B^T M = (Q_B^T E_B) A + R_B E_A`` (shapes
    ``(..., m, r)`` and ``(..., r, n)``), then ``xi_B = lmo(H_B) R_A^{-T}`` and ``xi_A = R_B^{-1} lmo(H_A)``.
    For true factor gradients of ``f(B A) = l(X)`` (``E_B = Gamma A^T``, ``E_A = B^T Gamma``) this is not the
    invariant direction of :class:`FixedRank`: it whitens ``Gamma P_A + P_B Gamma`` instead of each block, which
    is what the reference LLM code does. Offered to reproduce LoRA results; :class:`FixedRank` is the default.
    """

    structure = ("general", "general")

    def __init__(self, *, check: bool = True) -> None:
        self.check = check

    def at(self, x):
        b, a = x
        _check_chain(b, a)
        q_b, r_b = _upper_factor(b, "qr", "B", check=self.check, with_q=True)
        q_a, r_a = _upper_factor(a.mT, "qr", "A", check=self.check, with_q=True)
        return b, a, q_b, r_b, q_a, r_a

    def project(self, state, egrad) -> Blocks:
        b, a, q_b, r_b, q_a, r_a = state
        e_b, e_a = egrad
        return e_b @ r_a.mT + b @ (e_a @ q_a), (q_b.mT @ e_b) @ a + r_b @ e_a

    def whiten(self, state, blocks: Blocks) -> Blocks:
        return blocks

    def unwhiten(self, state, blocks: Blocks) -> Blocks:
        *_, r_b, _, r_a = state
        z_b, z_a = blocks
        xi_b = torch.linalg.solve_triangular(r_a.mT, z_b, upper=False, left=False)
        xi_a = torch.linalg.solve_triangular(r_b, z_a, upper=True)
        return xi_b, xi_a

    def tangent(self, state, blocks: Blocks):
        return tuple(blocks)
