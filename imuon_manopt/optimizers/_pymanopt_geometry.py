"""Pymanopt manifolds -> iMuon metric operators, keyed on the concrete manifold class.

Each supported manifold gets a :class:`HostGeometry`: the core metric operator of the manifold's own
metric plus the maps between Pymanopt's representations (numpy arrays, ``(u, s, vt)`` triples, lists
for products) and the core's (see ``docs/core-api.md``):

``core_point(x)``
    the point in the core representation;
``core_egrad(x, egrad)``
    Pymanopt's Euclidean gradient (``problem.euclidean_gradient``) -> the core's Euclidean gradient;
``flat(x, v)``
    a tangent vector (a Riemannian gradient, a momentum buffer) -> a core Euclidean gradient ``c``
    with ``P_x(c) = v`` lowered by the metric, i.e. ``<c, w> = g_x(v, w)`` for tangent ``w``; for
    ``v = grad f`` it gives the same direction as the true Euclidean gradient;
``tangent(x, xi)``
    a core direction -> a Pymanopt tangent vector (through ``manifold.projection``, which also
    returns the manifold's own tangent-vector type);
``check_point(x)``
    raises ``ValueError`` naming what is wrong when ``x`` is not on the manifold.

Supported (exact classes): ``Euclidean``, ``Sphere``, ``Stiefel`` (embedded metric), ``Grassmann``
(orthonormal representative), ``SymmetricPositiveDefinite`` (affine-invariant metric),
``FixedRankEmbedded`` (balanced factors, spec §2) and ``Product`` of these. Stacks (``k > 1``) are
batches of the core geometry, i.e. products.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pymanopt import manifolds as pm

from ..geometry import (
    SPD,
    Euclidean,
    FixedRank,
    Grassmann,
    MetricOperator,
    Product,
    Sphere,
    Stiefel,
)

SUPPORTED = (
    "Euclidean",
    "Sphere",
    "Stiefel",
    "Grassmann",
    "SymmetricPositiveDefinite",
    "FixedRankEmbedded",
    "Product",
)


def _tol(dtype: np.dtype) -> float:
    """Tolerance of the on-manifold checks: ``10 sqrt(eps)`` of the dtype (1.5e-7 for float64)."""
    return (
        10.0 * float(np.sqrt(np.finfo(dtype).eps)) if np.issubdtype(dtype, np.floating) else 1.5e-7
    )


def _as_float_array(name: str, x: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(
            f"{name}: a point must be a numpy array of shape {shape}, got {type(x).__name__}"
        )
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: a point must have shape {shape}, got {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"{name}: a point must be a real floating-point array, got dtype {x.dtype}"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: the point has NaN or infinite entries")
    return x


def _check_orthonormal(name: str, x: np.ndarray, what: str) -> None:
    gram = np.swapaxes(x, -1, -2) @ x
    err = float(np.max(np.abs(gram - np.eye(x.shape[-1])))) if x.size else 0.0
    tol = _tol(x.dtype)
    if err > tol:
        raise ValueError(
            f"{name}: the point is not on the manifold: {what} must have orthonormal columns, but "
            f"max|X^T X - I| = {err:.2e} > {tol:.1e}; orthonormalize it first (numpy.linalg.qr)"
        )


class HostGeometry:
    """Maps between one Pymanopt manifold's representations and a core :class:`MetricOperator`."""

    geometry: MetricOperator

    def __init__(self, manifold: Any) -> None:
        self.manifold = manifold
        self.name = type(manifold).__name__

    def check_point(self, x: Any) -> None:
        """Raise ``ValueError`` if ``x`` is not a point of the manifold."""

    def core_point(self, x: Any) -> Any:
        return x

    def core_egrad(self, x: Any, egrad: Any) -> Any:
        return egrad

    def flat(self, x: Any, v: Any) -> Any:
        return v

    def ambient(self, x: Any, xi: Any) -> Any:
        """Core direction -> the argument of ``manifold.projection``."""
        return xi

    def tangent(self, x: Any, xi: Any) -> Any:
        return self.manifold.projection(x, self.ambient(x, xi))


class _Euclidean(HostGeometry):
    """``Euclidean(*shape)``: a 1-D point is a column; ``(..., m, n)`` a batch of m x n matrices."""

    geometry = Euclidean()

    def check_point(self, x):
        _as_float_array(self.name, x, tuple(self.manifold._shape))


class _Sphere(HostGeometry):
    """``Sphere(*shape)``: the unit sphere of ``R^N``, ``N = prod(shape)`` (one vector)."""

    geometry = Sphere()

    def check_point(self, x):
        _as_float_array(self.name, x, tuple(self.manifold._shape))
        err = abs(float(np.linalg.norm(x)) - 1.0)
        if err > _tol(x.dtype):
            raise ValueError(
                f"{self.name}: the point is not on the manifold: its norm is "
                f"{np.linalg.norm(x):.6g}, expected 1; divide it by its norm first"
            )

    def core_point(self, x):
        return x.reshape(-1)

    def core_egrad(self, x, egrad):
        return np.asarray(egrad).reshape(-1)

    flat = core_egrad

    def ambient(self, x, xi):
        return xi.reshape(x.shape)


class _Frames(HostGeometry):
    """``Stiefel`` (embedded metric), ``Grassmann`` (orthonormal representative); ``k >= 1``."""

    def __init__(self, manifold):
        super().__init__(manifold)
        self.geometry = (
            Stiefel("embedded") if isinstance(manifold, pm.Stiefel) else Grassmann("orthonormal")
        )

    def check_point(self, x):
        m = self.manifold
        shape = (m._n, m._p) if m._k == 1 else (m._k, m._n, m._p)
        _as_float_array(self.name, x, shape)
        _check_orthonormal(self.name, x, "X")


class _SPD(HostGeometry):
    """``SymmetricPositiveDefinite``, affine-invariant metric; the covector is ``sym(egrad)``."""

    geometry = SPD()

    def check_point(self, x):
        m = self.manifold
        shape = (m._n, m._n) if m._k == 1 else (m._k, m._n, m._n)
        _as_float_array(self.name, x, shape)
        asym = float(np.max(np.abs(x - np.swapaxes(x, -1, -2))))
        scale = max(float(np.max(np.abs(x))), 1e-300)
        if asym > _tol(x.dtype) * scale:
            raise ValueError(
                f"{self.name}: the point is not symmetric (max|X - X^T| = {asym:.2e}); "
                "an SPD point must be symmetric positive definite"
            )
        try:
            np.linalg.cholesky(x)
        except np.linalg.LinAlgError:
            raise ValueError(
                f"{self.name}: the point is not positive definite (Cholesky failed, smallest "
                f"eigenvalue {float(np.min(np.linalg.eigvalsh(x))):.3g})"
            ) from None

    def core_egrad(self, x, egrad):
        e = np.asarray(egrad)
        return 0.5 * (e + np.swapaxes(e, -1, -2))

    def flat(self, x, v):
        # g_X(v, w) = tr(X^{-1} v X^{-1} w): the covector is X^{-1} v X^{-1} (symmetric for
        # symmetric v).
        c = np.linalg.solve(x, np.swapaxes(np.linalg.solve(x, v), -1, -2))
        return 0.5 * (c + np.swapaxes(c, -1, -2))


class _FixedRank(HostGeometry):
    """``FixedRankEmbedded(m, n, k)`` via balanced factors ``B = u s^{1/2}``, ``A = s^{1/2} vt``.

    ``S_A = S_B = diag(s)``; Pymanopt's gradient ``(du, ds, dvt)`` of ``f(u, s, vt) = l(u diag(s)
    vt)`` gives the factor gradients ``E_B = du s^{-1/2}``, ``E_A = s^{-1/2} dvt`` (``ds`` is
    redundant for such costs). The core direction ``(xi_B, xi_A)`` is handed to
    ``manifold.projection`` as the factored ambient matrix ``xi_B A + B xi_A = [xi_B, B] I_{2k}
    [A^T, xi_A^T]^T`` (Pymanopt's ``(U, S, V)`` convention, ``U @ S @ V.T``), so no ``m x n`` matrix
    is formed: ``O((m + n) k^2)`` memory and time.
    """

    geometry = FixedRank("qr")

    def check_point(self, x):
        m = self.manifold
        if not isinstance(x, (tuple, list)) or len(x) != 3:
            raise ValueError(
                f"{self.name}: a point is a triple (u, s, vt) of shapes ({m._m}, {m._k}), "
                f"({m._k},), "
                f"({m._k}, {m._n}); got {type(x).__name__}"
            )
        u, s, vt = x
        _as_float_array(f"{self.name} factor u", u, (m._m, m._k))
        _as_float_array(f"{self.name} factor s", s, (m._k,))
        _as_float_array(f"{self.name} factor vt", vt, (m._k, m._n))
        if np.any(s <= 0):
            raise ValueError(
                f"{self.name}: the singular values s must be positive (the point has rank "
                f"{m._k}), got min(s) = {float(np.min(s)):.3g}"
            )
        _check_orthonormal(self.name, u, "u")
        _check_orthonormal(self.name, vt.T, "vt.T")

    def core_point(self, x):
        u, s, vt = x
        r = np.sqrt(s)
        return u * r, r[:, None] * vt

    def core_egrad(self, x, egrad):
        _, s, _ = x
        du, _, dvt = egrad
        r = np.sqrt(s)
        return np.asarray(du) / r, np.asarray(dvt) / r[:, None]

    def flat(self, x, v):
        # For a tangent (Up, M, Vp): Gamma V = Up + u M and U^T Gamma = M vt + Vp^T for any Gamma
        # projecting to it.
        u, s, vt = x
        up, mm, vp = v
        r = np.sqrt(s)
        return (up + u @ mm) * r, r[:, None] * (mm @ vt + vp.T)

    def ambient(self, x, xi):
        u, s, vt = x
        xi_b, xi_a = xi
        r = np.sqrt(s)
        left = np.hstack((xi_b, u * r))
        right = np.hstack((vt.T * r, xi_a.T))
        return left, np.eye(left.shape[1]), right


class _Product(HostGeometry):
    """``Product`` of supported manifolds: lists of points, gradients and tangent vectors."""

    def __init__(self, manifold, parts: list[HostGeometry]):
        super().__init__(manifold)
        self.parts = parts
        self.geometry = Product([p.geometry for p in parts])

    def check_point(self, x):
        if not isinstance(x, (list, tuple)) or len(x) != len(self.parts):
            n = len(x) if isinstance(x, (list, tuple)) else type(x).__name__
            raise ValueError(
                f"Product: a point is a list of {len(self.parts)} component points, got {n}"
            )
        for part, xi in zip(self.parts, x):
            part.check_point(xi)

    def core_point(self, x):
        return [p.core_point(c) for p, c in zip(self.parts, x)]

    def core_egrad(self, x, egrad):
        return [p.core_egrad(c, e) for p, c, e in zip(self.parts, x, egrad)]

    def flat(self, x, v):
        return [p.flat(c, e) for p, c, e in zip(self.parts, x, v)]

    def ambient(self, x, xi):
        return [p.ambient(c, d) for p, c, d in zip(self.parts, x, xi)]


class _Custom(HostGeometry):
    """A user-supplied :class:`MetricOperator`.

    It sees Pymanopt's points and Euclidean gradients unchanged (lists for products), and its
    ``tangent()`` must return Pymanopt's tangent representation. ``flat`` (used by momentum and by
    problems that give only a Riemannian gradient) is the identity: exact when the manifold's metric
    is the embedded Euclidean one.
    """

    def __init__(self, manifold, geometry: MetricOperator):
        super().__init__(manifold)
        self.geometry = geometry

    def tangent(self, x, xi):
        if isinstance(self.manifold, pm.Product) and type(xi) is list:
            return type(self.manifold.zero_vector(x))(
                xi
            )  # Pymanopt's product tangent type (supports +, *)
        return xi


_FACTORIES = {
    pm.Euclidean: _Euclidean,
    pm.Sphere: _Sphere,
    pm.Stiefel: _Frames,
    pm.Grassmann: _Frames,
    pm.SymmetricPositiveDefinite: _SPD,
    pm.FixedRankEmbedded: _FixedRank,
}


def _unsupported(manifold: Any) -> TypeError:
    return TypeError(
        f"IMuon has no iMuon geometry for {type(manifold).__module__}."
        f"{type(manifold).__name__}; supported Pymanopt manifolds (exact classes): "
        f"{', '.join(SUPPORTED)} (products of the others). For another manifold or metric, "
        "implement imuon_manopt.geometry.MetricOperator (project, whiten, unwhiten, "
        "tangent) and pass it as IMuon(geometry=...)."
    )


def host_geometry(manifold: Any, geometry: MetricOperator | None = None) -> HostGeometry:
    """The :class:`HostGeometry` of a Pymanopt manifold; ``geometry`` overrides the built-in."""
    if geometry is not None:
        return _Custom(manifold, geometry)
    cls = type(manifold)
    if cls is pm.Product:
        return _Product(manifold, [host_geometry(m) for m in manifold.manifolds])
    factory = _FACTORIES.get(cls)
    if factory is None:
        raise _unsupported(manifold)
    return factory(manifold)
