"""The core's rank cut, precision and non-finite handling (polar, msign, lmo, intrinsic_direction, geometry ``at``).

Truths: tangency (``sym(X^T xi) = 0`` on Stiefel, ``X^T xi = 0`` on Grassmann), continuity in the gradient (a
1-ulp perturbation moves the direction by rounding only), the exact polar factor of a rank-1 matrix and of a vector
(its normalization), and scale invariance of the direction (a huge gradient gives the direction of a moderate one).
"""

from __future__ import annotations

import math

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
from imuon_manopt.lmo import dual_norm, lmo
from imuon_manopt.polar import msign, polar

# (n, p) with n < 2p (the complement block's rank n - p is below its width p) and a few with n >= 2p.
SHAPES = [(3, 2), (4, 3), (5, 3), (6, 4), (7, 4), (8, 5), (5, 5), (6, 3), (9, 2)]
FRAME_GEOMETRIES = [Stiefel("embedded"), Stiefel("canonical"), Grassmann("orthonormal"), Grassmann("general")]


def _point(rng, geometry, n, p):
    x = np.linalg.qr(rng.standard_normal((n, p)))[0]
    if isinstance(geometry, Grassmann) and geometry.representative == "general":
        x = x @ (np.eye(p) + 0.3 * rng.standard_normal((p, p)))
    return torch.from_numpy(x)


def _tangency_error(geometry, x, xi):
    if isinstance(geometry, Stiefel):
        a = x.mT @ xi
        return float((a + a.mT).abs().max())
    return float((x.mT @ xi).abs().max())


@pytest.mark.parametrize("geometry", FRAME_GEOMETRIES, ids=repr)
@pytest.mark.parametrize("n,p", SHAPES)
def test_svd_direction_is_tangent_for_every_shape(geometry, n, p):
    # Before the rank bound, St(3, 2) gave |sym(X^T xi)| up to 0.97 for about one gradient in six: a rounding-noise
    # singular value of (I - X X^T) E passed the relative cut and was mapped to 1.
    rng = np.random.default_rng(100 * n + p)
    worst = 0.0
    for _ in range(60):
        x = _point(rng, geometry, n, p)
        e = torch.from_numpy(rng.standard_normal((n, p)))
        xi = intrinsic_direction(geometry, x, e).xi
        worst = max(worst, _tangency_error(geometry, x, xi))
    assert worst < 1e-12


@pytest.mark.parametrize("polar_method", ["svd", "newton_schulz"])
@pytest.mark.parametrize("geometry", FRAME_GEOMETRIES[::2], ids=repr)
@pytest.mark.parametrize("n,p", [(3, 2), (6, 4), (5, 3), (7, 4)])
def test_direction_is_continuous_in_the_gradient(geometry, n, p, polar_method):
    # A 1-ulp change of every gradient entry may move the direction only by rounding, and a few steps
    # (QR retraction) from the same start stay together.
    rng = np.random.default_rng(7 * n + p)
    worst = 0.0
    for _ in range(15):
        x0 = _point(rng, geometry, n, p)
        e = rng.standard_normal((n, p))
        e1 = np.nextafter(e, np.inf)
        for_e = [x0, x0]
        for _step in range(6):
            xis = [
                intrinsic_direction(geometry, xk, torch.from_numpy(g), polar=polar_method).xi
                for xk, g in zip(for_e, (e, e1))
            ]
            for_e = [torch.linalg.qr(xk - 0.1 * xi)[0] for xk, xi in zip(for_e, xis)]
        worst = max(worst, float((for_e[0] - for_e[1]).abs().max()))
    assert worst < 1e-10


def test_polar_rank_bound_and_eps_options():
    rng = np.random.default_rng(3)
    u = np.linalg.qr(rng.standard_normal((6, 2)))[0]
    v = np.linalg.qr(rng.standard_normal((4, 2)))[0]
    x = u @ np.diag([3.0, 1e-3]) @ v.T
    # rank=1 keeps the top singular pair only; eps=1e-2 drops the second value by the cut
    np.testing.assert_allclose(polar(x, rank=1), np.outer(u[:, 0], v[:, 0]), atol=1e-12)
    np.testing.assert_allclose(polar(x, eps=1e-2), np.outer(u[:, 0], v[:, 0]), atol=1e-12)
    np.testing.assert_allclose(polar(x), u @ v.T, atol=1e-12)
    assert np.all(polar(x, rank=0) == 0)
    z, d = lmo(x, rank=1, return_dual=True)
    np.testing.assert_allclose(z, np.outer(u[:, 0], v[:, 0]), atol=1e-12)
    assert d == pytest.approx(3.0 + 1e-3)  # the dual is over all singular values
    s = u[:4] @ np.diag([2.0, -1e-3]) @ u[:4].T
    w = np.linalg.eigh(s)[1][:, -1]
    np.testing.assert_allclose(msign(s, rank=1), np.outer(w, w), atol=1e-10)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="rank"):
            polar(x, rank=bad)
    with pytest.raises(ValueError, match="eps"):
        lmo(x, eps=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rank_cut_follows_the_input_precision(dtype):
    # A rank-1 bfloat16 matrix had polar singular values [1.002, 1.001, 1.001, 1.0]: the float32 cut kept the
    # bfloat16 rounding noise. Its polar factor is the rank-1 u v^T / (|u| |v|).
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(4, 1, generator=g), torch.randn(1, 4, generator=g)
    x = (u @ v).to(dtype)
    truth = (u @ v) / (u.norm() * v.norm())
    for out in (polar(x), lmo(x), intrinsic_direction(Euclidean(), x, x).xi):
        sv = torch.linalg.svdvals(out.float())
        assert sv[0] == pytest.approx(1.0, abs=2e-2)
        assert float(sv[1]) < 2e-2
        torch.testing.assert_close(out.float(), truth, atol=2e-2, rtol=0)
    s = (u @ u.mT).to(dtype)
    sv = torch.linalg.svdvals(msign(s).float())
    assert float(sv[1]) < 2e-2
    # float32 input: the float32 cut, so a genuine small singular value survives
    x32 = (u @ v) + 1e-4 * torch.randn(4, 4, generator=g)
    assert float(torch.linalg.svdvals(polar(x32))[-1]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_vector_polar_factor_is_its_normalization(method):
    # The polar factor of a vector is v / |v| exactly; Newton–Schulz used to return about 0.88 v / |v|.
    g = torch.Generator().manual_seed(1)
    for shape in [(128, 1), (1, 50), (3, 7, 1)]:
        v = torch.randn(*shape, generator=g)
        truth = v / torch.linalg.vector_norm(v, dim=(-2, -1), keepdim=True)
        torch.testing.assert_close(polar(v, method=method), truth, atol=1e-6, rtol=0)
        z, d = lmo(v, method=method, return_dual=True)
        torch.testing.assert_close(z, truth, atol=1e-6, rtol=0)
        torch.testing.assert_close(d, torch.linalg.vector_norm(v, dim=(-2, -1)), rtol=1e-6, atol=0)
        for norm in ("frobenius", "nuclear", ("schatten", 3.0), ("kyfan", 2), ("fmuon", 0.5)):
            torch.testing.assert_close(lmo(v, norm), truth, atol=1e-6, rtol=0)
    assert torch.all(polar(torch.zeros(5, 1), method=method) == 0)
    x = torch.nn.functional.normalize(torch.randn(128, generator=g), dim=0)
    e = torch.randn(128, generator=g)
    xi = intrinsic_direction(Sphere(), x, e, polar=method).xi
    assert float(xi.norm()) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(x @ xi)) < 1e-6


def _geometry_cases(rng):
    st = torch.from_numpy(np.linalg.qr(rng.standard_normal((5, 3)))[0]).float()
    a = rng.standard_normal((4, 4))
    spd = torch.from_numpy(a @ a.T + 4 * np.eye(4)).float()
    b, f = torch.from_numpy(rng.standard_normal((6, 2))).float(), torch.from_numpy(rng.standard_normal((2, 5))).float()
    sphere = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal(6)).float(), dim=0)
    yield Stiefel(), st
    yield Stiefel("canonical"), st
    yield Grassmann(), st
    yield Grassmann("general"), 3.0 * st
    yield SPD(), spd
    yield Sphere(), sphere
    yield Euclidean(), torch.zeros(4, 3)
    yield FixedRank(), (b, f)
    yield AmbientFixedRank(), (b, f)
    yield Product([Stiefel(), SPD()]), [st, spd]


def _like(x, fn):
    if isinstance(x, (list, tuple)):
        return type(x)(_like(t, fn) for t in x)
    return fn(x)


def _all_finite(x):
    if isinstance(x, (list, tuple)):
        return all(_all_finite(t) for t in x)
    return bool(torch.isfinite(x).all())


def _any_nonfinite(x):
    if isinstance(x, (list, tuple)):
        return any(_any_nonfinite(t) for t in x)
    return not bool(torch.isfinite(x).all())


@pytest.mark.parametrize("polar_method", ["svd", "newton_schulz"])
def test_huge_finite_gradient_gives_the_moderate_gradients_direction(polar_method):
    # A finite 2e38 float32 gradient raised torch's _LinAlgError (Grassmann, SPD, polar="svd") or overflowed.
    rng = np.random.default_rng(5)
    for geometry, x in _geometry_cases(rng):
        signs = _like(x, lambda t: torch.from_numpy(np.sign(rng.standard_normal(tuple(t.shape)))).float())
        huge = _like(signs, lambda t: t * 2e38)
        mild = _like(signs, lambda t: t * 2.0)
        d_huge = intrinsic_direction(geometry, x, huge, polar=polar_method)
        d_mild = intrinsic_direction(geometry, x, mild, polar=polar_method)
        assert _all_finite(d_huge.xi), geometry
        flat_h = torch.cat([t.reshape(-1) for t in (d_huge.xi if isinstance(x, (list, tuple)) else [d_huge.xi])])
        flat_m = torch.cat([t.reshape(-1) for t in (d_mild.xi if isinstance(x, (list, tuple)) else [d_mild.xi])])
        torch.testing.assert_close(flat_h, flat_m, atol=1e-4, rtol=1e-4)
        # the gap scales with the gradient (it may exceed float32's range: then it is +inf, never NaN)
        gap = float(d_huge.gap)
        assert gap == float("inf") or gap == pytest.approx(float(d_mild.gap) * 1e38, rel=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("polar_method", ["svd", "newton_schulz"])
def test_nonfinite_gradient_gives_nonfinite_direction_not_a_solver_error(bad, polar_method):
    rng = np.random.default_rng(6)
    for geometry, x in _geometry_cases(rng):
        e = _like(x, lambda t: torch.from_numpy(rng.standard_normal(tuple(t.shape))).float())
        leaf = e[0] if isinstance(e, (list, tuple)) else e
        leaf.view(-1)[0] = bad
        d = intrinsic_direction(geometry, x, e, polar=polar_method)
        assert _any_nonfinite(d.xi) or not np.isfinite(float(d.gap)), geometry


def test_nonfinite_matrices_in_a_batch_give_nan_and_leave_the_others_exact():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 5, 4))
    x[1, 2, 2] = np.nan
    x[2, 0, 0] = np.inf
    ref = polar(x[0])
    for fn in (polar, lambda t: lmo(t, "nuclear"), lambda t: lmo(t, ("schatten", 3.0))):
        out = fn(x)
        assert np.isnan(out[1]).all() and np.isnan(out[2]).all()
        assert np.isfinite(out[0]).all()
    np.testing.assert_allclose(polar(x)[0], ref, atol=1e-14)
    s = x[:, :4, :4] + np.swapaxes(x[:, :4, :4], -1, -2)
    out = msign(s)
    assert np.isnan(out[1]).all() and np.isfinite(out[0]).all()
    d = dual_norm(x)
    assert np.isfinite(d[0]) and np.isnan(d[1])
    assert np.isnan(dual_norm(s, symmetric=True)[1])


def test_huge_points_factor_without_overflow():
    rng = np.random.default_rng(9)
    y = torch.from_numpy(rng.standard_normal((5, 2))).float()
    e = torch.from_numpy(rng.standard_normal((5, 2))).float()
    # Grassmann's direction at c Y for the same E is c times the one at Y (the horizontal block scales with Y)
    d1 = intrinsic_direction(Grassmann("general"), y * 1e30, e)
    d0 = intrinsic_direction(Grassmann("general"), y, e)
    torch.testing.assert_close(d1.xi / 1e30, d0.xi, atol=1e-5, rtol=1e-5)
    spd = torch.diag(torch.tensor([3e38, 1e38, 2e38]))
    d = intrinsic_direction(SPD(), spd, torch.eye(3))
    assert _all_finite(d.xi)
    for geometry, point in ((Grassmann("general"), y * np.nan), (SPD(), spd * np.nan)):
        with pytest.raises(ValueError, match="NaN or infinite"):
            intrinsic_direction(geometry, point, torch.ones_like(point))


def test_half_precision_cut_keeps_resolvable_directions_of_large_matrices():
    # The input-precision cut is eps_in * s_max, not eps_in * max(m, n) * s_max (which exceeds s_max from n = 128
    # on in bfloat16 and would drop every direction).
    g = torch.Generator().manual_seed(4)
    for m, n in [(256, 256), (1024, 64)]:
        q1 = torch.linalg.qr(torch.randn(m, 8, generator=g))[0]
        q2 = torch.linalg.qr(torch.randn(n, 8, generator=g))[0]
        x = (q1 * torch.linspace(1.0, 0.05, 8)) @ q2.mT
        out = polar(x.bfloat16()).float()
        sv = torch.linalg.svdvals(out)
        assert float(sv[7]) > 0.9 and float(sv[8]) < 0.05
        torch.testing.assert_close(out, q1 @ q2.mT, atol=0.02, rtol=0)


@pytest.mark.parametrize("host", [True, False])
def test_gradient_prescaling_is_exact_and_leaves_ordinary_gradients_alone(host):
    # Both ways of computing the scale (read on the host; on the device without synchronization) agree: a power
    # of two, 1 when the largest entry is in [2^-63, 2^103] (float32), which it is moved into otherwise.
    from imuon_manopt.direction import _prescale

    for value, in_range in ((3.0, True), (1e30, True), (0.0, True), (2e38, False), (3e-30, False)):
        t = torch.tensor([[value, -0.5 * value], [0.25 * value, 0.0]])
        out, inv = _prescale(t, host=host)
        inv = float(inv)
        assert math.frexp(inv)[0] == 0.5  # a power of two: the scaling is exact
        torch.testing.assert_close(out, t * inv, rtol=0, atol=0)
        if in_range:
            assert inv == 1.0
        else:
            assert 2.0**-63 <= float(out.abs().max()) <= 2.0**103
    for bad in (float("nan"), float("inf")):
        out, inv = _prescale(torch.tensor([[bad, 1.0]]), host=host)
        assert float(inv) == 1.0
    # an unbalanced fixed-rank pair keeps its small factor's gradient (no flush to the subnormal range)
    rng = np.random.default_rng(11)
    b, a = (torch.from_numpy(rng.standard_normal(s)).float() for s in ((6, 2), (2, 5)))
    eb, ea = (torch.from_numpy(rng.standard_normal(s)).float() for s in ((6, 2), (2, 5)))
    for factorization in ("qr", "gram"):
        d0 = intrinsic_direction(FixedRank(factorization), (b, a), (eb, ea))
        d1 = intrinsic_direction(FixedRank(factorization), (b * 1e30, a / 1e30), (eb / 1e30, ea * 1e30))
        torch.testing.assert_close(d1.xi[0] / 1e30, d0.xi[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d1.xi[1] * 1e30, d0.xi[1], rtol=1e-5, atol=1e-6)
