r"""Grassmann manifold ``Gr(n, p)`` for geoopt: p-dimensional linear subspaces of ``R^n``.

Representation (the same as Pymanopt's ``Grassmann``):

- **point**: a tensor ``X`` of shape ``(..., n, p)``, ``p <= n``, with orthonormal columns,
  ``X^T X = I_p``. It is a *representative* of the subspace ``span(X)``; ``X`` and ``X Q`` for any
  orthogonal ``Q`` (p x p) are the same point. Leading dimensions are a batch of independent points.
- **tangent vector**: its horizontal lift at ``X``, a tensor ``U`` of shape ``(..., n, p)`` with
  ``X^T U = 0``. At the representative ``X Q`` the same tangent vector is ``U Q``.
- **metric**: Frobenius, ``<U, V>_X = tr(U^T V)``: the quotient metric of the embedded
  (Euclidean) Stiefel manifold by ``O(p)``.
- **projection** onto the horizontal space (``proju``, ``egrad2rgrad``): ``U - X X^T U``.
- **retraction** (``retr``), chosen with ``Grassmann(retraction=...)``; both span ``X + U``, so
  they are the same map on subspaces and differ only in the representative they return:

  - ``"polar"`` (default): the polar factor of ``X + U`` (thin SVD). It is equivariant,
    ``retr(X Q, U Q) = retr(X, U) Q``, and returns the orthonormal basis nearest to ``X + U``.
    With ``U = W diag(s) V^T`` (thin SVD) it equals ``expmap(X, W diag(arctan s) V^T)``, so it
    agrees with the exponential map to second order. Cost: one thin SVD of an ``n x p`` matrix.
  - ``"qr"``: the Q factor of ``X + U`` with the signs fixed so that ``diag(R) > 0``. Cheaper than
    an SVD, but the representative depends on the column order of ``X`` (not equivariant).

- **exponential map** (``expmap``): exact; with ``U = W diag(s) V^T`` (thin SVD),
  ``Exp_X(U) = X V diag(cos s) V^T + W diag(sin s) V^T``, re-orthonormalized.
- **logarithm** (``logmap``) and **distance** (``dist``): through the principal angles between
  the subspaces; ``dist(X, Y) = ||theta||_2``.
- **vector transport** (``transp``): projection onto the new horizontal space,
  ``T_{X -> Y}(V) = V - Y Y^T V``.

``projx`` maps any full-rank ``(..., n, p)`` tensor to the polar factor of its thin SVD (the
nearest matrix with orthonormal columns), whichever retraction is chosen.

geoopt has no Grassmann manifold; this class is a ``geoopt.Manifold`` (``ndim = 2``), so geoopt's
``ManifoldParameter``, ``RiemannianSGD`` and ``RiemannianAdam`` accept it as they accept
``geoopt.EuclideanStiefel``, and :class:`imuon_manopt.optim.IMuon` dispatches on this class.

Reference: P.-A. Absil, R. Mahony, R. Sepulchre, *Optimization Algorithms on Matrix Manifolds*,
Princeton University Press, 2008, Sec. 3.4.4 and Example 5.4.2; T. Bendokat, R. Zimmermann,
P.-A. Absil, "A Grassmann manifold handbook", Adv. Comput. Math. 50 (2024), Sec. 5.
"""

from __future__ import annotations

import geoopt
import torch
from geoopt.utils import size2shape

__all__ = ["Grassmann"]

_RETRACTIONS = ("polar", "qr")


def _polar(a: torch.Tensor) -> torch.Tensor:
    """Polar factor ``W V^T`` of the thin SVD ``a = W diag(s) V^T`` (batched)."""
    w, _, vh = torch.linalg.svd(a, full_matrices=False)
    return w @ vh


def _qr_positive(a: torch.Tensor) -> torch.Tensor:
    """Q factor of the thin QR of ``a`` with signs fixed so that ``diag(R) >= 0`` (batched)."""
    q, r = torch.linalg.qr(a)
    # sign(d) with sign(0) := +1, so a zero pivot never zeroes a column of Q
    unflip = torch.diagonal(r, dim1=-2, dim2=-1).sign().add(0.5).sign()
    return q * unflip[..., None, :]


class Grassmann(geoopt.Manifold):
    r"""Grassmann manifold of p-dimensional subspaces of ``R^n``, orthonormal representatives.

    Points are ``(..., n, p)`` tensors with orthonormal columns (a basis of the subspace), tangent
    vectors are horizontal ``(..., n, p)`` tensors (``X^T U = 0``), and the metric is Frobenius.
    See the module docstring for the full set of formulas.

    Parameters
    ----------
    retraction : str
        ``"polar"`` (default; equivariant under a change of basis, nearest orthonormal basis to
        ``X + U``) or ``"qr"`` (cheaper, Q factor with a positive-diagonal R). Both retract to the
        subspace ``span(X + U)``.

    Examples
    --------
    >>> import geoopt, torch
    >>> gr = Grassmann()
    >>> x = geoopt.ManifoldParameter(gr.random(10, 3, dtype=torch.float64))
    >>> opt = geoopt.optim.RiemannianSGD([x], lr=1e-2)
    """

    name = "Grassmann"
    ndim = 2
    reversible = False

    def __init__(self, retraction: str = "polar") -> None:
        super().__init__()
        if retraction not in _RETRACTIONS:
            raise ValueError(f"unknown Grassmann retraction {retraction!r}; expected one of {_RETRACTIONS}")
        self.retraction = retraction

    def extra_repr(self) -> str:
        return f"retraction={self.retraction}"

    # ------------------------------------------------------------------ checks

    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        ok, reason = super()._check_shape(shape, name)
        if not ok:
            return False, reason
        n, p = shape[-2], shape[-1]
        if p > n:
            return False, (
                f"`{name}` should have shape (..., n, p) with p <= n (a p-dimensional subspace "
                f"of R^n), got shape {tuple(shape)} with p={p} > n={n}"
            )
        return True, None

    def _check_point_on_manifold(
        self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        if not bool(torch.isfinite(x).all()):
            return False, "`X` has non-finite entries (nan or inf)"
        xtx = x.mT @ x
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        if not torch.allclose(xtx, eye.expand_as(xtx), atol=atol, rtol=rtol):
            err = (xtx - eye).abs().max().item()
            return False, (
                f"columns of `X` are not orthonormal: max |X^T X - I| = {err:.3e} exceeds "
                f"atol={atol}, rtol={rtol}; map a full-rank matrix onto the manifold with "
                "`projx`"
            )
        return True, None

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        if u.shape[-2:] != x.shape[-2:]:
            return False, (
                f"`u` should have the point's trailing shape {tuple(x.shape[-2:])}, got {tuple(u.shape[-2:])}"
            )
        if not bool(torch.isfinite(u).all()):
            return False, "`u` has non-finite entries (nan or inf)"
        err = (x.mT @ u).abs().max().item() if u.numel() else 0.0
        scale = u.abs().max().item() if u.numel() else 0.0
        if err > atol + rtol * scale:
            return False, (
                f"`u` is not horizontal at `X`: max |X^T u| = {err:.3e} exceeds "
                f"atol + rtol * max|u| = {atol + rtol * scale:.3e} (atol={atol}, rtol={rtol}); "
                "project it with `proju`"
            )
        return True, None

    # ------------------------------------------------------------- metric

    def inner(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        keepdim: bool = False,
    ) -> torch.Tensor:
        """Frobenius inner product ``tr(u^T v)`` of horizontal vectors, summed over the last two
        dims (kept as size-1 dims with ``keepdim=True``)."""
        if v is None:
            v = u
        return (u * v).sum(dim=(-1, -2), keepdim=keepdim)

    def component_inner(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """One inner product per point, shape ``(..., 1, 1)``.

        ``RiemannianAdam`` keeps its second moment from this. Per-entry products would depend on
        the basis chosen for the subspace; a scalar per point does not.
        """
        return self.inner(x, u, v, keepdim=True)

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """Frobenius norm of a horizontal vector."""
        return torch.linalg.matrix_norm(u, keepdim=keepdim)

    # -------------------------------------------------------- projections

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection onto the horizontal space at ``x``: ``u - x x^T u``."""
        return u - x @ (x.mT @ u)

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Riemannian gradient from a Euclidean one: the horizontal projection ``u - x x^T u``."""
        return self.proju(x, u)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest matrix with orthonormal columns (polar factor of the thin SVD).

        For a full-rank ``x`` it spans the same subspace as ``x``.
        """
        return _polar(x)

    # ------------------------------------------------- retraction, exp, log

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Retraction to ``span(x + u)``: polar or sign-fixed QR factor (see the class)."""
        if self.retraction == "qr":
            return _qr_positive(x + u)
        return _polar(x + u)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Exact exponential map ``x V cos(S) V^T + W sin(S) V^T`` with ``u = W S V^T``.

        ``u`` must be horizontal at ``x``. The result is re-orthonormalized (sign-fixed QR, which
        changes it only at rounding level).
        """
        w, s, vh = torch.linalg.svd(u, full_matrices=False)
        y = (x @ vh.mT) * torch.cos(s)[..., None, :] + w * torch.sin(s)[..., None, :]
        return _qr_positive(y @ vh)

    def _log_parts(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Principal angles ``theta`` (..., p), their sines, and ``W``, ``R^T`` with
        ``Log_x(y) = W diag(theta / sin theta) R^T``.

        ``y^T x = Q diag(c) R^T`` (SVD) aligns ``y`` to ``y Q``; ``W = (I - x x^T) y Q`` has
        orthogonal columns of norms ``sin theta``, and ``theta = atan2(sin, cos)`` is accurate
        for small and large angles alike.
        """
        q, c, rh = torch.linalg.svd(y.mT @ x)
        yq = y @ q
        w = yq - x @ (x.mT @ yq)
        sin = torch.linalg.vector_norm(w, dim=-2)
        theta = torch.atan2(sin, c)
        return theta, sin, w, rh

    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Logarithm: the horizontal ``u`` at ``x`` of least norm with ``span(Exp_x(u)) = span(y)``.

        Independent of the representative of ``y``. Unique while every principal angle is below
        ``pi / 2``; at ``pi / 2`` (cut locus) one of the minimizers is returned.
        """
        theta, sin, w, rh = self._log_parts(x, y)
        positive = sin > 0
        ratio = torch.where(positive, theta / torch.where(positive, sin, 1), 1)
        return (w * ratio[..., None, :]) @ rh

    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """Geodesic distance ``||theta||_2`` (principal angles between ``span(x)`` and
        ``span(y)``); ``keepdim=True`` keeps two size-1 trailing dims."""
        theta = self._log_parts(x, y)[0]
        d = torch.linalg.vector_norm(theta, dim=-1)
        return d[..., None, None] if keepdim else d

    def dist2(self, x: torch.Tensor, y: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """Squared geodesic distance ``sum(theta**2)``."""
        theta = self._log_parts(x, y)[0]
        d2 = (theta * theta).sum(dim=-1)
        return d2[..., None, None] if keepdim else d2

    # ----------------------------------------------------------- transport

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Vector transport by projection onto the horizontal space at ``y``."""
        return self.proju(y, v)

    def retr_transp(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y = retr(x, u)`` and ``v`` transported to ``y``."""
        y = self.retr(x, u)
        return y, self.transp(x, y, v)

    def expmap_transp(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y = expmap(x, u)`` and ``v`` transported (by projection) to ``y``."""
        y = self.expmap(x, u)
        return y, self.transp(x, y, v)

    def transp_follow_retr(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Transport ``v`` from ``x`` to ``retr(x, u)``."""
        return self.retr_transp(x, u, v)[1]

    def transp_follow_expmap(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Transport ``v`` from ``x`` to ``expmap(x, u)``."""
        return self.expmap_transp(x, u, v)[1]

    # ------------------------------------------------------------ sampling

    def random_naive(
        self,
        *size: int | tuple[int, ...],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> geoopt.ManifoldTensor:
        """Random point(s) of shape ``size = (..., n, p)``: the Q factor (positive-diagonal R) of
        a standard Gaussian matrix.

        The subspace it spans is uniformly (O(n)-invariantly) distributed on ``Gr(n, p)``.
        """
        shape = size2shape(*size)
        self._assert_check_shape(shape, "x")
        gauss = torch.randn(shape, dtype=dtype, device=device, generator=generator)
        return geoopt.ManifoldTensor(_qr_positive(gauss), manifold=self)

    random = random_naive

    def origin(
        self,
        *size: int | tuple[int, ...],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        seed: int | None = 42,
    ) -> geoopt.ManifoldTensor:
        """The span of the first ``p`` coordinate vectors, ``[I_p; 0]``, of shape ``(..., n, p)``.

        ``seed`` is accepted for geoopt compatibility and ignored.
        """
        shape = size2shape(*size)
        self._assert_check_shape(shape, "x")
        n, p = shape[-2], shape[-1]
        eye = torch.eye(n, p, dtype=dtype, device=device).expand(shape).clone()
        return geoopt.ManifoldTensor(eye, manifold=self)
