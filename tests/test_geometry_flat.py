"""The metric's lowering map ``flat``: ``<flat(v), w>_F = g_x(v, w)`` against closed-form metrics, and the
direction from ``flat(grad f)`` equals the direction from the Euclidean gradient (spec §1, step 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imuon_manopt.direction import intrinsic_direction
from imuon_manopt.geometry import (
    SPD,
    AmbientFixedRank,
    Euclidean,
    FixedRank,
    Grassmann,
    Product,
    Sphere,
    Stiefel,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _stiefel_point(rng, n, p):
    return np.linalg.qr(rng.standard_normal((n, p)))[0]


def _stiefel_tangent(rng, x):
    n, p = x.shape
    om = rng.standard_normal((p, p))
    k = rng.standard_normal((n, p))
    k -= x @ (x.T @ k)
    return x @ (om - om.T) + k


def _spd_point(rng, n):
    a = rng.standard_normal((n, n))
    return a @ a.T + n * np.eye(n)


def _sym(a):
    return 0.5 * (a + a.T)


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _inner(c, w):
    if isinstance(c, (list, tuple)):
        return sum(_inner(ci, wi) for ci, wi in zip(c, w))
    return float((np.asarray(c) * np.asarray(w)).sum())


def _flat(geometry, x, v):
    state = geometry.at(_t(x) if not isinstance(x, tuple) else tuple(_t(t) for t in x))
    vt = _t(v) if not isinstance(v, tuple) else tuple(_t(t) for t in v)
    out = geometry.flat(state, vt)
    return tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()


def _cases():
    rng = _rng(1)
    x = _stiefel_point(rng, 7, 3)
    v, w = _stiefel_tangent(rng, x), _stiefel_tangent(rng, x)
    yield "stiefel-embedded", Stiefel("embedded"), x, v, w, float(np.trace(v.T @ w))
    yield "stiefel-canonical", Stiefel("canonical"), x, v, w, float(np.trace(v.T @ (np.eye(7) - 0.5 * x @ x.T) @ w))

    y = rng.standard_normal((6, 2))
    s = y.T @ y
    proj = np.eye(6) - y @ np.linalg.solve(s, y.T)
    v, w = proj @ rng.standard_normal((6, 2)), proj @ rng.standard_normal((6, 2))
    yield "grassmann-general", Grassmann("general"), y, v, w, float(np.trace(np.linalg.solve(s, v.T @ w)))
    q = np.linalg.qr(y)[0]
    v, w = (np.eye(6) - q @ q.T) @ v, (np.eye(6) - q @ q.T) @ w
    yield "grassmann-orthonormal", Grassmann(), q, v, w, float(np.trace(v.T @ w))

    x = _spd_point(rng, 5)
    v, w = _sym(rng.standard_normal((5, 5))), _sym(rng.standard_normal((5, 5)))
    xi = np.linalg.inv(x)
    yield "spd", SPD(), x, v, w, float(np.trace(xi @ v @ xi @ w))

    b, a = rng.standard_normal((8, 3)), rng.standard_normal((3, 6))
    vb, va, wb, wa = (rng.standard_normal(s) for s in ((8, 3), (3, 6), (8, 3), (3, 6)))
    sa, sb = a @ a.T, b.T @ b
    g = float(np.trace(sa @ vb.T @ wb) + np.trace(sb @ va @ wa.T))
    for fac in ("qr", "gram"):
        yield f"fixed-rank-{fac}", FixedRank(fac), (b, a), (vb, va), (wb, wa), g

    x = rng.standard_normal((4, 5))
    v = rng.standard_normal((4, 5))
    w = rng.standard_normal((4, 5))
    yield "euclidean", Euclidean(), x, v, w, float((v * w).sum())
    u = rng.standard_normal(5)
    u /= np.linalg.norm(u)
    v = rng.standard_normal(5)
    v -= u * (u @ v)
    w = rng.standard_normal(5)
    w -= u * (u @ w)
    yield "sphere", Sphere(), u, v, w, float(v @ w)


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flat_lowers_with_the_metric(case):
    _, geometry, x, v, w, g_vw = case
    assert _inner(_flat(geometry, x, v), w) == pytest.approx(g_vw, rel=1e-10, abs=1e-12)


def test_flat_of_product_is_per_factor():
    rng = _rng(2)
    x = _stiefel_point(rng, 6, 2)
    v = _stiefel_tangent(rng, x)
    s = _spd_point(rng, 3)
    u = _sym(rng.standard_normal((3, 3)))
    geometry = Product([Stiefel("canonical"), SPD()])
    state = geometry.at([_t(x), _t(s)])
    out = geometry.flat(state, [_t(v), _t(u)])
    np.testing.assert_allclose(out[0].numpy(), v - 0.5 * x @ (x.T @ v), atol=1e-13)
    si = np.linalg.inv(s)
    np.testing.assert_allclose(out[1].numpy(), si @ u @ si, atol=1e-12)


def _rgrad_cases():
    """(geometry, x, E, Riemannian gradient from closed forms independent of the geometry code)."""
    rng = _rng(3)
    x = _stiefel_point(rng, 7, 3)
    e = rng.standard_normal((7, 3))
    yield "stiefel-canonical", Stiefel("canonical"), x, e, e - x @ e.T @ x
    yield "stiefel-embedded", Stiefel(), x, e, e - x @ _sym(x.T @ e)
    s = _spd_point(rng, 4)
    e = rng.standard_normal((4, 4))
    yield "spd", SPD(), s, e, s @ _sym(e) @ s
    y = rng.standard_normal((6, 2))
    e = rng.standard_normal((6, 2))
    st = y.T @ y
    pi_e = e - y @ np.linalg.solve(st, y.T @ e)
    yield "grassmann-general", Grassmann("general"), y, e, pi_e @ st
    b, a = rng.standard_normal((8, 3)), rng.standard_normal((3, 6))
    eb, ea = rng.standard_normal((8, 3)), rng.standard_normal((3, 6))
    yield "fixed-rank", FixedRank(), (b, a), (eb, ea), (eb @ np.linalg.inv(a @ a.T), np.linalg.solve(b.T @ b, ea))


RGRAD = list(_rgrad_cases())


@pytest.mark.parametrize("case", RGRAD, ids=[c[0] for c in RGRAD])
@pytest.mark.parametrize("norm", ["spectral", "frobenius", "nuclear"])
def test_direction_of_flat_riemannian_gradient_equals_euclidean(case, norm):
    _, geometry, x, e, rgrad = case
    c = _flat(geometry, x, rgrad)
    xi_e = intrinsic_direction(geometry, x, e, norm).xi
    xi_c = intrinsic_direction(geometry, x, c, norm).xi
    if isinstance(xi_e, (list, tuple)):
        for a, b in zip(xi_e, xi_c):
            np.testing.assert_allclose(b, a, atol=1e-10)
    else:
        np.testing.assert_allclose(xi_c, xi_e, atol=1e-10)


def test_ambient_fixed_rank_matches_its_formula():
    rng = _rng(4)
    b, a = rng.standard_normal((9, 3)), rng.standard_normal((3, 7))
    eb, ea = rng.standard_normal((9, 3)), rng.standard_normal((3, 7))
    m = eb @ a + b @ ea  # the ambient momentum, formed here only as a reference
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)

    def polar(h):
        u, _, vt = np.linalg.svd(h, full_matrices=False)
        return u @ vt

    xi_b_ref = polar(m @ qa) @ np.linalg.inv(ra).T
    xi_a_ref = np.linalg.solve(rb, polar(qb.T @ m))
    xi_b, xi_a = intrinsic_direction(AmbientFixedRank(), (b, a), (eb, ea)).xi
    np.testing.assert_allclose(xi_b, xi_b_ref, atol=1e-10)
    np.testing.assert_allclose(xi_a, xi_a_ref, atol=1e-10)


def test_fixed_rank_rejects_rank_zero_and_unchecked_mode_does_not_sync_raise():
    with pytest.raises(ValueError, match="rank r = 0"):
        FixedRank().at((torch.zeros(8, 0), torch.zeros(0, 5)))
    b = torch.zeros(6, 2, dtype=torch.float64)
    a = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="rank-deficient"):
        FixedRank().at((b, a))
    FixedRank(check=False).at((b, a))  # no error: the caller detects non-finite directions
