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
    ``v = grad f`` it gives the same direction as the true Euclidean gradient. The metric part is
    the core geometry's ``flat`` (:func:`imuon_manopt.direction.flat_covector`); where it is the
    identity (embedded metrics) the adapter skips the call;
``tangent(x, xi)``
    a core direction -> a Pymanopt tangent vector of the manifold's own type (through
    ``manifold.projection``; fixed rank assembles ``(Up, M, Vp)`` directly);
``check_point(x)``
    raises ``ValueError`` naming what is wrong when ``x`` is not on the manifold;
``gradients(x, egrad)``
    Pymanopt's Euclidean gradient -> ``(Riemannian gradient, core Euclidean gradient)``; the
    Riemannian gradient is the manifold's own conversion, except for ``FixedRankEmbedded`` (see
    :class:`_FixedRank`);

The adapter holds no iMuon formula: every direction comes from
:func:`imuon_manopt.direction.intrinsic_direction`, which keeps small numpy problems in numpy (see
``imuon_manopt/_backend.py``), so no torch conversion or thread setting is involved on them.

Supported (exact classes): ``Euclidean``, ``Sphere``, ``Stiefel`` (embedded metric), ``Grassmann``
(orthonormal representative), ``SymmetricPositiveDefinite`` (affine-invariant metric),
``FixedRankEmbedded`` (balanced factors, spec §2) and ``Product`` of these. Stacks (``k > 1``) are
batches of the core geometry, i.e. products.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pymanopt import manifolds as pm

from ..direction import flat_covector
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
    return 10.0 * float(np.sqrt(np.finfo(dtype).eps)) if np.issubdtype(dtype, np.floating) else 1.5e-7


def _as_float_array(name: str, x: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name}: a point must be a numpy array of shape {shape}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: a point must have shape {shape}, got {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: a point must be a real floating-point array, got dtype {x.dtype}")
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


def _near_orthonormal(x: np.ndarray) -> bool:
    """Whether the columns of ``x`` (..., n, p) are orthonormal within :func:`_tol` (``False`` for NaN or inf)."""
    gram = np.swapaxes(x, -1, -2) @ x
    return float(np.abs(gram - np.eye(gram.shape[-1])).max()) <= _tol(x.dtype)


def _identity_flat(self, x: Any, v: Any) -> Any:
    """The embedded metric's lowering map, the identity (the core geometry's ``flat`` is too)."""
    return v


def finite_tree(tree: Any) -> bool:
    """True when every array in a (nested tuple/list of) numpy arrays or scalars is finite."""
    if isinstance(tree, np.ndarray):
        return bool(np.isfinite(tree).all())
    if isinstance(tree, (list, tuple)):
        return all(finite_tree(t) for t in tree)
    return bool(np.isfinite(np.asarray(tree)).all())


class HostGeometry:
    """Maps between one Pymanopt manifold's representations and a core :class:`MetricOperator`."""

    geometry: MetricOperator

    def __init__(self, manifold: Any) -> None:
        self.manifold = manifold
        self.name = type(manifold).__name__
        self._vector_type: Any = None
        self._shape: Any = None

    def point_shape(self, x: Any) -> Any:
        """The manifold's point shape, from the public ``manifold.zero_vector`` (a tangent vector of an embedded
        matrix manifold has the point's shape; Pymanopt 2.2 keeps the dimensions themselves private). For
        ``FixedRankEmbedded`` the shapes of the tangent triple ``(Up, M, Vp)``."""
        if self._shape is None:
            zero = self.manifold.zero_vector(x if isinstance(x, np.ndarray) else np.empty(0))
            self._shape = tuple(np.shape(part) for part in zero) if isinstance(zero, tuple) else np.shape(zero)
        return self._shape

    def vector_type(self, x: Any) -> Any:
        """The class of the manifold's tangent vectors (``FixedRankEmbedded``'s triple, ``Product``'s list),
        learned once from the public ``manifold.zero_vector`` instead of importing Pymanopt's private class."""
        if self._vector_type is None:
            self._vector_type = type(self.manifold.zero_vector(x))
        return self._vector_type

    def check_point(self, x: Any) -> None:
        """Raise ``ValueError`` if ``x`` is not a point of the manifold."""

    def feasible(self, x: Any) -> bool:
        """Whether ``x`` (a step's result) is a finite point of the manifold, by :meth:`check_point`."""
        try:
            self.check_point(x)
        except ValueError:
            return False
        return finite_tree(x)

    def core_point(self, x: Any) -> Any:
        return x

    def core_egrad(self, x: Any, egrad: Any) -> Any:
        return egrad

    def check_gradient(self, x: Any, g: Any, name: str = "euclidean_gradient") -> None:
        """Raise ``ValueError`` naming ``name`` if ``g`` is not an array of the point's shape."""
        if not isinstance(x, np.ndarray):
            return
        shape = getattr(g, "shape", None)
        if shape is None or tuple(shape) != x.shape:
            got = tuple(shape) if shape is not None else type(g).__name__
            raise ValueError(
                f"{self.name}: the problem's {name} returned {got}; it must be an array of the point's shape {x.shape}"
            )

    def flat(self, x: Any, v: Any) -> Any:
        """Tangent vector -> core Euclidean gradient, lowered by the core geometry's metric."""
        return flat_covector(self.geometry, self.core_point(x), v)

    def gradients(self, x: Any, egrad: Any) -> tuple[Any, Any]:
        self.check_gradient(x, egrad)
        return self.manifold.euclidean_to_riemannian_gradient(x, egrad), self.core_egrad(x, egrad)

    def ambient(self, x: Any, xi: Any) -> Any:
        """Core direction -> the argument of ``manifold.projection``."""
        return xi

    def tangent(self, x: Any, xi: Any) -> Any:
        return self.manifold.projection(x, self.ambient(x, xi))


class _Euclidean(HostGeometry):
    """``Euclidean(*shape)``: a 1-D point is a column; ``(..., m, n)`` a batch of m x n matrices."""

    geometry = Euclidean()
    flat = _identity_flat

    def check_point(self, x):
        _as_float_array(self.name, x, self.point_shape(x))


class _Sphere(HostGeometry):
    """``Sphere(*shape)``: the unit sphere of ``R^N``, ``N = prod(shape)`` (one vector)."""

    geometry = Sphere()

    def feasible(self, x):
        # the step's point has the start's shape and dtype: only the norm can be off (NaN fails the comparison)
        v = x.reshape(-1)
        return abs(math.sqrt(float(v @ v)) - 1.0) <= _tol(x.dtype)

    def check_point(self, x):
        _as_float_array(self.name, x, self.point_shape(x))
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

    flat = core_egrad  # the embedded metric: the identity, on the flattened vector

    def ambient(self, x, xi):
        return xi.reshape(x.shape)

    def tangent(self, x, xi):
        # the core's direction P_x(c) / ||P_x(c)|| is tangent already: no projection
        return xi.reshape(x.shape)


class _Frames(HostGeometry):
    """``Stiefel`` (embedded metric), ``Grassmann`` (orthonormal representative); ``k >= 1``."""

    def __init__(self, manifold):
        super().__init__(manifold)
        self.geometry = Stiefel("embedded") if isinstance(manifold, pm.Stiefel) else Grassmann("orthonormal")

    flat = _identity_flat

    def feasible(self, x):
        # the step's point has the start's shape and dtype: only orthonormality can be lost (NaN fails the test)
        return _near_orthonormal(x)

    def tangent(self, x, xi):
        # the core's direction is tangent already (X Omega + K with skew Omega and X^T K = 0 on Stiefel, (I - X X^T)
        # times a matrix on Grassmann): no projection
        return xi

    def check_point(self, x):
        _as_float_array(self.name, x, self.point_shape(x))
        _check_orthonormal(self.name, x, "X")


class _SPD(HostGeometry):
    """``SymmetricPositiveDefinite``, affine-invariant metric; the covector is ``sym(egrad)``; the
    lowering map is the core's ``SPD.flat``."""

    geometry = SPD()

    def check_point(self, x):
        _as_float_array(self.name, x, self.point_shape(x))
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


class _FixedRank(HostGeometry):
    """``FixedRankEmbedded(m, n, k)`` via balanced factors ``B = u s^{1/2}``, ``A = s^{1/2} vt``.

    The cost is taken to depend on the point only through ``X = u diag(s) vt`` (spec §2). Accepted
    Euclidean gradients (``problem.euclidean_gradient``, i.e. autodiff backends or
    ``euclidean_gradient=``):

    - Pymanopt's factor gradients ``(du, ds, dvt)`` of ``f(u, s, vt)`` (``ds`` one-dimensional):
      ``Gamma V = du / s`` and ``U^T Gamma = dvt / s[:, None]`` (``ds`` is redundant);
    - the gradient ``Gamma`` of ``f`` with respect to ``X``: an ``m x n`` array or ``scipy.sparse``
      matrix, or Pymanopt's factored ambient form ``(U, S, V)`` with ``Gamma = U @ S @ V.T``
      (``S`` two-dimensional), which is never multiplied out.

    Only ``Gamma V`` and ``U^T Gamma`` are needed. The factor gradients of the balanced factors are
    ``E_B = Gamma A^T = (Gamma V) s^{1/2}``, ``E_A = B^T Gamma = s^{1/2} (U^T Gamma)``, and the
    Riemannian gradient (the projection of ``Gamma``) is ``(Up, M, Vp)`` with ``M = U^T Gamma V``,
    ``Up = Gamma V - U M``, ``Vp = Gamma^T U - V M^T``. Nothing divides by ``s_i^2 - s_j^2``
    (Pymanopt's ``euclidean_to_riemannian_gradient`` does, for general functions of ``(u, s,
    vt)``, and returns NaN when singular values repeat, e.g. at the solution of an exact
    completion problem with condition number 1).

    Direction (spec §2): ``S_A = S_B = diag(s)`` and the triangular factors of the Grams are
    ``diag(s^{1/2})``, so whitening divides by ``s^{1/2}``: ``H_B = E_B s^{-1/2} = Gamma V``,
    ``H_A = s^{-1/2} E_A = U^T Gamma``, and the ambient direction is ``polar(Gamma V) vt + u
    polar(U^T Gamma)`` for the spectral norm (the Frobenius norm divides both blocks by one joint
    norm). The solver evaluates these closed forms here in numpy (thin SVDs of an ``m x k`` and an
    ``n x k`` matrix), which is several times faster than the core's general ``FixedRank`` path
    at small sizes; other norms and Newton–Schulz go through the core. The tangent vector ``(Up,
    M, Vp)`` of an ambient direction ``P_B vt + u P_A`` is assembled directly: ``O((m + n) k^2)``,
    no ``m x n`` matrix.
    """

    geometry = FixedRank("balanced")  # (u s^{1/2}, s^{1/2} vt): the Grams are diag(s)

    def dims(self, x: Any) -> tuple[int, int, int]:
        """``(m, n, k)``, from the shapes of the zero tangent vector ``(Up (m, k), M, Vp (n, k))``."""
        (m, k), _, (n, _) = self.point_shape(x)
        return m, n, k

    def feasible(self, x):
        # a step's point (u, s, vt) has the start's structure, shapes and dtypes (Pymanopt's retraction): only the
        # positivity and finiteness of s and the orthonormality of u and vt can be lost (NaN and inf fail the tests)
        u, s, vt = x
        return (
            bool((s > 0).all() and np.isfinite(s).all())
            and _near_orthonormal(u)
            and _near_orthonormal(np.swapaxes(vt, -1, -2))
        )

    def check_point(self, x):
        m, n, k = self.dims(x)
        if not isinstance(x, (tuple, list)) or len(x) != 3:
            raise ValueError(
                f"{self.name}: a point is a triple (u, s, vt) of shapes ({m}, {k}), ({k},), ({k}, {n}); "
                f"got {type(x).__name__}"
            )
        u, s, vt = x
        _as_float_array(f"{self.name} factor u", u, (m, k))
        _as_float_array(f"{self.name} factor s", s, (k,))
        _as_float_array(f"{self.name} factor vt", vt, (k, n))
        if np.any(s <= 0):
            raise ValueError(
                f"{self.name}: the singular values s must be positive (the point has rank "
                f"{k}), got min(s) = {float(np.min(s)):.3g}"
            )
        _check_orthonormal(self.name, u, "u")
        _check_orthonormal(self.name, vt.T, "vt.T")

    def _gamma_products(self, x, egrad) -> tuple[np.ndarray, np.ndarray]:
        """``(Gamma V, Gamma^T U)`` (``m x k``, ``n x k``) from any accepted gradient form."""
        u, s, vt = x
        m, n, k = self.dims(x)
        if isinstance(egrad, (tuple, list)) and len(egrad) == 3:
            first, middle, last = egrad
            if np.ndim(middle) == 1:  # (du, ds, dvt)
                return np.asarray(first) / s, np.asarray(last).T / s
            if np.ndim(middle) == 2:  # (U, S, V): Gamma = U @ S @ V.T
                big_u, big_s, big_v = (np.asarray(a) for a in egrad)
                return big_u @ (big_s @ (big_v.T @ vt.T)), big_v @ (big_s.T @ (big_u.T @ u))
        elif getattr(egrad, "ndim", None) == 2 and tuple(egrad.shape) == (m, n):
            return np.asarray(egrad @ vt.T), np.asarray(egrad.T @ u)
        raise ValueError(
            f"{self.name}: a Euclidean gradient must be the factor gradients (du, ds, dvt) with "
            f"ds of shape ({k},), the {m} x {n} gradient with respect to the matrix "
            "(a numpy array or scipy.sparse matrix), or its factored form (U, S, V) with "
            f"U @ S @ V.T of shape ({m}, {n}); got {type(egrad).__name__}"
        )

    def core_point(self, x):
        u, s, vt = x
        r = np.sqrt(s)
        return u * r, r[:, None] * vt

    def core_egrad(self, x, egrad):
        return self._core_egrad(x, *self._gamma_products(x, egrad))

    def _core_egrad(self, x, g_v, g_u):
        r = np.sqrt(x[1])
        return g_v * r, (g_u * r).T

    def gradients(self, x, egrad):
        u, _, vt = x
        g_v, g_u = self._gamma_products(x, egrad)
        utgv = u.T @ g_v  # U^T Gamma V, twice: from Gamma V and from Gamma^T U
        vtgu = vt @ g_u
        rgrad = self.vector_type(x)(g_v - u @ utgv, 0.5 * (utgv + vtgu.T), g_u - vt.T @ vtgu)
        return rgrad, self._core_egrad(x, g_v, g_u)

    def flat(self, x, v):
        # Pymanopt's metric on FixedRankEmbedded is the embedded (Frobenius) one, whose lowering map
        # is the identity on the ambient tangent Up vt + u M vt + u Vp^T: this only converts that
        # ambient covector Gamma to the core's factor gradients. For a tangent (Up, M, Vp):
        # Gamma V = Up + u M and U^T Gamma = M vt + Vp^T for any Gamma projecting to it.
        u, s, vt = x
        up, mm, vp = v
        r = np.sqrt(s)
        return (up + u @ mm) * r, r[:, None] * (mm @ vt + vp.T)

    def _tangent(self, x, p_b, p_at):
        """The tangent ``(Up, M, Vp)`` of the ambient ``P_B vt + u P_A`` (``p_at = P_A^T``)."""
        u, _, vt = x
        utp = u.T @ p_b
        vtq = vt @ p_at
        return self.vector_type(x)(p_b - u @ utp, utp + vtq.T, p_at - vt.T @ vtq)

    def tangent(self, x, xi):
        # xi_B A + B xi_A = (xi_B s^{1/2}) vt + u (s^{1/2} xi_A).
        r = np.sqrt(x[1])
        xi_b, xi_a = xi
        return self._tangent(x, xi_b * r, xi_a.T * r)

    def ambient(self, x, xi):
        """The ambient direction in Pymanopt's factored form ``(U, S, V)``, ``U @ S @ V.T``."""
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
            raise ValueError(f"Product: a point is a list of {len(self.parts)} component points, got {n}")
        for part, xi in zip(self.parts, x):
            part.check_point(xi)

    def core_point(self, x):
        return [p.core_point(c) for p, c in zip(self.parts, x)]

    def core_egrad(self, x, egrad):
        return [p.core_egrad(c, e) for p, c, e in zip(self.parts, x, egrad)]

    def flat(self, x, v):
        return [p.flat(c, e) for p, c, e in zip(self.parts, x, v)]

    def gradients(self, x, egrad):
        if not isinstance(egrad, (list, tuple)) or len(egrad) != len(self.parts):
            got = len(egrad) if isinstance(egrad, (list, tuple)) else type(egrad).__name__
            raise ValueError(
                f"Product: the problem's euclidean_gradient must be a list of {len(self.parts)} "
                f"component gradients, got {got}"
            )
        pairs = [p.gradients(c, e) for p, c, e in zip(self.parts, x, egrad)]
        return self.vector_type(x)([g for g, _ in pairs]), [c for _, c in pairs]

    def ambient(self, x, xi):
        return [p.ambient(c, d) for p, c, d in zip(self.parts, x, xi)]

    def tangent(self, x, xi):
        return self.vector_type(x)([p.tangent(c, d) for p, c, d in zip(self.parts, x, xi)])


class _Custom(HostGeometry):
    """A user-supplied :class:`MetricOperator`.

    It sees Pymanopt's points and Euclidean gradients unchanged (lists for products), and its
    ``tangent()`` must return Pymanopt's tangent representation. Momentum and problems that give
    only a Riemannian gradient lower tangent vectors with the geometry's own ``flat`` (the identity
    unless the geometry overrides it), so the geometry's metric must be the manifold's.
    """

    def __init__(self, manifold, geometry: MetricOperator):
        super().__init__(manifold)
        self.geometry = geometry

    def tangent(self, x, xi):
        if isinstance(self.manifold, pm.Product) and type(xi) is list:
            return self.vector_type(x)(xi)  # Pymanopt's product tangent type (supports +, *)
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
        "subclass imuon_manopt.geometry.MetricOperator (the contract: help(MetricOperator)) and pass it as "
        "IMuon(geometry=...)."
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
