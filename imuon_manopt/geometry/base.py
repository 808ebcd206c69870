"""The metric-operator interface: what a manifold (or metric) provides to get iMuon directions.

A geometry describes, at a point ``x``, a parametrization of the tangent (or horizontal) space by a tuple of
matrix *blocks* and a Riemannian metric ``g_x(u, v) = <G_x u, v>`` on those blocks. The iMuon template
(:func:`imuon_manopt.direction.intrinsic_direction`) needs five operations:

``at(x)``
    factorizations at the point, computed once and shared by the other four (default: ``x`` itself);
``project(state, egrad)``
    the Euclidean gradient as a covector on the blocks, ``P_x(E)``;
``whiten(state, blocks)``
    ``H = L^{-1} P_x(E)`` for any factor ``L L^T = G_x`` (``L = G_x^{1/2}`` is one choice);
``unwhiten(state, blocks)``
    ``xi = L^{-T} Z``: from the LMO output back to tangent coordinates;
``tangent(state, blocks)``
    the tangent vector in the representation the host library uses;
``block_ranks(state)``
    optional: per block, an upper bound on the rank of its (whitened) covector known from the geometry, or
    ``None`` (default for every block). E.g. Stiefel's ``K = (I - X X^T) E`` has rank at most ``n - p``; the LMO
    then treats the values beyond the bound as the rounding noise they are, so the direction stays tangent and
    continuous in the gradient when ``n < 2p``;
``supports_numpy``
    optional attribute (default ``False``): ``True`` when every operation also accepts and returns numpy arrays
    (written with arithmetic, ``@``, ``.mT`` and the helpers of ``imuon_manopt._backend``); the template then
    keeps small numpy inputs in numpy instead of converting them to torch;
``flat(state, v)``
    the metric's lowering map ("flat", tangent vector -> covector): a Euclidean gradient ``c`` in the point's
    representation with ``<c, w>_F = g_x(v, w)`` for every tangent ``w``. It turns a tangent vector (a
    transported momentum buffer, a Riemannian gradient) back into the Euclidean-gradient form the template takes:
    for ``v = grad f`` the direction from ``flat(v)`` equals the direction from the Euclidean gradient. The
    default is the identity, right for metrics that are the embedded Frobenius one on the tangent space.

``open_in_ambient`` (class attribute, default ``False``)
    ``True`` when the manifold is an open subset of its ambient matrix space (SPD in the symmetric matrices,
    Euclidean space itself): every cotangent space is then the ambient space, so Euclidean gradients taken at
    different points can be summed as they are (a momentum buffer of Euclidean gradients needs no transport).

Because unitarily invariant LMOs are equivariant under orthogonal changes, any factor ``L`` with
``L L^T = G_x`` gives the same direction, so Cholesky or QR factors may replace symmetric square roots.

Blocks are tensors of shape ``(..., a, b)``; leading dimensions are a batch, which the template treats as a
product of manifolds. ``structure`` says, per block, what kind of matrix the block is: ``"general"``,
``"symmetric"`` (its LMO uses the eigendecomposition / matrix sign) or ``"skew"`` (the LMO is taken over skew
matrices: the unconstrained maximizer's skew part, which is feasible because unitarily invariant norms satisfy
``phi(Z^T) = phi(Z)``; it matters for the nuclear norm, whose top singular pair of a skew matrix is not skew).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

Blocks = tuple[torch.Tensor, ...]


class MetricOperator(abc.ABC):
    """Abstract metric operator on a block parametrization of the tangent space.

    Subclass it to plug a manifold or metric into iMuon. The five methods are described in the module
    docstring; all inputs and outputs are torch tensors (the template converts numpy at its boundary).

    Example: a weighted Euclidean metric ``g(u, v) = tr(u^T W v)`` with ``W = C C^T`` on ``R^{n x p}`` has one
    block, ``project`` is the identity, ``whiten(E) = C^{-1} E``, ``unwhiten(Z) = C^{-T} Z`` (see
    ``examples/custom_metric.py``).
    """

    #: One entry per block: ``"general"``, ``"symmetric"`` or ``"skew"``.
    structure: tuple[str, ...] = ("general",)
    #: The manifold is an open subset of its ambient space (module docstring).
    open_in_ambient: bool = False
    #: Whether the operations also run on numpy arrays (see the module docstring); user geometries get torch.
    supports_numpy: bool = False

    def at(self, x: Any) -> Any:
        """Precompute what the other methods need at the point ``x`` (default: ``x`` itself)."""
        return x

    @abc.abstractmethod
    def project(self, state: Any, egrad: Any) -> Blocks:
        """Euclidean gradient -> covector blocks ``P_x(E)``."""

    @abc.abstractmethod
    def whiten(self, state: Any, blocks: Blocks) -> Blocks:
        """Covector blocks -> whitened blocks ``H = L^{-1} P_x(E)`` with ``L L^T = G_x``."""

    @abc.abstractmethod
    def unwhiten(self, state: Any, blocks: Blocks) -> Blocks:
        """LMO blocks ``Z`` -> tangent blocks ``xi = L^{-T} Z``."""

    def tangent(self, state: Any, blocks: Blocks) -> Any:
        """Tangent blocks -> the host representation (default: the single block)."""
        if len(blocks) != 1:
            raise NotImplementedError(
                f"{type(self).__name__} has {len(blocks)} blocks: override tangent() to assemble them"
            )
        return blocks[0]

    def block_ranks(self, state: Any) -> tuple[int | None, ...] | None:
        """Per block, an upper bound on its rank known from the geometry (``None``: no bound); ``None`` for all."""
        return None

    def flat(self, state: Any, v: Any) -> Any:
        """Tangent vector ``v`` (host representation) -> covector ``c`` with ``<c, w>_F = g_x(v, w)``.

        Default: the identity (the metric is the Frobenius one on the tangent space).
        """
        return v

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_matrix(name: str, t: torch.Tensor, *, min_ndim: int = 2) -> None:
    """Raise a ``ValueError`` naming ``name`` if ``t`` is not a floating tensor with ``min_ndim`` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(t).__name__}")
    if t.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions (..., rows, cols), got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point array, got dtype {t.dtype}")


def check_same_shape(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Raise a ``ValueError`` if the tensors do not all have the same shape."""
    shapes = [tuple(t.shape) for t in tensors]
    if any(s != shapes[0] for s in shapes[1:]):
        pairs = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
        raise ValueError(f"shape mismatch: {pairs}; the gradient must have the point's shape")


def drop_rounding(block: torch.Tensor, source: torch.Tensor, terms: int) -> torch.Tensor:
    """``block``, or zero for each matrix of it whose entries are all within the rounding error of the products that
    formed it from ``source`` (``terms`` products summed per entry: ``|entry| <= terms * eps * max|source|``).

    A projected block that is zero in exact arithmetic (Stiefel's ``skew(X^T E)`` when ``X^T E`` is symmetric, as
    for any cost ``f(X X^T)``) comes out as rounding noise, and a unitarily invariant LMO would turn that noise into
    a unit direction; here it stays zero. Torch tensors (no host synchronization) or numpy arrays, batched over the
    leading dimensions.
    """
    if isinstance(block, np.ndarray):
        if block.ndim == 2:  # one matrix: the same test on two floats (NaN fails it: the block is kept)
            if float(abs(block).max()) <= float(abs(source).max()) * (terms * np.finfo(block.dtype).eps):
                return np.zeros_like(block)
            return block
        floor = np.abs(source).max(axis=(-2, -1), keepdims=True) * (terms * np.finfo(block.dtype).eps)
        noise = np.abs(block).max(axis=(-2, -1), keepdims=True) <= floor
        return np.where(noise, 0.0, block) if noise.any() else block
    floor = source.abs().amax(dim=(-2, -1), keepdim=True) * (terms * torch.finfo(block.dtype).eps)
    noise = block.abs().amax(dim=(-2, -1), keepdim=True) <= floor
    return torch.where(noise, torch.zeros_like(block), block)


def sym(a: torch.Tensor) -> torch.Tensor:
    """Symmetric part ``(a + a^T) / 2`` over the trailing two dims, as ``a / 2 + a^T / 2`` (no overflow for
    entries near the dtype's largest value). A torch tensor or a numpy array."""
    if isinstance(a, torch.Tensor):
        return torch.add(a * 0.5, a.mT, alpha=0.5)
    return a * 0.5 + a.mT * 0.5


def skew(a: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric part ``(a - a^T) / 2`` over the trailing two dims, as ``a / 2 - a^T / 2``. A torch tensor or
    a numpy array."""
    if isinstance(a, torch.Tensor):
        return torch.add(a * 0.5, a.mT, alpha=-0.5)
    return a * 0.5 - a.mT * 0.5
