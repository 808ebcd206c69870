"""The Pymanopt adapter's geometry.

One solver step is the core direction plus the manifold's retraction; the LMO gap is the
directional derivative; fixed-rank factored form; stacks; products; point checks.
"""

from __future__ import annotations

import math

import numpy as np
import pymanopt
import pytest
import scipy.sparse as sp
import torch
from pymanopt import manifolds as pm

from imuon_manopt import geometry as core
from imuon_manopt.direction import intrinsic_direction
from imuon_manopt.optimizers import IMuon
from imuon_manopt.optimizers._pymanopt_geometry import host_geometry


def _polar(a: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return u @ vt


# ------------------------------------------------------------------------------------------------
# Cases: a smooth cost per component. Matrix components: f(x) = <C, x> + 1/2 <W, x*x>; fixed rank:
# the same function of the product X = u diag(s) vt. Gradients are explicit (numpy backend).


def _components(manifold):
    return list(manifold.manifolds) if isinstance(manifold, pm.Product) else [manifold]


def _layout(manifold):
    layout = manifold.point_layout
    return list(layout) if isinstance(layout, (tuple, list)) else [layout]


def _leaf_data(manifold, x, rng):
    if isinstance(manifold, pm.FixedRankEmbedded):
        shape = (manifold._m, manifold._n)
    else:
        shape = np.shape(x)
    return rng.standard_normal(shape), rng.uniform(0.5, 1.5, shape)


def make_problem(manifold, seed: int = 0):
    """``(problem, x0, egrad_fn)`` for a supported manifold, explicit Euclidean gradient."""
    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # noqa: NPY002 - Pymanopt's random_point uses the global RNG
    x0 = manifold.random_point()
    comps = _components(manifold)
    points = x0 if isinstance(manifold, pm.Product) else [x0]
    data = [_leaf_data(m, p, rng) for m, p in zip(comps, points)]
    sizes = _layout(manifold)

    def group(args):
        out, i = [], 0
        for size in sizes:
            out.append(args[i] if size == 1 else tuple(args[i : i + size]))
            i += size
        return out

    def leaf_cost(m, p, c, w):
        if isinstance(m, pm.FixedRankEmbedded):
            u, s, vt = p
            p = (u * s) @ vt
        return float(np.sum(c * p) + 0.5 * np.sum(w * p * p))

    def leaf_grad(m, p, c, w):
        if isinstance(m, pm.FixedRankEmbedded):
            u, s, vt = p
            gamma = c + w * ((u * s) @ vt)
            return (
                gamma @ vt.T * s,
                np.einsum("ik,ij,kj->k", u, gamma, vt),
                s[:, None] * (u.T @ gamma),
            )
        return c + w * p

    @pymanopt.function.numpy(manifold)
    def cost(*args):
        return sum(leaf_cost(m, p, c, w) for m, p, (c, w) in zip(comps, group(args), data))

    @pymanopt.function.numpy(manifold)
    def egrad(*args):
        grads = [leaf_grad(m, p, c, w) for m, p, (c, w) in zip(comps, group(args), data)]
        if not isinstance(manifold, pm.Product):
            return grads[0]
        flat = []
        for g in grads:
            flat.extend(g if isinstance(g, tuple) else [g])
        return flat

    def egrad_fn(x):
        grads = [
            leaf_grad(m, p, c, w) for m, p, (c, w) in zip(comps, x if isinstance(manifold, pm.Product) else [x], data)
        ]
        return grads if isinstance(manifold, pm.Product) else grads[0]

    return pymanopt.Problem(manifold, cost, euclidean_gradient=egrad), x0, egrad_fn


MANIFOLDS = {
    "euclidean-matrix": lambda: pm.Euclidean(6, 4),
    "euclidean-vector": lambda: pm.Euclidean(5),
    "euclidean-stack": lambda: pm.Euclidean(3, 5, 4),
    "sphere": lambda: pm.Sphere(7),
    "sphere-matrix": lambda: pm.Sphere(4, 3),
    "stiefel": lambda: pm.Stiefel(7, 3),
    "stiefel-polar": lambda: pm.Stiefel(7, 3, retraction="polar"),
    "stiefel-k3": lambda: pm.Stiefel(6, 2, k=3),
    "grassmann": lambda: pm.Grassmann(8, 3),
    "grassmann-k2": lambda: pm.Grassmann(6, 2, k=2),
    "spd": lambda: pm.SymmetricPositiveDefinite(4),
    "spd-k2": lambda: pm.SymmetricPositiveDefinite(3, k=2),
    "fixed-rank": lambda: pm.FixedRankEmbedded(7, 6, 2),
    "product": lambda: pm.Product(
        [
            pm.Stiefel(5, 2),
            pm.SymmetricPositiveDefinite(3),
            pm.FixedRankEmbedded(5, 4, 2),
            pm.Sphere(4),
        ]
    ),
}


def _core_geometry(manifold):
    if isinstance(manifold, pm.Product):
        return core.Product([_core_geometry(m) for m in manifold.manifolds])
    return {
        pm.Euclidean: core.Euclidean(),
        pm.Sphere: core.Sphere(),
        pm.Stiefel: core.Stiefel("embedded"),
        pm.Grassmann: core.Grassmann("orthonormal"),
        pm.SymmetricPositiveDefinite: core.SPD(),
        pm.FixedRankEmbedded: core.FixedRank(),
    }[type(manifold)]


def _core_inputs(manifold, x, e):
    """Independent translation to the core's representation (spec §2 for fixed rank)."""
    if isinstance(manifold, pm.Product):
        pairs = [_core_inputs(m, xi, ei) for m, xi, ei in zip(manifold.manifolds, x, e)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if isinstance(manifold, pm.FixedRankEmbedded):
        u, s, vt = x
        du, _, dvt = e
        return (u * np.sqrt(s), np.sqrt(s)[:, None] * vt), (
            du / np.sqrt(s),
            dvt / np.sqrt(s)[:, None],
        )
    if isinstance(manifold, pm.Sphere):
        return x.reshape(-1), e.reshape(-1)
    return x, e


def _ambient(manifold, x, xi):
    """Core direction -> a dense ambient array, independently of the adapter (spec §2)."""
    if isinstance(manifold, pm.FixedRankEmbedded):
        u, s, vt = x
        xi_b, xi_a = xi
        return xi_b @ (np.sqrt(s)[:, None] * vt) + (u * np.sqrt(s)) @ xi_a
    return np.asarray(xi).reshape(np.shape(x))


def _host_tangent(manifold, x, xi):
    """Core direction -> Pymanopt tangent: the manifold's projection of the dense direction."""
    if isinstance(manifold, pm.Product):
        return manifold.projection(x, [_ambient(m, a, b) for m, a, b in zip(manifold.manifolds, x, xi)])
    if isinstance(manifold, pm.FixedRankEmbedded):
        return manifold.projection(x, _ambient(manifold, x, xi))
    return _ambient(manifold, x, xi)


def _dense(manifold, x, v):
    """A tangent vector as plain arrays (fixed rank: the m x n ambient matrix)."""
    if isinstance(manifold, pm.Product):
        return [_dense(m, a, b) for m, a, b in zip(manifold.manifolds, x, v)]
    if isinstance(manifold, pm.FixedRankEmbedded):
        u_, s_, v_ = manifold.embedding(x, v)
        return u_ @ s_ @ v_.T
    return np.asarray(v)


def _assert_tree_close(a, b, **kw):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for p, q in zip(a, b):
            _assert_tree_close(p, q, **kw)
    else:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **kw)


def _points(manifold, x):
    if isinstance(manifold, pm.FixedRankEmbedded):
        u, s, vt = x
        return (u * s) @ vt
    if isinstance(manifold, pm.Product):
        return [_points(m, p) for m, p in zip(manifold.manifolds, x)]
    return x


@pytest.mark.parametrize("name", sorted(MANIFOLDS))
def test_one_iteration_is_core_direction_then_retraction(name):
    """Contract: momentum 0, exact polar, constant eta: x1 = manifold.retraction(x0, -eta * xi)."""
    manifold = MANIFOLDS[name]()
    problem, x0, egrad = make_problem(manifold)
    eta = 0.05
    result = IMuon(step_size=eta, momentum=0.0, polar="svd", max_iterations=1, verbosity=0).run(
        problem, initial_point=x0
    )
    assert result.iterations == 1
    cx, ce = _core_inputs(manifold, x0, egrad(x0))
    d = intrinsic_direction(_core_geometry(manifold), cx, ce)
    expected = manifold.retraction(x0, -eta * _host_tangent(manifold, x0, d.xi))
    _assert_tree_close(_points(manifold, result.point), _points(manifold, expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MANIFOLDS))
def test_gap_is_the_directional_derivative(name):
    """gap = <E, xi> = inner_product(x, rgrad, xi), and (f(R(-t xi)) - f(x)) / t -> -gap."""
    manifold = MANIFOLDS[name]()
    problem, x, egrad = make_problem(manifold, seed=1)
    host = host_geometry(manifold)
    d = intrinsic_direction(host.geometry, host.core_point(x), host.core_egrad(x, egrad(x)))
    xi = host.tangent(x, d.xi)
    rgrad = problem.riemannian_gradient(x)
    assert d.gap > 0
    np.testing.assert_allclose(manifold.inner_product(x, rgrad, xi), d.gap, rtol=1e-9)
    # The Riemannian gradient lowered by the metric gives the same direction.
    d2 = intrinsic_direction(host.geometry, host.core_point(x), host.flat(x, rgrad))
    _assert_tree_close(_dense(manifold, x, host.tangent(x, d2.xi)), _dense(manifold, x, xi), atol=1e-9)
    f0 = problem.cost(x)
    slopes = [(problem.cost(manifold.retraction(x, -t * xi)) - f0) / t for t in (1e-4, 1e-5)]
    assert abs(slopes[-1] + d.gap) <= 1e-3 * max(1.0, d.gap)
    assert abs(slopes[-1] + d.gap) <= abs(slopes[0] + d.gap) + 1e-9


def test_fixed_rank_direction_matches_ambient_formula():
    """xi_B A + B xi_A = polar(Gamma V) V^T + U polar(U^T Gamma) (spec §2), balanced factors."""
    m, n, k = 9, 7, 3
    manifold = pm.FixedRankEmbedded(m, n, k)
    rng = np.random.default_rng(3)
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    vt = np.linalg.qr(rng.standard_normal((n, k)))[0].T
    s = np.array([3.0, 1.0, 0.2])
    x = (u, s, vt)
    gamma = rng.standard_normal((m, n))
    egrad = (gamma @ vt.T * s, np.diag(u.T @ gamma @ vt.T), s[:, None] * (u.T @ gamma))
    host = host_geometry(manifold)
    d = intrinsic_direction(host.geometry, host.core_point(x), host.core_egrad(x, egrad))
    ambient = host.ambient(x, d.xi)
    assert isinstance(ambient, tuple) and ambient[0].shape == (m, 2 * k) and ambient[2].shape == (n, 2 * k)
    xi = host.tangent(x, d.xi)
    expected = _polar(gamma @ vt.T) @ vt + u @ _polar(u.T @ gamma)
    np.testing.assert_allclose(_dense(manifold, x, xi), expected, atol=1e-10)
    # Gap = <Gamma, xi> = nuclear norms of the two blocks (spectral block rule: sum of duals).
    nuclear = np.linalg.norm(gamma @ vt.T, "nuc") + np.linalg.norm(u.T @ gamma, "nuc")
    np.testing.assert_allclose(d.gap, nuclear, rtol=1e-10)
    np.testing.assert_allclose(np.sum(gamma * expected), d.gap, rtol=1e-10)


def test_stacks_are_products_of_slices():
    """A k > 1 stack gives, slice by slice, the direction of the single manifold."""
    rng = np.random.default_rng(4)
    stack = pm.Stiefel(6, 2, k=3)
    x = stack.random_point()
    e = rng.standard_normal(x.shape)
    host = host_geometry(stack)
    xi = host.tangent(x, intrinsic_direction(host.geometry, x, e).xi)
    for i in range(3):
        xt = x[i]
        omega = xt.T @ e[i]
        omega = 0.5 * (omega - omega.T)
        expected = xt @ _polar(omega) + _polar(e[i] - xt @ (xt.T @ e[i]))
        np.testing.assert_allclose(xi[i], expected, atol=1e-10)


def test_spd_direction_is_the_matrix_sign_form():
    rng = np.random.default_rng(5)
    manifold = pm.SymmetricPositiveDefinite(4)
    x = manifold.random_point()
    e = rng.standard_normal((4, 4))
    host = host_geometry(manifold)
    xi = host.tangent(x, intrinsic_direction(host.geometry, x, host.core_egrad(x, e)).xi)
    w, q = np.linalg.eigh(x)
    root = (q * np.sqrt(w)) @ q.T
    lam, v = np.linalg.eigh(root @ (0.5 * (e + e.T)) @ root)
    expected = root @ ((v * np.sign(lam)) @ v.T) @ root
    np.testing.assert_allclose(xi, expected, atol=1e-10)


def test_host_geometry_keeps_the_manifold_tangent_types():
    manifold = MANIFOLDS["product"]()
    problem, x, egrad = make_problem(manifold)
    host = host_geometry(manifold)
    xi = host.tangent(x, intrinsic_direction(host.geometry, host.core_point(x), host.core_egrad(x, egrad(x))).xi)
    assert type(xi) is type(manifold.zero_vector(x))
    assert type(xi[2]) is type(manifold.manifolds[2].zero_vector(x[2]))
    manifold.retraction(x, -0.1 * xi)  # arithmetic and retraction work on the host types


# ------------------------------------------------------------------------------------------------
# Point checks and dispatch


def _bad_points():
    rng = np.random.default_rng(6)
    st = pm.Stiefel(5, 2)
    spd = pm.SymmetricPositiveDefinite(3)
    fr = pm.FixedRankEmbedded(5, 4, 2)
    good_fr = fr.random_point()
    return [
        (st, rng.standard_normal((5, 2)), "orthonormal"),
        (st, np.linalg.qr(rng.standard_normal((5, 3)))[0], "shape"),
        (pm.Grassmann(5, 2), 2.0 * np.linalg.qr(rng.standard_normal((5, 2)))[0], "orthonormal"),
        (spd, np.diag([1.0, -1.0, 2.0]), "positive definite"),
        (spd, np.array([[2.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]), "symmetric"),
        (pm.Sphere(4), np.ones(4), "norm"),
        (pm.Euclidean(3), np.array([1.0, np.nan, 0.0]), "NaN"),
        (fr, (good_fr[0], -good_fr[1], good_fr[2]), "positive"),
        (fr, (good_fr[0][:, :1], good_fr[1], good_fr[2]), "shape"),
        (fr, (2 * good_fr[0], good_fr[1], good_fr[2]), "orthonormal"),
        (fr, good_fr[0], "triple"),
        (pm.Product([st, spd]), [st.random_point()], "list of 2"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_initial_point_off_the_manifold_is_a_value_error(case):
    manifold, x, message = _bad_points()[case]

    @pymanopt.function.numpy(manifold)
    def cost(*args):
        return 0.0

    @pymanopt.function.numpy(manifold)
    def egrad(*args):
        return [np.zeros_like(a) for a in args] if len(args) > 1 else np.zeros_like(args[0])

    problem = pymanopt.Problem(manifold, cost, euclidean_gradient=egrad)
    with pytest.raises(ValueError, match=message):
        IMuon(verbosity=0).run(problem, initial_point=x)


def test_unsupported_manifold_is_a_type_error_naming_the_alternatives():
    class MyStiefel(pm.Stiefel):  # a subclass may change the metric: never matched silently
        pass

    for manifold in (
        pm.Oblique(4, 3),
        MyStiefel(5, 2),
        pm.Product([pm.Stiefel(4, 2), pm.Oblique(3, 2)]),
    ):
        with pytest.raises(TypeError, match="MetricOperator") as info:
            host_geometry(manifold)
        assert "FixedRankEmbedded" in str(info.value) and "geometry=" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Fixed rank: gradient forms, the Riemannian gradient without 1 / (s_i^2 - s_j^2), closed forms


def _fixed_rank_case(s, m=9, n=7, seed=7):
    rng = np.random.default_rng(seed)
    k = len(s)
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    vt = np.linalg.qr(rng.standard_normal((n, k)))[0].T
    x = (u, np.asarray(s, dtype=float), vt)
    # Gamma of rank 4, also given in Pymanopt's factored form (U, S, V), Gamma = U @ S @ V.T.
    big_u, big_v = rng.standard_normal((m, 4)), rng.standard_normal((n, 4))
    big_s = np.diag(rng.standard_normal(4))
    gamma = big_u @ big_s @ big_v.T
    s = x[1]
    factors = (gamma @ vt.T * s, np.einsum("ik,ij,kj->k", u, gamma, vt), s[:, None] * (u.T @ gamma))
    return pm.FixedRankEmbedded(m, n, k), x, gamma, (big_u, big_s, big_v), factors


def test_fixed_rank_gradient_forms_agree():
    """(du, ds, dvt), dense Gamma, scipy.sparse Gamma and (U, S, V) give the same core gradient."""
    manifold, x, gamma, factored, factors = _fixed_rank_case([2.0, 0.7, 0.3])
    host = host_geometry(manifold)
    expected = host.core_egrad(x, factors)
    u, s, vt = x
    np.testing.assert_allclose(expected[0], gamma @ vt.T * np.sqrt(s), atol=1e-12)  # Gamma A^T
    np.testing.assert_allclose(expected[1], np.sqrt(s)[:, None] * (u.T @ gamma), atol=1e-12)
    for form in (gamma, sp.csr_matrix(gamma), factored):
        _assert_tree_close(host.core_egrad(x, form), expected, atol=1e-12)
        _assert_tree_close(host.gradients(x, form), host.gradients(x, factors), atol=1e-12)
    with pytest.raises(ValueError, match="factor gradients"):
        host.core_egrad(x, gamma[:, :3])


def test_fixed_rank_riemannian_gradient_is_the_projection():
    """Distinct s: the same as Pymanopt's conversion; repeated s: still the projection of Gamma,
    where Pymanopt's conversion divides by s_i^2 - s_j^2 = 0."""
    for s, distinct in (([2.0, 0.7, 0.3], True), ([1.0, 1.0, 1.0], False), ([2.0, 0.5, 0.5], False)):
        manifold, x, gamma, _, factors = _fixed_rank_case(s)
        rgrad = host_geometry(manifold).gradients(x, factors)[0]
        assert type(rgrad) is type(manifold.zero_vector(x))
        projected = manifold.projection(x, gamma)
        _assert_tree_close(rgrad, projected, atol=1e-12)
        if distinct:
            _assert_tree_close(rgrad, manifold.euclidean_to_riemannian_gradient(x, factors), atol=1e-10)
        else:
            with np.errstate(all="ignore"):
                pymanopt_rgrad = manifold.euclidean_to_riemannian_gradient(x, factors)
            assert not np.all(np.isfinite(pymanopt_rgrad[1]))


@pytest.mark.parametrize("norm", ["spectral", "frobenius"])
@pytest.mark.parametrize("s", [[2.0, 0.7, 0.3], [1.0, 1.0, 1.0]])
def _polar_and_nuclear(h):
    """The thin polar factor (over the nonzero singular values) and the nuclear norm, from a float64 SVD."""
    left, sv, right = np.linalg.svd(h, full_matrices=False)
    keep = sv > 1e-12 * max(sv[0], 1e-300)
    return (left * keep) @ right, float(sv.sum())


@pytest.mark.parametrize("norm", ["spectral", "frobenius"])
@pytest.mark.parametrize("s", [[2.0, 0.7, 0.3], [1.0, 1.0, 1.0]])
def test_fixed_rank_direction_is_the_spec_closed_form(norm, s):
    """On balanced factors the whitened blocks are Gamma V and U^T Gamma (spec §2): the solver's direction (the
    core's numpy path, assembled by the adapter) is the projection of ``polar(Gamma V) vt + u polar(U^T Gamma)``
    (spectral; Frobenius: both blocks over one joint norm), written out here with float64 SVDs."""
    manifold, x, gamma, _, factors = _fixed_rank_case(s)
    u, _, vt = x
    host = host_geometry(manifold)
    for egrad, g in ((factors, gamma), (np.outer(gamma[:, 0], gamma[0]),) * 2, (np.zeros_like(gamma),) * 2):
        c = host.core_egrad(x, egrad)
        d = intrinsic_direction(core.FixedRank(), host.core_point(x), c, norm)
        assert isinstance(d.xi[0], np.ndarray)  # computed in numpy
        xi = host.tangent(x, d.xi)
        h_b, h_at = g @ vt.T, g.T @ u  # Gamma V, (U^T Gamma)^T
        if norm == "spectral":
            (z_b, gap_b), (z_at, gap_a) = _polar_and_nuclear(h_b), _polar_and_nuclear(h_at)
            gap = gap_b + gap_a
        else:
            gap = math.sqrt(np.sum(h_b**2) + np.sum(h_at**2))
            z_b, z_at = (h_b / gap, h_at / gap) if gap > 0 else (h_b, h_at)
        expected = manifold.projection(x, (np.hstack((z_b, u)), np.eye(2 * u.shape[1]), np.hstack((vt.T, z_at))))
        assert type(xi) is type(manifold.zero_vector(x))
        _assert_tree_close(xi, expected, atol=1e-12)
        np.testing.assert_allclose(float(d.gap), gap, rtol=1e-12, atol=1e-300)


def test_fixed_rank_direction_refuses_rank_loss_in_both_array_types():
    manifold, x, _, _, factors = _fixed_rank_case([1.0, 1e-40, 0.5])
    host = host_geometry(manifold)
    c = host.core_egrad(x, factors)
    with pytest.raises(ValueError, match="rank"):
        intrinsic_direction(core.FixedRank(), host.core_point(x), c)  # numpy
    with pytest.raises(ValueError, match="rank"):
        intrinsic_direction(
            core.FixedRank(), tuple(map(torch.from_numpy, host.core_point(x))), tuple(map(torch.from_numpy, c))
        )


def _fixed_rank_variants(x):
    u, s, vt = x
    off = u.copy()
    off[0, 0] += 1e-3  # columns no longer orthonormal
    nan_vt = vt.copy()
    nan_vt[0, 0] = np.nan
    return {
        "non-orthonormal u": (off, s, vt),
        "zero s": (u, np.concatenate([[0.0], s[1:]]), vt),
        "negative s": (u, -s, vt),
        "inf s": (u, np.concatenate([[np.inf], s[1:]]), vt),
        "nan s": (u, np.concatenate([[np.nan], s[1:]]), vt),
        "nan vt": (u, s, nan_vt),
        "inf u": (u * np.inf, s, vt),
    }


def test_fixed_rank_feasibility_check_agrees_with_the_point_check():
    """The solver's per-step check of a fixed-rank point (positive finite s, orthonormal u and vt) accepts a point
    exactly when the full point check does, on a retraction's result and on points that lost each property."""
    manifold = pm.FixedRankEmbedded(30, 20, 4)
    host = host_geometry(manifold, None)
    rng = np.random.default_rng(3)
    x = manifold.random_point()
    step = manifold.retraction(x, manifold.projection(x, rng.standard_normal((30, 20))))
    for point in (x, step):
        host.check_point(point)
        assert host.feasible(point)
    for name, bad in _fixed_rank_variants(x).items():
        with pytest.raises(ValueError):
            host.check_point(bad)
        with np.errstate(invalid="ignore"):  # (inf entries make the Gram matrix NaN, as they should)
            assert not host.feasible(bad), name
