"""Momentum of the Pymanopt solver on SPD: no collapse towards the boundary.

With a tangent buffer carried by Pymanopt's SPD transport (the identity), old momentum keeps its size while the
Riemannian gradient ``X sym(E) X`` shrinks with ``X``; at constant steps around ``-ln(beta)`` the normalized steps
then drove an eigenvalue of ``X`` to rounding level (``1e-10``, or a singular matrix in Pymanopt's ``norm``). The
solver now sums Euclidean gradients where the geometry is ``open_in_ambient``. The truth is the closed-form
optimum: ``argmin_{X > 0} ||X - T||_F^2 = T`` for SPD ``T``.
"""

from __future__ import annotations

import math

import numpy as np
import pymanopt
import pytest
from pymanopt import manifolds as pm

from imuon_manopt.geometry import SPD
from imuon_manopt.optimizers import IMuon

N = 4
# The constant phase is where the old code collapsed; the geometric decay then settles the O(eta) oscillation of
# normalized steps, so the run must reach T itself.
CONSTANT_STEPS = 250
DECAY = 0.97


def _target(commuting: bool) -> np.ndarray:
    if commuting:
        return 0.2 * np.eye(N)
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((N, N)))[0]
    return (q * np.array([0.15, 0.3, 0.8, 2.0])) @ q.T  # does not commute with X0 = I's iterates' gradients


def _problem(manifold, target: np.ndarray, cost_of, egrad_of):
    @pymanopt.function.numpy(manifold)
    def cost(*x):
        return cost_of(*x)

    @pymanopt.function.numpy(manifold)
    def egrad(*x):
        return egrad_of(*x)

    return pymanopt.Problem(manifold, cost, euclidean_gradient=egrad)


def _spd_problem(target: np.ndarray):
    return _problem(
        pm.SymmetricPositiveDefinite(N),
        target,
        lambda x: float(np.sum((x - target) ** 2)),
        lambda x: 2.0 * (x - target),
    )


def _schedule(beta: float, multiple: float):
    eta = multiple * -math.log(beta)
    return lambda t: eta if t < CONSTANT_STEPS else eta * DECAY ** (t - CONSTANT_STEPS)


def _smallest_eigenvalues(result) -> np.ndarray:
    return np.array([np.linalg.eigvalsh(p).min() for p in result.log["iterations"]["point"]])


@pytest.mark.parametrize(
    ("beta", "multiple", "nesterov"),
    [(0.9, 1.0, True), (0.95, 1.0, True), (0.9, 1.0, False), (0.9, 3.0, False), (0.8, 2.0, True)],
)
def test_spd_momentum_at_steps_around_minus_log_beta_reaches_the_optimum(beta, multiple, nesterov):
    """Steps ``multiple * -ln(beta)`` for 250 iterations, then decaying. Before the fix the smallest eigenvalue
    fell to between 1e-8 and 3e-4 (T's is 0.15), and most runs ended 1e-1 away from T."""
    target = _target(commuting=False)
    opt = IMuon(
        step_size=_schedule(beta, multiple),
        momentum=beta,
        nesterov=nesterov,
        max_iterations=600,
        min_step_size=0.0,
        min_cost_change=None,
        verbosity=0,
        log_verbosity=1,
    )
    result = opt.run(_spd_problem(target), initial_point=np.eye(N))
    assert _smallest_eigenvalues(result).min() > 0.02
    np.testing.assert_allclose(result.point, target, atol=5e-5)


@pytest.mark.parametrize("commuting", [True, False])
@pytest.mark.parametrize("beta", [0.8, 0.9, 0.95])
def test_spd_momentum_with_the_default_line_search_reaches_the_optimum(beta, commuting):
    """The default Armijo rule with momentum did not collapse before the fix either (the sufficient-decrease test and
    the restart of a non-descent momentum direction hold it): the iterates stay inside (no eigenvalue below half of
    T's smallest) and reach T, for a target commuting with the iterates (0.2 I, the torch report's case) and one that
    does not."""
    target = _target(commuting)
    opt = IMuon(momentum=beta, max_iterations=500, min_gradient_norm=1e-9, verbosity=0, log_verbosity=1)
    result = opt.run(_spd_problem(target), initial_point=np.eye(N))
    assert _smallest_eigenvalues(result).min() > 0.5 * np.linalg.eigvalsh(target).min()
    np.testing.assert_allclose(result.point, target, atol=1e-5)


def test_product_with_spd_keeps_the_spd_momentum_per_component():
    """``Product([SPD, Sphere])``: the SPD component's buffer sums Euclidean gradients while the sphere's is a
    transported tangent vector; both components reach their optima (T, and the top eigenvector of C up to sign)."""
    target = _target(commuting=False)
    rng = np.random.default_rng(1)
    q = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    c = (q * np.array([3.0, 2.0, 1.0, 0.5, 0.1])) @ q.T
    manifold = pm.Product([pm.SymmetricPositiveDefinite(N), pm.Sphere(5)])
    problem = _problem(
        manifold,
        target,
        lambda x, v: float(np.sum((x - target) ** 2) - v @ c @ v),
        lambda x, v: [2.0 * (x - target), -2.0 * c @ v],
    )
    beta = 0.9
    opt = IMuon(
        step_size=_schedule(beta, 1.0),
        momentum=beta,
        max_iterations=600,
        min_step_size=0.0,
        min_cost_change=None,
        verbosity=0,
        log_verbosity=1,
    )
    v0 = np.ones(5) / math.sqrt(5.0)
    result = opt.run(problem, initial_point=[np.eye(N), v0])
    smallest = min(np.linalg.eigvalsh(p[0]).min() for p in result.log["iterations"]["point"])
    assert smallest > 0.02
    x, v = result.point
    np.testing.assert_allclose(x, target, atol=5e-5)
    assert abs(v @ q[:, 0]) > 1.0 - 1e-8


@pytest.mark.parametrize("form", ["euclidean_gradient", "riemannian_gradient", "geometry=SPD()"])
def test_stacked_spd_momentum_through_every_gradient_form_reaches_the_optimum(form):
    """``SymmetricPositiveDefinite(4, k=2)`` (a batch of two): the momentum rule follows the geometry's
    ``open_in_ambient`` whether the problem gives a Euclidean gradient, only a Riemannian one (lowered by the
    metric to ``sym(E)``), or a user geometry (``IMuon(geometry=SPD())``). Before the fix the smallest eigenvalue
    fell to 4e-13 in all three and the runs ended 0.2 away from the optimum."""
    targets = np.stack([_target(commuting=False), _target(commuting=True)])
    manifold = pm.SymmetricPositiveDefinite(N, k=2)

    @pymanopt.function.numpy(manifold)
    def cost(x):
        return float(np.sum((x - targets) ** 2))

    @pymanopt.function.numpy(manifold)
    def egrad(x):
        return 2.0 * (x - targets)

    @pymanopt.function.numpy(manifold)
    def rgrad(x):
        return x @ (2.0 * (x - targets)) @ x

    if form == "riemannian_gradient":
        problem = pymanopt.Problem(manifold, cost, riemannian_gradient=rgrad)
    else:
        problem = pymanopt.Problem(manifold, cost, euclidean_gradient=egrad)
    beta = 0.9
    opt = IMuon(
        step_size=_schedule(beta, 1.0),
        momentum=beta,
        geometry=SPD() if form == "geometry=SPD()" else None,
        max_iterations=600,
        min_step_size=0.0,
        min_cost_change=None,
        verbosity=0,
        log_verbosity=1,
    )
    result = opt.run(problem, initial_point=np.stack([np.eye(N)] * 2))
    assert _smallest_eigenvalues(result).min() > 0.02
    np.testing.assert_allclose(result.point, targets, atol=5e-5)
