"""The metric-operator interface: what a manifold (or metric) provides to get iMuon directions.

:class:`MetricOperator`'s docstring is the contract (every operation, its shapes and its defaults); the rest of the
package, its error messages and CONTRIBUTING.md point there. Also here: the block helpers ``sym``, ``skew`` and
``drop_rounding`` shared by the built-in geometries.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import torch

Blocks = tuple[torch.Tensor, ...]


class MetricOperator(abc.ABC):
    """A Riemannian metric on a block parametrization of the tangent space: the contract between a manifold and iMuon.

    Subclass it to plug a manifold or metric into iMuon (both adapters take one: ``IMuon(geometry=...)`` for
    Pymanopt, :func:`imuon_manopt.optim.register_manifold` for geoopt). At a point ``x`` the tangent (or horizontal)
    space is parametrized by a tuple of matrix *blocks*, tensors of shape ``(..., a, b)`` whose leading dimensions
    are a batch (a product of manifolds), with a metric ``g_x(u, v) = <G_x u, v>`` on them. The template
    (:func:`imuon_manopt.direction.intrinsic_direction`) computes ``xi = unwhiten(lmo(whiten(project(E))))``.

    Required methods:

    - ``project(state, egrad) -> blocks``: the Euclidean gradient as a covector on the blocks, ``P_x(E)``.
    - ``whiten(state, blocks) -> blocks``: ``H = L^{-1} P_x(E)`` for any factor ``L L^T = G_x`` (Cholesky or QR
      factors are fine: unitarily invariant LMOs are equivariant under the orthogonal difference, so every such
      ``L`` gives the same direction; ``L = G_x^{1/2}`` is one choice).
    - ``unwhiten(state, blocks) -> blocks``: ``xi = L^{-T} Z``, from the LMO output back to tangent coordinates.

    Optional methods (defaults in parentheses):

    - ``at(x) -> state``: factorizations at the point, computed once and passed to every other method (``x``).
    - ``tangent(state, blocks)``: the tangent vector in the host library's representation (the single block; a
      geometry with several blocks must override it).
    - ``block_ranks(state) -> tuple[int | None, ...] | None``: per block, an upper bound on the rank of its
      whitened covector known from the geometry, passed to the LMO's rank cut so that values beyond it are treated
      as the rounding noise they are (``None``: no bound). E.g. Stiefel's ``(I - X X^T) E`` has rank at most
      ``n - p``, which keeps the direction tangent and continuous in the gradient when ``n < 2p``.
    - ``flat(state, v)``: the metric's lowering map, tangent vector (host representation) -> covector ``c`` with
      ``<c, w>_F = g_x(v, w)`` for every tangent ``w``; adapters use it to turn a transported momentum buffer or a
      Riemannian gradient back into the Euclidean-gradient form the template takes (for ``v = grad f`` the
      direction from ``flat(v)`` is the direction from the Euclidean gradient). (The identity: right when the
      metric is the embedded Frobenius one on the tangent space.)

    Class attributes (defaults in parentheses):

    - ``structure``: one entry per block, ``"general"``, ``"symmetric"`` (its LMO uses the eigendecomposition /
      matrix sign) or ``"skew"`` (the LMO is taken over skew matrices: the skew part of the unconstrained maximizer,
      feasible because unitarily invariant norms satisfy ``phi(Z^T) = phi(Z)``; it matters for the nuclear norm,
      whose top singular pair of a skew matrix is not skew). (``("general",)``)
    - ``open_in_ambient``: the manifold is an open subset of its ambient matrix space (SPD in the symmetric
      matrices, Euclidean space itself), so every cotangent space is the ambient space and Euclidean gradients
      taken at different points can be summed as they are (momentum needs no transport). (``False``)
    - ``supports_numpy``: every operation also accepts and returns numpy arrays (written with arithmetic, ``@``,
      ``.mT`` and the helpers of ``imuon_manopt._backend``), so the template may keep small numpy inputs in numpy.
      (``False``: user geometries get torch tensors; the template converts numpy at its boundary.)

    Example: a weighted Euclidean metric ``g(u, v) = tr(u^T W v)`` with ``W = C C^T`` on ``R^{n x p}`` has one
    block, ``project`` is the identity, ``whiten(E) = C^{-1} E``, ``unwhiten(Z) = C^{-T} Z`` (see
    ``examples/custom_metric.py``).
    """

    #: One entry per block: ``"general"``, ``"symmetric"`` or ``"skew"``.
    structure: tuple[str, ...] = ("general",)
    #: The manifold is an open subset of its ambient space (see the class docstring).
    open_in_ambient: bool = False
    #: Whether the operations also run on numpy arrays (see the class docstring); user geometries get torch.
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
