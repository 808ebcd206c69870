"""The Pymanopt solver's iterates against the spec's directions written out with float64 SVDs.

Each test runs ``IMuon`` with a constant step for a few iterations and replays the same steps with the direction
computed here from ``numpy.linalg.svd`` (spec §1-2): any change of the core's array type, kernels or the adapter's
translation that moves an iterate beyond rounding fails here.
"""

from __future__ import annotations

import numpy as np
import pymanopt
import pytest
from _pymanopt_problems import rayleigh
from pymanopt import manifolds as pm

from imuon_manopt.optimizers import IMuon

STEPS = 6
ETA = 0.05


def _polar(h: np.ndarray) -> np.ndarray:
    """Thin polar factor over the singular values above 1e-12 s_max (float64 SVD)."""
    left, sv, right = np.linalg.svd(h, full_matrices=False)
    keep = sv > 1e-12 * sv[0] if sv[0] > 0 else np.zeros_like(sv, dtype=bool)
    return (left * keep) @ right


def _trace(manifold, cost, egrad, x0):
    """The solver's iterates (its log) for ``STEPS`` constant steps."""
    problem = pymanopt.Problem(manifold, cost, euclidean_gradient=egrad)
    solver = IMuon(step_size=ETA, max_iterations=STEPS, verbosity=0, log_verbosity=1, min_gradient_norm=0.0)
    result = solver.run(problem, initial_point=x0)
    return result.log["iterations"]["point"] + [result.point]


def _brockett(manifold_cls, n=12, p=3, seed=0):
    """``f(X) = -tr(X^T C X N)``, ``N = diag(3, 2, 1)``: on Stiefel ``X^T E`` is not symmetric, so both blocks of the
    direction are nonzero (with ``N = I``, PCA, the skew block is rounding noise); ``E = -2 C X N``."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    cov = a @ a.T / n
    weights = np.arange(p, 0, -1.0)
    manifold = manifold_cls(n, p)

    @pymanopt.function.numpy(manifold)
    def cost(x):
        return -float(np.sum(x * (cov @ x) * weights))

    @pymanopt.function.numpy(manifold)
    def egrad(x):
        return -2.0 * (cov @ x) * weights

    x0 = np.linalg.qr(rng.standard_normal((n, p)))[0]
    return manifold, cost, egrad, x0, lambda x: -2.0 * (cov @ x) * weights


@pytest.mark.parametrize("manifold_cls", [pm.Grassmann, pm.Stiefel])
def test_frames_iterates_follow_the_svd_reference(manifold_cls):
    manifold, cost, egrad, x0, gradient = _brockett(manifold_cls)
    points = _trace(manifold, cost, egrad, x0)
    x = x0
    for k in range(STEPS):
        np.testing.assert_allclose(points[k], x, atol=1e-12, err_msg=f"iterate {k}")
        e = gradient(x)
        if manifold_cls is pm.Grassmann:  # polar((I - X X^T) E)
            xi = _polar(e - x @ (x.T @ e))
        else:  # X polar(skew(X^T E)) + polar((I - X X^T) E), embedded metric
            xte = x.T @ e
            xi = x @ _polar(0.5 * (xte - xte.T)) + _polar(e - x @ xte)
        x = manifold.retraction(x, -ETA * xi)
    np.testing.assert_allclose(points[STEPS], x, atol=1e-12)


def test_sphere_iterates_follow_the_normalized_gradient():
    manifold, cost, egrad, x, cov = rayleigh(n=9, seed=1)
    points = _trace(manifold, cost, egrad, x.copy())
    for k in range(STEPS):
        np.testing.assert_allclose(points[k], x, atol=1e-12)
        e = 2.0 * (cov @ x)
        g = e - (x @ e) * x
        x = manifold.retraction(x, -ETA * g / np.linalg.norm(g))
    np.testing.assert_allclose(points[STEPS], x, atol=1e-12)


def test_fixed_rank_iterates_follow_the_balanced_closed_form():
    """Spec §2 on ``FixedRankEmbedded``: the ambient direction ``polar(Gamma V) vt + u polar(U^T Gamma)``."""
    rng = np.random.default_rng(2)
    m, n, k = 10, 8, 3
    target = rng.standard_normal((m, k)) @ rng.standard_normal((k, n))
    manifold = pm.FixedRankEmbedded(m, n, k)

    def gamma_of(x):
        u, s, vt = x
        return (u * s) @ vt - target

    @pymanopt.function.numpy(manifold)
    def cost(u, s, vt):
        return 0.5 * float(np.sum(((u * s) @ vt - target) ** 2))

    @pymanopt.function.numpy(manifold)
    def egrad(u, s, vt):
        g = (u * s) @ vt - target  # factor gradients of f(u diag(s) vt)
        return g @ vt.T * s, np.einsum("ik,ij,kj->k", u, g, vt), s[:, None] * (u.T @ g)

    u0 = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v0 = np.linalg.qr(rng.standard_normal((n, k)))[0]
    x = (u0, np.array([3.0, 2.0, 1.0]), v0.T)
    points = _trace(manifold, cost, egrad, tuple(a.copy() for a in x))
    for step in range(STEPS):
        for got, want in zip(points[step], x):
            np.testing.assert_allclose(got, want, atol=1e-11, err_msg=f"iterate {step}")
        u, _, vt = x
        g = gamma_of(x)
        p_b, p_at = _polar(g @ vt.T), _polar(g.T @ u)
        ambient = (np.hstack((p_b, u)), np.eye(2 * k), np.hstack((vt.T, p_at)))
        x = manifold.retraction(x, -ETA * manifold.projection(x, ambient))
    for got, want in zip(points[STEPS], x):
        np.testing.assert_allclose(got, want, atol=1e-11)


@pytest.mark.parametrize("array", ["numpy", "torch"])
def test_stiefel_direction_of_a_cost_of_x_xt_has_no_noise_block(array):
    """For ``f(X X^T)`` (PCA) ``X^T E`` is symmetric, so ``skew(X^T E)`` is zero in exact arithmetic and the Stiefel
    direction is the Grassmann one, ``polar((I - X X^T) E)``: the skew block's rounding noise must not become a unit
    direction (it did on the numpy path: the digits PCA on Stiefel followed rounding noise, 34 iterations to 1e-8
    instead of the Grassmann run's 26)."""
    import torch

    from imuon_manopt.direction import intrinsic_direction
    from imuon_manopt.geometry import Stiefel

    rng = np.random.default_rng(4)
    a = rng.standard_normal((12, 12))
    cov = a @ a.T
    x = np.linalg.qr(rng.standard_normal((12, 3)))[0]
    e = -2.0 * (cov @ x)
    expected = _polar(e - x @ (x.T @ e))
    if array == "torch":
        xi = intrinsic_direction(Stiefel(), torch.from_numpy(x), torch.from_numpy(e)).xi.numpy()
    else:
        xi = intrinsic_direction(Stiefel(), x, e).xi
    np.testing.assert_allclose(xi, expected, atol=1e-12)
