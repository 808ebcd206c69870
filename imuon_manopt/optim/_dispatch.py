"""geoopt manifold classes -> iMuon metric operators.

Dispatch is on the *concrete* class of ``ManifoldParameter.manifold`` (walking its MRO, so geoopt's
``...Exact`` variants inherit their parent's rule): ``geoopt.Stiefel()`` returns a
``CanonicalStiefel``, whose canonical metric gives a different iMuon direction than
``EuclideanStiefel`` (spec §2).

A rule has two parts:

``geometry(manifold)``
    the :class:`imuon_manopt.geometry.MetricOperator` of the manifold's metric, in geoopt's
    representation;
``flat(x, v)``
    the metric's "lowering" map: a tangent vector ``v`` (e.g. a momentum buffer of Riemannian
    gradients) -> a Euclidean covector ``c`` with ``<c, w>_F = g_x(v, w)`` for every tangent ``w``.
    It turns the transported momentum back into the Euclidean-gradient form the iMuon template
    takes. For metrics that are the embedded (Frobenius) one on the tangent space it is the
    identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import geoopt
import torch

from ..geometry import SPD, Grassmann, MetricOperator, Sphere, Stiefel

FlatMap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GeometryFactory = Callable[[geoopt.Manifold], MetricOperator]


@dataclass(frozen=True)
class ManifoldRule:
    """How :class:`~imuon_manopt.optim.IMuon` treats parameters on one geoopt manifold class."""

    geometry: GeometryFactory
    flat: FlatMap
    label: str
    polish: Callable[[torch.Tensor], torch.Tensor] | None = None


def _identity_flat(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v


def _canonical_stiefel_flat(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # g_x(v, w) = tr(v^T (I - 1/2 X X^T) w): the covector is (I - 1/2 X X^T) v.
    return v - 0.5 * (x @ (x.mT @ v))


def _stiefel_polish(x: torch.Tensor) -> torch.Tensor:
    # One Newton-Schulz step towards the polar factor, X (3 I - X^T X) / 2: removes the O(eps)
    # orthonormality
    # error the Cayley retraction accumulates over many steps (it is exactly orthogonal only in
    # exact
    # arithmetic). It moves X by O(||X^T X - I||), i.e. by rounding error.
    return 1.5 * x - 0.5 * (x @ (x.mT @ x))


def _spd_flat(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Affine-invariant metric g_X(v, w) = tr(X^{-1} v X^{-1} w): the covector is X^{-1} v X^{-1}.
    chol = torch.linalg.cholesky(0.5 * (x + x.mT))
    c = torch.cholesky_solve(torch.cholesky_solve(v, chol).mT, chol)
    return 0.5 * (c + c.mT)


def _sphere_geometry(manifold: geoopt.Manifold) -> MetricOperator:
    if getattr(manifold, "projector", None) is not None:
        raise TypeError(
            "IMuon supports geoopt.Sphere without `intersection`/`complement` subspaces only; the "
            "sphere "
            f"{manifold!r} is restricted to a subspace"
        )
    return Sphere()


_RULES: dict[type, ManifoldRule] = {
    geoopt.EuclideanStiefel: ManifoldRule(
        lambda m: Stiefel("embedded"), _identity_flat, "geoopt.EuclideanStiefel (embedded metric)"
    ),
    geoopt.CanonicalStiefel: ManifoldRule(
        lambda m: Stiefel("canonical"),
        _canonical_stiefel_flat,
        "geoopt.CanonicalStiefel (canonical metric; what geoopt.Stiefel() returns)",
        polish=_stiefel_polish,
    ),
    geoopt.SymmetricPositiveDefinite: ManifoldRule(
        lambda m: SPD(), _spd_flat, "geoopt.SymmetricPositiveDefinite (affine-invariant metric)"
    ),
    geoopt.Sphere: ManifoldRule(
        _sphere_geometry, _identity_flat, "geoopt.Sphere (row-wise unit spheres)"
    ),
}


def _register_builtin_grassmann() -> None:
    try:
        from ..manifolds import Grassmann as GrassmannManifold
    except ImportError:  # the geoopt Grassmann manifold is optional for this module
        return
    _RULES.setdefault(
        GrassmannManifold,
        ManifoldRule(
            lambda m: Grassmann("orthonormal"),
            _identity_flat,
            "imuon_manopt.manifolds.Grassmann (orthonormal representatives)",
        ),
    )


_register_builtin_grassmann()


def register_manifold(
    manifold_cls: type,
    geometry: MetricOperator | GeometryFactory,
    flat: FlatMap | None = None,
) -> None:
    """Teach :class:`~imuon_manopt.optim.IMuon` a new geoopt manifold class (or override a built-in
    rule).

    Args:
        manifold_cls: a subclass of ``geoopt.Manifold``; its subclasses inherit the rule unless
            registered themselves.
        geometry: an :class:`imuon_manopt.geometry.MetricOperator` instance for the manifold's
            metric (in the manifold's point representation), or a callable ``manifold ->
            MetricOperator``.
        flat: the metric's lowering map ``(x, v) -> covector`` used to feed transported momentum (a
            tangent vector) back to the iMuon template; default: the identity, right when the
            manifold's metric is the embedded Frobenius metric on its tangent space (``egrad2rgrad``
            is an orthogonal projection).
    """
    if not (isinstance(manifold_cls, type) and issubclass(manifold_cls, geoopt.Manifold)):
        raise TypeError(f"manifold_cls must be a geoopt.Manifold subclass, got {manifold_cls!r}")
    if isinstance(geometry, MetricOperator):
        op = geometry

        def factory(m: geoopt.Manifold) -> MetricOperator:
            return op
    elif callable(geometry):
        factory = geometry
    else:
        raise TypeError(
            "geometry must be an imuon_manopt.geometry.MetricOperator or a callable manifold -> "
            "MetricOperator, "
            f"got {type(geometry).__name__}"
        )
    _RULES[manifold_cls] = ManifoldRule(factory, flat or _identity_flat, manifold_cls.__name__)


def supported_manifolds() -> list[str]:
    """Human-readable names of the manifolds IMuon handles."""
    return (
        ["plain tensors / geoopt.Euclidean (Muon)"]
        + [r.label for r in _RULES.values()]
        + ["fixed-rank factor pairs (B, A) declared with pairs=[...]"]
    )


def is_euclidean(manifold: geoopt.Manifold | None) -> bool:
    """True for plain tensors (``None``) and geoopt's flat ``Euclidean`` manifold."""
    return manifold is None or isinstance(manifold, geoopt.Euclidean)


def lookup(manifold: geoopt.Manifold) -> tuple[ManifoldRule, MetricOperator]:
    """The rule and metric operator of ``manifold``; a ``TypeError`` naming the supported ones."""
    for cls in type(manifold).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule, rule.geometry(manifold)
    names = "; ".join(supported_manifolds())
    raise TypeError(
        "IMuon does not support the manifold "
        f"{type(manifold).__module__}.{type(manifold).__name__} "
        f"({manifold!r}). Supported: {names}. To add a manifold, implement the metric-operator "
        "interface "
        "imuon_manopt.geometry.MetricOperator (at, project, whiten, unwhiten, tangent) for its "
        "metric and "
        "register it with imuon_manopt.optim.register_manifold(ManifoldClass, geometry)."
    )


__all__ = ["ManifoldRule", "is_euclidean", "lookup", "register_manifold", "supported_manifolds"]
