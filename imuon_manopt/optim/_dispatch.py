"""geoopt manifold classes -> iMuon metric operators.

Dispatch is on the *concrete* class of ``ManifoldParameter.manifold`` (walking its MRO, so geoopt's ``...Exact``
variants inherit their parent's rule): ``geoopt.Stiefel()`` returns a ``CanonicalStiefel``, whose canonical metric
gives a different iMuon direction than ``EuclideanStiefel`` (spec §2).

A rule says which :class:`imuon_manopt.geometry.MetricOperator` describes the manifold's metric (in geoopt's point
representation) and how to translate between the two libraries' representations; it holds no metric formula. The
metric's lowering map (tangent vector -> covector) is the geometry's own :meth:`MetricOperator.flat`.

``covector_update``
    geoopt's ``retr`` / ``retr_transp`` / ``proju`` of the manifold take a *Euclidean covector*, not a tangent vector:
    ``CanonicalStiefel``'s Cayley retraction moves along ``proju(u) = u - X u^T X``, which for a tangent ``u = X Omega
    + K`` is ``2 X Omega + K``. The optimizer hands such a manifold ``flat(xi)`` (for which ``proju(flat(xi)) = xi``),
    so the retraction moves along ``xi`` and transports the momentum along the same curve.
``matrix_shape``
    the ``(a, b)`` shape a step lives in, for ``adjust_lr_fn``: the trailing two dims, or ``(n, 1)`` for row-wise
    spheres whatever the batch.
``polish``
    an optional map applied after the retraction (one Newton–Schulz step back to orthonormality for the Cayley
    retraction, which is orthogonal only in exact arithmetic).
``verify``
    the new point is factorized by the geometry's ``at`` before it is committed (SPD: its Cholesky factor), so that
    a retraction that lost definiteness to rounding (an eigenvalue near the dtype's resolution) fails the step,
    through the ``nonfinite`` policy, instead of leaving the manifold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import geoopt
import torch

from ..geometry import SPD, Grassmann, MetricOperator, Sphere, Stiefel
from ..manifolds import Grassmann as GrassmannManifold

GeometryFactory = Callable[[geoopt.Manifold], MetricOperator]


def _trailing_shape(shape: torch.Size) -> tuple[int, int]:
    return (shape[-2], shape[-1]) if len(shape) >= 2 else (shape[-1], 1)


def _column_shape(shape: torch.Size) -> tuple[int, int]:
    return (shape[-1], 1)


@dataclass(frozen=True)
class ManifoldRule:
    """How :class:`~imuon_manopt.optim.IMuon` treats parameters on one geoopt manifold class."""

    geometry: GeometryFactory
    label: str
    covector_update: bool = False
    matrix_shape: Callable[[torch.Size], tuple[int, int]] = _trailing_shape
    polish: Callable[[torch.Tensor], torch.Tensor] | None = None
    verify: bool = False


def _stiefel_polish(x: torch.Tensor) -> torch.Tensor:
    # One Newton-Schulz step towards the polar factor, X (3 I - X^T X) / 2: removes the O(eps) orthonormality error
    # the Cayley retraction accumulates over many steps. It moves X by O(||X^T X - I||), i.e. by rounding error.
    return 1.5 * x - 0.5 * (x @ (x.mT @ x))


def _sphere_geometry(manifold: geoopt.Manifold) -> MetricOperator:
    if getattr(manifold, "projector", None) is not None:
        raise TypeError(
            "IMuon supports geoopt.Sphere without `intersection`/`complement` subspaces only; the sphere "
            f"{manifold!r} is restricted to a subspace"
        )
    return Sphere()


_RULES: dict[type, ManifoldRule] = {
    geoopt.EuclideanStiefel: ManifoldRule(lambda m: Stiefel("embedded"), "geoopt.EuclideanStiefel (embedded metric)"),
    geoopt.CanonicalStiefel: ManifoldRule(
        lambda m: Stiefel("canonical"),
        "geoopt.CanonicalStiefel (canonical metric; what geoopt.Stiefel() returns)",
        covector_update=True,
        polish=_stiefel_polish,
    ),
    geoopt.SymmetricPositiveDefinite: ManifoldRule(
        lambda m: SPD(), "geoopt.SymmetricPositiveDefinite (affine-invariant metric)", verify=True
    ),
    geoopt.Sphere: ManifoldRule(_sphere_geometry, "geoopt.Sphere (row-wise unit spheres)", matrix_shape=_column_shape),
    GrassmannManifold: ManifoldRule(
        lambda m: Grassmann("orthonormal"), "imuon_manopt.manifolds.Grassmann (orthonormal representatives)"
    ),
}


def register_manifold(
    manifold_cls: type,
    geometry: MetricOperator | GeometryFactory,
) -> None:
    """Teach :class:`~imuon_manopt.optim.IMuon` a new geoopt manifold class (or override a built-in rule).

    Args:
        manifold_cls: a subclass of ``geoopt.Manifold``; its subclasses inherit the rule unless registered themselves.
        geometry: an :class:`imuon_manopt.geometry.MetricOperator` instance for the manifold's metric (in the
            manifold's point representation), or a callable ``manifold -> MetricOperator``. Its ``flat`` (the metric's
            lowering map) turns transported momentum back into a covector, and its ``at`` / ``project`` /
            ``tangent`` must accept a leading batch dimension (parameters of one shape are stepped together).
    """
    if not (isinstance(manifold_cls, type) and issubclass(manifold_cls, geoopt.Manifold)):
        raise TypeError(f"manifold_cls must be a geoopt.Manifold subclass, got {manifold_cls!r}")
    factory: Callable[[geoopt.Manifold], MetricOperator]
    if isinstance(geometry, MetricOperator):
        op = geometry

        def factory(m: geoopt.Manifold) -> MetricOperator:
            return op
    elif callable(geometry):
        factory = geometry
    else:
        raise TypeError(
            "geometry must be an imuon_manopt.geometry.MetricOperator or a callable manifold -> MetricOperator, "
            f"got {type(geometry).__name__}"
        )
    _RULES[manifold_cls] = ManifoldRule(factory, manifold_cls.__name__)


def supported_manifolds() -> list[str]:
    """Human-readable names of the manifolds IMuon handles."""
    return (
        ["plain tensors / geoopt.Euclidean (Muon)"]
        + [r.label for r in _RULES.values()]
        + ["fixed-rank factor pairs (B, A) declared with pairs=[...]"]
    )


def manifold_of(p: torch.Tensor) -> Any:
    """The manifold ``p`` carries: geoopt's ``ManifoldParameter.manifold``, or one set by hand on a sharded
    parameter (:func:`~imuon_manopt.optim.keep_manifolds`); ``None`` for a plain tensor."""
    return getattr(p, "manifold", None)


def is_euclidean(manifold: geoopt.Manifold | None) -> bool:
    """True for plain tensors (``None``) and geoopt's flat ``Euclidean`` manifold."""
    return manifold is None or isinstance(manifold, geoopt.Euclidean)


def batch_key(manifold: geoopt.Manifold) -> Any:
    """Parameters whose manifolds have equal keys may be stepped as one batch: the class and its plain settings;
    a manifold holding tensors (e.g. a curvature) is keyed by identity."""
    if any(True for _ in manifold.parameters()) or any(True for _ in manifold.buffers()):
        return ("instance", id(manifold))
    simple = tuple(sorted((k, repr(v)) for k, v in vars(manifold).items() if not k.startswith("_") and k != "training"))
    return (type(manifold), simple)


def lookup(manifold: geoopt.Manifold) -> tuple[ManifoldRule, MetricOperator]:
    """The rule and metric operator of ``manifold``; a ``TypeError`` naming the supported ones."""
    for cls in type(manifold).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule, rule.geometry(manifold)
    names = "; ".join(supported_manifolds())
    raise TypeError(
        f"IMuon does not support the manifold {type(manifold).__module__}.{type(manifold).__name__} "
        f"({manifold!r}). Supported: {names}. To add a manifold, subclass "
        "imuon_manopt.geometry.MetricOperator for its metric (the contract: help(MetricOperator)) and register it "
        "with imuon_manopt.optim.register_manifold(ManifoldClass, geometry)."
    )


__all__ = ["ManifoldRule", "batch_key", "is_euclidean", "lookup", "register_manifold", "supported_manifolds"]
