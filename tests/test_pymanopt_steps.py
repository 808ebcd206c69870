"""Step rules of the Pymanopt solver: Pymanopt's own line searchers, huge constant steps, the rounding-level stall."""

from __future__ import annotations

import numpy as np
import pymanopt
import pytest
from _pymanopt_problems import rayleigh
from pymanopt import manifolds as pm
from pymanopt.optimizers.line_search import AdaptiveLineSearcher, BackTrackingLineSearcher

from imuon_manopt.optimizers import IMuon, LineSearcher

QUIET = dict(verbosity=0, log_verbosity=1)


def _rayleigh(n=8, seed=0):
    """``min x^T C x`` on the sphere: the optimum is the smallest eigenvalue of ``C`` (closed form)."""
    manifold, cost, egrad, x0, cov = rayleigh(n, seed)
    return pymanopt.Problem(manifold, cost, euclidean_gradient=egrad), x0, cov


def _pca(n=20, p=3, seed=1):
    """``min -tr(X^T C X)`` on Grassmann: the optimum is minus the sum of the ``p`` largest eigenvalues."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    cov = a @ a.T / n
    manifold = pm.Grassmann(n, p)

    @pymanopt.function.numpy(manifold)
    def cost(x):
        return -float(np.sum(x * (cov @ x)))

    @pymanopt.function.numpy(manifold)
    def egrad(x):
        return -2.0 * (cov @ x)

    x0 = np.linalg.qr(rng.standard_normal((n, p)))[0]
    return pymanopt.Problem(manifold, cost, euclidean_gradient=egrad), x0, -np.linalg.eigvalsh(cov)[-p:].sum()


# ------------------------------------------------------------------------------------------ Pymanopt line searchers


@pytest.mark.parametrize("searcher", [BackTrackingLineSearcher, AdaptiveLineSearcher])
@pytest.mark.parametrize("case", ["rayleigh", "pca"])
def test_pymanopt_line_searchers_decrease_monotonically_and_converge(searcher, case):
    if case == "rayleigh":
        problem, x0, cov = _rayleigh()
        optimum = np.linalg.eigvalsh(cov)[0]
    else:
        problem, x0, optimum = _pca()
    solver = IMuon(step_size=searcher(), max_iterations=3000, min_gradient_norm=1e-9, **QUIET)
    assert isinstance(solver._step_size, LineSearcher)
    result = solver.run(problem, initial_point=x0)
    costs = np.array(result.log["iterations"]["cost"] + [result.cost])
    assert np.all(np.diff(costs) <= 1e-15 * np.abs(costs[1:]))  # never an increase
    assert abs(result.cost - optimum) <= 1e-8 * abs(optimum)
    steps = np.array(result.log["iterations"]["step_size"][1:])
    assert np.all(steps >= 0) and np.any(steps > 0)


def test_line_searcher_step_is_measured_in_the_lmo_norm():
    # One backtracking step from x0 along -xi: the reported eta reproduces the point through the retraction.
    problem, x0, _ = _rayleigh()
    solver = IMuon(step_size=BackTrackingLineSearcher(), max_iterations=1, min_gradient_norm=0.0, **QUIET)
    result = solver.run(problem, initial_point=x0)
    eta = result.log["iterations"]["step_size"][-1] if len(result.log["iterations"]["step_size"]) > 1 else None
    e = problem.euclidean_gradient(x0)
    g = e - (x0 @ e) * x0
    xi = g / np.linalg.norm(g)
    etas = [s for s in [result.step_size] if s]
    assert eta is None and etas  # one iteration: the step is the result's step_size
    np.testing.assert_allclose(result.point, problem.manifold.retraction(x0, -etas[0] * xi), atol=1e-14)


def test_an_object_without_search_is_refused():
    with pytest.raises(TypeError, match="line searcher"):
        LineSearcher(object())


# ------------------------------------------------------------------------------------------ huge constant steps


# (the overflowing first trial warns inside Pymanopt's retraction and the cost)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("eta", [1e300, 1e200, 1e160])
def test_huge_constant_step_on_the_sphere_stays_on_it(eta):
    problem, x0, cov = _rayleigh(6)
    result = IMuon(step_size=eta, max_iterations=30, **QUIET).run(problem, initial_point=x0)
    assert abs(np.linalg.norm(result.point) - 1.0) < 1e-12  # never the zero vector
    for point in result.log["iterations"]["point"]:
        assert abs(np.linalg.norm(point) - 1.0) < 1e-12
    assert "min grad norm" not in result.stopping_criterion
    assert np.isfinite(result.cost)


# (the overflowing first trial warns inside Pymanopt's retraction and the cost)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_huge_constant_step_on_fixed_rank_stays_on_the_manifold():
    rng = np.random.default_rng(3)
    m, n, k = 8, 6, 2
    target = rng.standard_normal((m, n))
    manifold = pm.FixedRankEmbedded(m, n, k)

    @pymanopt.function.numpy(manifold)
    def cost(u, s, vt):
        return 0.5 * float(np.sum(((u * s) @ vt - target) ** 2))

    @pymanopt.function.numpy(manifold)
    def egrad(u, s, vt):
        g = (u * s) @ vt - target
        return g @ vt.T * s, np.einsum("ik,ij,kj->k", u, g, vt), s[:, None] * (u.T @ g)

    x0 = (
        np.linalg.qr(rng.standard_normal((m, k)))[0],
        np.array([2.0, 1.0]),
        np.linalg.qr(rng.standard_normal((n, k)))[0].T,
    )
    problem = pymanopt.Problem(manifold, cost, euclidean_gradient=egrad)
    result = IMuon(step_size=1e300, max_iterations=30, **QUIET).run(problem, initial_point=x0)
    for u, s, vt in result.log["iterations"]["point"] + [result.point]:
        np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-10)
        np.testing.assert_allclose(vt @ vt.T, np.eye(k), atol=1e-10)
        assert np.all(s > 0) and np.all(np.isfinite(s))


def test_a_step_refused_at_every_length_stops_with_a_clear_message():
    # A sphere whose retraction always returns the zero vector: every shortened trial is off the manifold too.
    problem, x0, _ = _rayleigh(6)
    problem.manifold.retraction = lambda point, tangent_vector: np.zeros_like(point)
    result = IMuon(step_size=0.1, max_iterations=5, **QUIET).run(problem, initial_point=x0)
    assert "left the manifold" in result.stopping_criterion
    np.testing.assert_array_equal(result.point, x0)
    assert result.iterations == 1


# ------------------------------------------------------------------------------------------ rounding-level stall


def test_stall_rule_ends_a_run_whose_steps_change_nothing():
    problem, x0, optimum = _pca()
    kw = dict(max_iterations=5000, min_gradient_norm=0.0, min_step_size=0.0, **QUIET)
    stalled = IMuon(**kw).run(problem, initial_point=x0)
    assert "rounding level" in stalled.stopping_criterion
    assert stalled.iterations < 5000
    assert abs(stalled.cost - optimum) <= 1e-13 * abs(optimum)
    costs = stalled.log["iterations"]["cost"]
    window = np.array(costs[-6:])
    assert np.ptp(window) <= 1e-14 * abs(window[-1])
    # without the rule the same run goes on to the budget, gaining nothing beyond rounding
    full = IMuon(min_cost_change=None, **{**kw, "max_iterations": stalled.iterations + 200}).run(
        problem, initial_point=x0
    )
    assert full.iterations == stalled.iterations + 200
    assert abs(full.cost - stalled.cost) <= 1e-13 * abs(optimum)


def test_stall_rule_does_not_cut_a_slow_but_steady_run():
    # Small constant steps: the cost keeps moving by more than 1e-14 relative per 5 iterations, so only the
    # iteration budget ends the run.
    problem, x0, _ = _pca()
    result = IMuon(step_size=1e-3, max_iterations=300, min_gradient_norm=0.0, **QUIET).run(problem, initial_point=x0)
    assert result.iterations == 300
    assert "max iter" in result.stopping_criterion.lower()


@pytest.mark.parametrize("bad", [-1e-14, 1.0, "1e-14", True])
def test_min_cost_change_is_validated(bad):
    with pytest.raises(ValueError, match="min_cost_change"):
        IMuon(min_cost_change=bad)
