"""The Pymanopt solver ``imuon_manopt.optimizers.IMuon``.

Convergence to known optima, stopping criteria, printing and logging, backends, step-size rules,
momentum, bad input.
"""

from __future__ import annotations

import math

import autograd.numpy as anp
import numpy as np
import pymanopt
import pytest
import scipy.sparse as sp
import torch
from pymanopt import manifolds as pm
from pymanopt.optimizers import ConjugateGradient, SteepestDescent
from scipy.linalg import expm, logm

from imuon_manopt.geometry import Euclidean as EuclideanGeometry
from imuon_manopt.geometry import MetricOperator
from imuon_manopt.optimizers import (
    Armijo,
    Constant,
    Cosine,
    Exponential,
    IMuon,
    InverseSqrt,
    Schedule,
    StepSizeRule,
)

QUIET = {"verbosity": 0}


# ------------------------------------------------------------------------------------------------
# Problems with independent truths


def pca_problem(manifold: str = "grassmann", n: int = 40, p: int = 3, seed: int = 0):
    """``min -tr(X^T C X)``: optimum ``-(lambda_1 + ... + lambda_p)`` (eigengap 0.1)."""
    rng = np.random.default_rng(seed)
    lam = np.concatenate([np.linspace(1.0, 0.6, p), np.linspace(0.5, 0.0, n - p)])
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    cov = (q * lam) @ q.T
    cov = 0.5 * (cov + cov.T)
    mani = pm.Grassmann(n, p) if manifold == "grassmann" else pm.Stiefel(n, p)

    @pymanopt.function.numpy(mani)
    def cost(x):
        return -float(np.sum(x * (cov @ x)))

    @pymanopt.function.numpy(mani)
    def egrad(x):
        return -2.0 * (cov @ x)

    x0 = np.linalg.qr(rng.standard_normal((n, p)))[0]
    return pymanopt.Problem(mani, cost, euclidean_gradient=egrad), x0, -float(lam[:p].sum()), cov


def karcher_problem(n: int = 4, count: int = 6, seed: int = 0):
    """Mean squared AI distance to commuting SPD matrices: the optimum is expm(mean(logm))."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    d = np.exp(rng.standard_normal((count, n)))
    mats = (q * d[:, None, :]) @ q.T
    truth = expm(np.mean([logm(a).real for a in mats], axis=0))
    mani = pm.SymmetricPositiveDefinite(n)

    def whitened(x):
        w, v = np.linalg.eigh(0.5 * (x + x.T))
        iroot = (v / np.sqrt(w)) @ v.T
        ev, eq = np.linalg.eigh(iroot @ mats @ iroot)
        return iroot, ev, eq

    @pymanopt.function.numpy(mani)
    def cost(x):
        _, ev, _ = whitened(x)
        return float(np.sum(np.log(ev) ** 2) / (2 * count))

    @pymanopt.function.numpy(mani)
    def egrad(x):
        iroot, ev, eq = whitened(x)
        logs = np.sum((eq * np.log(ev)[..., None, :]) @ np.swapaxes(eq, -1, -2), axis=0)
        g = -iroot @ logs @ iroot / count
        return 0.5 * (g + g.T)

    return pymanopt.Problem(mani, cost, euclidean_gradient=egrad), mats[0].copy(), truth


def completion_problem(m: int = 60, n: int = 50, r: int = 3, seed: int = 0, gradient: str = "factors"):
    """Exact low-rank completion at condition number 1 with ``5 r (m + n)`` observed entries.

    ``gradient``: ``"factors"`` (Pymanopt's ``(du, ds, dvt)``) or ``"sparse"`` (the sparse
    residual, the gradient with respect to the matrix)."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((m, r)))[0]
    v = np.linalg.qr(rng.standard_normal((n, r)))[0]
    truth = u @ v.T
    count = 5 * r * (m + n)
    idx = rng.choice(m * n, size=count, replace=False)
    rows, cols = idx // n, idx % n
    vals = truth[rows, cols]
    mani = pm.FixedRankEmbedded(m, n, r)

    def residual(u_, s_, vt_):
        return np.einsum("ik,k,ki->i", u_[rows], s_, vt_[:, cols]) - vals

    @pymanopt.function.numpy(mani)
    def cost(u_, s_, vt_):
        return 0.5 * float(np.sum(residual(u_, s_, vt_) ** 2))

    @pymanopt.function.numpy(mani)
    def egrad(u_, s_, vt_):
        res = sp.csr_matrix((residual(u_, s_, vt_), (rows, cols)), shape=(m, n))
        if gradient == "sparse":
            return res
        rv = res @ vt_.T
        ur = (res.T @ u_).T
        return rv * s_, np.einsum("ik,ik->k", u_, rv), s_[:, None] * ur

    scaled = np.zeros((m, n))
    scaled[rows, cols] = vals * (m * n / count)
    u0, s0, vt0 = np.linalg.svd(scaled, full_matrices=False)  # spectral initialization
    return (
        pymanopt.Problem(mani, cost, euclidean_gradient=egrad),
        (u0[:, :r], s0[:r], vt0[:r]),
        truth,
    )


# ------------------------------------------------------------------------------------------------
# Convergence with the defaults


@pytest.mark.parametrize("manifold", ["grassmann", "stiefel"])
def test_pca_reaches_the_sum_of_top_eigenvalues(manifold):
    problem, x0, optimum, cov = pca_problem(manifold)
    result = IMuon(**QUIET).run(problem, initial_point=x0)
    assert abs(result.cost - optimum) <= 1e-8 * abs(optimum)
    assert np.allclose(result.point.T @ result.point, np.eye(3), atol=1e-10)
    # Same optimum as Pymanopt's own solvers.
    for solver in (SteepestDescent(**QUIET), ConjugateGradient(**QUIET)):
        other = solver.run(problem, initial_point=x0)
        assert abs(result.cost - other.cost) <= 1e-8 * abs(optimum)


def test_karcher_mean_of_commuting_matrices():
    problem, x0, truth = karcher_problem()
    result = IMuon(**QUIET).run(problem, initial_point=x0)
    # The default min_gradient_norm=1e-6 stops at distance ~ 1e-6 (the cost is strongly convex near
    # the mean).
    assert result.stopping_criterion.startswith("Terminated - min grad norm")
    np.testing.assert_allclose(result.point, truth, atol=2e-6)
    other = ConjugateGradient(**QUIET).run(problem, initial_point=x0)
    np.testing.assert_allclose(result.point, other.point, atol=2e-6)
    # Tighter: until the line search can no longer resolve a decrease of the cost.
    tight = IMuon(min_gradient_norm=1e-10, **QUIET).run(problem, initial_point=x0)
    np.testing.assert_allclose(tight.point, truth, atol=1e-7)


def test_low_rank_completion_recovers_the_matrix():
    problem, x0, truth = completion_problem()
    result = IMuon(**QUIET).run(problem, initial_point=x0)
    u, s, vt = result.point
    assert np.linalg.norm((u * s) @ vt - truth) <= 1e-6 * np.linalg.norm(truth)
    assert result.stopping_criterion.startswith("Terminated - min grad norm")


def _assert_finite_gradient_norms(result):
    norms = result.log["iterations"]["gradient_norm"]
    assert len(norms) == result.iterations + 1 and np.all(np.isfinite(norms))
    assert result.stopping_criterion.startswith("Terminated - min grad norm")


@pytest.mark.parametrize("gradient", ["factors", "sparse"])
def test_completion_with_repeated_singular_values(gradient):
    """Exact completion of ``U V^T`` (all singular values 1) from a start whose singular values are
    exactly equal: Pymanopt's conversion of ``(du, ds, dvt)`` divides by ``s_i^2 - s_j^2`` there;
    the solver's does not, and every gradient norm stays finite down to the solution."""
    problem, (u0, s0, vt0), truth = completion_problem(gradient=gradient)
    x0 = (u0, np.full_like(s0, s0.mean()), vt0)
    if gradient == "factors":
        with np.errstate(all="ignore"):
            rgrad = problem.manifold.euclidean_to_riemannian_gradient(x0, problem.euclidean_gradient(x0))
        assert not np.all(np.isfinite(rgrad[1]))
    result = IMuon(min_gradient_norm=1e-9, log_verbosity=1, **QUIET).run(problem, initial_point=x0)
    _assert_finite_gradient_norms(result)
    u, s, vt = result.point
    assert np.linalg.norm((u * s) @ vt - truth) <= 1e-8 * np.linalg.norm(truth)
    np.testing.assert_allclose(s, 1.0, atol=1e-8)


@pytest.mark.parametrize("gradient", ["factors", "dense", "factored"])
def test_fixed_rank_quadratic_with_equal_singular_values(gradient):
    """``1/2 ||X - T||^2`` with ``T = U_T I V_T^T`` from a start with equal singular values, with the
    gradient as ``(du, ds, dvt)``, as the dense ``X - T`` or factored ``(U, S, V)``."""
    rng = np.random.default_rng(6)
    m, n, r = 30, 20, 4
    u_t = np.linalg.qr(rng.standard_normal((m, r)))[0]
    v_t = np.linalg.qr(rng.standard_normal((n, r)))[0]
    target = u_t @ v_t.T
    mani = pm.FixedRankEmbedded(m, n, r)

    @pymanopt.function.numpy(mani)
    def cost(u, s, vt):
        return 0.5 * float(np.sum(((u * s) @ vt - target) ** 2))

    @pymanopt.function.numpy(mani)
    def egrad(u, s, vt):
        if gradient == "factored":  # X - T = [u, u_t] diag(s, -1) [vt^T, v_t]^T
            return np.hstack((u, u_t)), np.diag(np.concatenate((s, -np.ones(r)))), np.hstack((vt.T, v_t))
        gamma = (u * s) @ vt - target
        if gradient == "dense":
            return gamma
        return gamma @ vt.T * s, np.einsum("ik,ij,kj->k", u, gamma, vt), s[:, None] * (u.T @ gamma)

    x0 = (
        np.linalg.qr(rng.standard_normal((m, r)))[0],
        np.full(r, 0.5),
        np.linalg.qr(rng.standard_normal((n, r)))[0].T,
    )
    problem = pymanopt.Problem(mani, cost, euclidean_gradient=egrad)
    result = IMuon(min_gradient_norm=1e-8, log_verbosity=1, **QUIET).run(problem, initial_point=x0)
    _assert_finite_gradient_norms(result)
    u, s, vt = result.point
    np.testing.assert_allclose((u * s) @ vt, target, atol=1e-8)


@pytest.mark.parametrize("norm", ["frobenius", "nuclear", ("schatten", 3.0), ("kyfan", 2), ("fmuon", 0.5)])
def test_other_norms_converge(norm):
    problem, x0, optimum, _ = pca_problem("grassmann", n=30, p=3)
    result = IMuon(norm=norm, max_iterations=3000, **QUIET).run(problem, initial_point=x0)
    assert abs(result.cost - optimum) <= 1e-8 * abs(optimum)


def test_newton_schulz_polar_converges():
    problem, x0, optimum, _ = pca_problem("stiefel", n=30, p=3)
    result = IMuon(polar="newton_schulz", **QUIET).run(problem, initial_point=x0)
    assert abs(result.cost - optimum) <= 1e-6 * abs(optimum)


@pytest.mark.parametrize("momentum, nesterov", [(0.5, True), (0.9, False)])
def test_momentum_converges_and_uses_transport(momentum, nesterov, monkeypatch):
    problem, x0, optimum, _ = pca_problem("stiefel", n=30, p=3)
    calls = []
    transport = problem.manifold.transport
    monkeypatch.setattr(problem.manifold, "transport", lambda a, b, v: calls.append(1) or transport(a, b, v))
    result = IMuon(momentum=momentum, nesterov=nesterov, max_iterations=3000, **QUIET).run(problem, initial_point=x0)
    assert abs(result.cost - optimum) <= 1e-8 * abs(optimum)
    assert len(calls) >= result.iterations - 5


def test_stacked_and_product_manifolds_converge():
    """PCA on Grassmann(n, p, k=2) x quadratic on SPD(3, k=2): both parts reach their optima."""
    rng = np.random.default_rng(1)
    n, p = 20, 2
    lam = np.concatenate([[1.0, 0.8], np.linspace(0.5, 0.0, n - p)])
    qs = [np.linalg.qr(rng.standard_normal((n, n)))[0] for _ in range(2)]
    covs = np.stack([(q * lam) @ q.T for q in qs])
    target = np.stack([np.diag([1.0, 2.0, 3.0]), np.diag([0.5, 1.0, 4.0])])
    mani = pm.Product([pm.Grassmann(n, p, k=2), pm.SymmetricPositiveDefinite(3, k=2)])

    @pymanopt.function.autograd(mani)
    def cost(y, x):
        return -anp.sum(y * (covs @ y)) + 0.5 * anp.sum((x - target) ** 2)

    problem = pymanopt.Problem(mani, cost)
    x0 = [
        np.stack([np.linalg.qr(rng.standard_normal((n, p)))[0] for _ in range(2)]),
        np.stack([np.eye(3)] * 2),
    ]
    result = IMuon(max_iterations=2000, **QUIET).run(problem, initial_point=x0)
    np.testing.assert_allclose(result.cost, -2 * 1.8, rtol=1e-8)
    np.testing.assert_allclose(result.point[1], target, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Backends


def _backend_problem(backend: str):
    rng = np.random.default_rng(2)
    n, p = 20, 2
    lam = np.concatenate([[1.0, 0.8], np.linspace(0.5, 0.0, n - p)])
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    cov = (q * lam) @ q.T
    mani = pm.Stiefel(n, p)
    if backend == "autograd":

        @pymanopt.function.autograd(mani)
        def cost(x):
            return -anp.trace(x.T @ cov @ x)

        return pymanopt.Problem(mani, cost)
    if backend == "pytorch":
        cov_t = torch.from_numpy(cov)

        @pymanopt.function.pytorch(mani)
        def cost(x):
            return -torch.trace(x.T @ cov_t @ x)

        return pymanopt.Problem(mani, cost)
    if backend == "jax":
        jnp = pytest.importorskip("jax.numpy")

        @pymanopt.function.jax(mani)
        def cost(x):
            return -jnp.trace(x.T @ cov @ x)

        return pymanopt.Problem(mani, cost)

    @pymanopt.function.numpy(mani)
    def cost(x):
        return -float(np.trace(x.T @ cov @ x))

    if backend == "numpy-riemannian":

        @pymanopt.function.numpy(mani)
        def rgrad(x):
            g = -2.0 * cov @ x
            return g - x @ (0.5 * (x.T @ g + g.T @ x))

        return pymanopt.Problem(mani, cost, riemannian_gradient=rgrad)

    @pymanopt.function.numpy(mani)
    def egrad(x):
        return -2.0 * cov @ x

    return pymanopt.Problem(mani, cost, euclidean_gradient=egrad)


@pytest.mark.parametrize("backend", ["autograd", "pytorch", "numpy", "numpy-riemannian", "jax"])
def test_every_backend(backend):
    if backend == "jax":
        pytest.importorskip("jax")
    problem = _backend_problem(backend)
    x0 = np.linalg.qr(np.random.default_rng(3).standard_normal((20, 2)))[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Pymanopt's torch backend next to numpy's BLAS pool: avoid spinning
    try:
        result = IMuon(**QUIET).run(problem, initial_point=x0)
    finally:
        torch.set_num_threads(threads)
    assert abs(result.cost + 1.8) <= 1e-8 * 1.8
    assert result.stopping_criterion.startswith("Terminated - min grad norm")


@pytest.mark.parametrize("backend", ["autograd", "pytorch", "jax"])
def test_fixed_rank_with_every_autodiff_backend(backend):
    """Autodiff cost of (u, s, vt): a rank-2 fit reaches the best rank-2 approximation."""
    rng = np.random.default_rng(4)
    target = rng.standard_normal((8, 6))
    mani = pm.FixedRankEmbedded(8, 6, 2)
    if backend == "autograd":

        @pymanopt.function.autograd(mani)
        def cost(u, s, vt):
            return 0.5 * anp.sum((u @ anp.diag(s) @ vt - target) ** 2)

    elif backend == "pytorch":
        target_t = torch.from_numpy(target)

        @pymanopt.function.pytorch(mani)
        def cost(u, s, vt):
            return 0.5 * torch.sum(((u * s) @ vt - target_t) ** 2)

    else:
        jnp = pytest.importorskip("jax.numpy")

        @pymanopt.function.jax(mani)
        def cost(u, s, vt):
            return 0.5 * jnp.sum(((u * s) @ vt - target) ** 2)

    sv = np.linalg.svd(target, compute_uv=False)
    np.random.seed(0)  # noqa: NPY002 - Pymanopt's random_point uses the global RNG
    # Contiguous copies: Pymanopt's torch backend warns about random_point's reversed s.
    x0 = tuple(np.ascontiguousarray(a) for a in mani.random_point())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = IMuon(**QUIET).run(pymanopt.Problem(mani, cost), initial_point=x0)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(result.cost, 0.5 * np.sum(sv[2:] ** 2), rtol=1e-8)


# ------------------------------------------------------------------------------------------------
# Stopping criteria, printing, logging


def test_max_iterations():
    problem, x0, _, _ = pca_problem()
    result = IMuon(max_iterations=7, **QUIET).run(problem, initial_point=x0)
    assert result.iterations == 7
    assert "max iterations" in result.stopping_criterion


def test_min_gradient_norm():
    problem, x0, _, _ = pca_problem()
    result = IMuon(min_gradient_norm=1e-3, **QUIET).run(problem, initial_point=x0)
    assert result.gradient_norm < 1e-3
    assert "min grad norm" in result.stopping_criterion
    rgrad = problem.riemannian_gradient(result.point)
    np.testing.assert_allclose(problem.manifold.norm(result.point, rgrad), result.gradient_norm, rtol=1e-10)


def test_max_time():
    problem, x0, _, _ = pca_problem()
    result = IMuon(max_time=0.0, **QUIET).run(problem, initial_point=x0)
    assert "max time" in result.stopping_criterion
    assert result.iterations == 0


def test_max_cost_evaluations_counts_real_evaluations():
    problem, x0, _, _ = pca_problem()
    count = []
    cost = problem.cost

    def counting(x):
        count.append(1)
        return cost(x)

    problem._cost = counting  # noqa: SLF001 - count what the solver calls
    result = IMuon(max_cost_evaluations=20, **QUIET).run(problem, initial_point=x0)
    assert "max cost evals" in result.stopping_criterion
    assert result.cost_evaluations == len(count)
    assert 20 <= result.cost_evaluations <= 20 + 31


def test_min_lmo_gap():
    problem, x0, _, _ = pca_problem()
    result = IMuon(min_lmo_gap=1e-2, min_gradient_norm=0.0, log_verbosity=1, **QUIET).run(problem, initial_point=x0)
    assert "min LMO gap" in result.stopping_criterion
    gaps = result.log["iterations"]["lmo_gap"]
    assert gaps[-1] < 1e-2 <= gaps[-2]


def test_log_entries():
    problem, x0, _, _ = pca_problem()
    result = IMuon(max_iterations=5, log_verbosity=1, **QUIET).run(problem, initial_point=x0)
    log = result.log
    assert log["optimizer"] == "IMuon"
    assert log["stopping_criteria"]["min_lmo_gap"] is None
    assert "step_size" in log["optimizer_parameters"]
    it = log["iterations"]
    # Pymanopt's convention: rows counted from 1, max_iterations of them; the last step's point
    # (the result) has no row
    assert it["iteration"] == list(range(1, 6))
    for key in ("cost", "gradient_norm", "lmo_gap", "step_size", "point", "time"):
        assert len(it[key]) == 5
    assert math.isnan(it["step_size"][0]) and all(s > 0 for s in it["step_size"][1:])
    assert np.all(np.diff(it["cost"]) < 0)  # Armijo: monotone decrease
    assert result.cost < it["cost"][-1]
    np.testing.assert_allclose(result.cost, problem.cost(result.point))
    assert IMuon(max_iterations=2, **QUIET).run(problem, initial_point=x0).log["iterations"] is None


def test_verbosity(capsys):
    problem, x0, _, _ = pca_problem()
    IMuon(max_iterations=3, verbosity=0).run(problem, initial_point=x0)
    assert capsys.readouterr().out == ""
    IMuon(max_iterations=3, verbosity=2).run(problem, initial_point=x0)
    out = capsys.readouterr().out
    header = out.splitlines()[1]
    for column in ("Iteration", "Cost", "Gradient norm", "LMO gap"):
        assert column in header
    assert "Terminated - max iterations" in out
    IMuon(max_iterations=3, verbosity=1).run(problem, initial_point=x0)
    out = capsys.readouterr().out
    assert "Optimizing..." in out and "Iteration" not in out


# ------------------------------------------------------------------------------------------------
# Step-size rules


def test_armijo_slope_is_the_lmo_gap(monkeypatch):
    """The line search receives slope = gap = inner_product(x, rgrad, xi) (df0 = -gap)."""
    problem, x0, _, _ = pca_problem("stiefel")
    seen = []

    class Recording(Armijo):
        def search(self, objective, manifold, x, xi, f0, slope):
            rgrad = problem.riemannian_gradient(x)
            seen.append((slope, manifold.inner_product(x, rgrad, xi), f0, objective(x)))
            return super().search(objective, manifold, x, xi, f0, slope)

    IMuon(step_size=Recording(), max_iterations=5, **QUIET).run(problem, initial_point=x0)
    assert len(seen) == 5
    for slope, inner, f0, f in seen:
        np.testing.assert_allclose(slope, inner, rtol=1e-10)
        assert f0 == f


@pytest.mark.parametrize(
    "rule",
    [
        0.01,
        "inverse_sqrt",
        "cosine",
        "exponential",
        InverseSqrt(0.05, warmup=10.0),
        Cosine(0.1, horizon=50, final=0.001),
        Exponential(0.1, 0.95),
        lambda t: 0.05 / (1 + t),
    ],
)
def test_schedules_run_and_decrease(rule):
    problem, x0, _, _ = pca_problem()
    result = IMuon(step_size=rule, max_iterations=60, log_verbosity=1, **QUIET).run(problem, initial_point=x0)
    assert result.iterations == 60
    assert result.cost < problem.cost(x0)
    assert result.cost_evaluations == 61  # schedules evaluate the cost once per new point


def test_constant_step_is_exact():
    sched = Constant(0.3)
    assert [sched.rate(t) for t in range(3)] == [0.3, 0.3, 0.3]
    cos = Cosine(1.0, final=0.0)
    cos.start(10)
    assert cos.rate(0) == 1.0 and abs(cos.rate(5) - 0.5) < 1e-12 and cos.rate(10) == 0.0
    assert abs(InverseSqrt(0.2).rate(3) - 0.1) < 1e-12


def test_reuse_line_searcher_keeps_the_armijo_state():
    problem, x0, _, _ = pca_problem()
    solver = IMuon(max_iterations=3, **QUIET)
    solver.run(problem, initial_point=x0)
    first = solver.step_size_rule
    solver.run(problem, initial_point=x0, reuse_line_searcher=True)
    assert solver.step_size_rule is first
    solver.run(problem, initial_point=x0)
    assert solver.step_size_rule is not first


def test_custom_rule_object():
    class Half(StepSizeRule):
        def search(self, objective, manifold, x, xi, f0, slope):
            from imuon_manopt.optimizers import StepResult

            return StepResult(0.5, manifold.retraction(x, -0.5 * xi), None, 0)

    problem, x0, _, _ = pca_problem()
    result = IMuon(step_size=Half(), max_iterations=2, **QUIET).run(problem, initial_point=x0)
    assert result.step_size == 0.5


def test_custom_geometry_for_an_unsupported_manifold():
    """Oblique (unit columns) through a user MetricOperator: one sphere per column."""

    class ObliqueColumns(MetricOperator):
        structure = ("general",)

        def project(self, state, egrad):
            radial = (state * egrad).sum(-2, keepdim=True)
            return ((egrad - radial * state).mT.unsqueeze(-1),)  # (p, n, 1): a batch of column vectors

        def whiten(self, state, blocks):
            return blocks

        unwhiten = whiten

        def tangent(self, state, blocks):
            return blocks[0].squeeze(-1).mT

    rng = np.random.default_rng(5)
    mani = pm.Oblique(6, 3)
    target = rng.standard_normal((6, 3))

    @pymanopt.function.autograd(mani)
    def cost(x):
        return -anp.sum(x * target)

    x0 = mani.random_point()
    with pytest.raises(TypeError, match="geometry="):
        IMuon(**QUIET).run(pymanopt.Problem(mani, cost), initial_point=x0)
    result = IMuon(geometry=ObliqueColumns(), **QUIET).run(pymanopt.Problem(mani, cost), initial_point=x0)
    np.testing.assert_allclose(result.point, target / np.linalg.norm(target, axis=0), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"step_size": -0.1}, "step_size"),
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": float("nan")}, "step_size"),
        ({"step_size": "adam"}, "unknown step_size"),
        ({"momentum": 1.0}, r"momentum .*\[0, 1\)"),
        ({"momentum": -0.1}, "momentum"),
        ({"norm": "operator"}, "unknown norm 'operator'"),
        ({"norm": "schatten"}, "p"),
        ({"norm": ("schatten", 0.5)}, "1 <= p"),
        ({"norm": ("spectral", 3.0)}, "takes no parameter"),
        ({"norm": ("kyfan", 0)}, "int >= 1"),
        ({"norm": ("fmuon", 2.0)}, "alpha"),
        ({"polar": "randomized"}, "needs norm=\\('kyfan', k\\)"),
        ({"polar": {"method": "randomized", "power_iters": -1}, "norm": ("kyfan", 2)}, "power_iters"),
        ({"nesterov": "no"}, "nesterov must be True"),
        ({"nesterov": 1}, "nesterov must be True"),
        ({"polar": "qr"}, "unknown polar method 'qr'"),
        ({"polar": "newton_schulz", "norm": "frobenius"}, "spectral"),
        ({"min_lmo_gap": -1.0}, "min_lmo_gap"),
    ],
)
def test_bad_constructor_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IMuon(**kwargs)


def test_bad_rule_types():
    with pytest.raises(TypeError, match="step_size"):
        IMuon(step_size=[0.1])
    with pytest.raises(TypeError, match="MetricOperator"):
        IMuon(geometry=EuclideanGeometry)  # the class, not an instance
    for kwargs in (
        {"contraction_factor": 1.0},
        {"sufficient_decrease": 0.0},
        {"growth_factor": 0.5},
        {"initial_step_size": -1.0},
        {"max_backtracks": -1},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            Armijo(**kwargs)
    with pytest.raises(TypeError):
        Schedule(0.1)


def _nan_after(problem, threshold: float):
    """Wrap the cost so that it is NaN once the cost drops below ``threshold``."""
    cost = problem.cost

    def wrapped(x):
        value = cost(x)
        return float("nan") if value < threshold else value

    problem._cost = wrapped  # noqa: SLF001
    return problem


@pytest.mark.parametrize("step_size", [0.05, "armijo"])
def test_nan_cost_stops_with_a_finite_point(step_size):
    problem, x0, optimum, _ = pca_problem()
    f0 = problem.cost(x0)
    problem = _nan_after(problem, 0.5 * (f0 + optimum))
    result = IMuon(step_size=step_size, **QUIET).run(problem, initial_point=x0)
    assert np.all(np.isfinite(result.point)) and math.isfinite(result.cost)
    if step_size == "armijo":  # Armijo rejects NaN trials: it ends on the step-size criterion
        assert result.stopping_criterion
    else:
        assert "non-finite" in result.stopping_criterion
    assert result.cost >= 0.5 * (f0 + optimum)


def test_nan_gradient_stops_with_a_finite_point():
    problem, x0, _, cov = pca_problem()
    mani = problem.manifold
    calls = []

    @pymanopt.function.numpy(mani)
    def cost(x):
        return -float(np.sum(x * (cov @ x)))

    @pymanopt.function.numpy(mani)
    def egrad(x):
        calls.append(1)
        return np.full_like(x, np.nan) if len(calls) > 3 else -2.0 * (cov @ x)

    result = IMuon(**QUIET).run(pymanopt.Problem(mani, cost, euclidean_gradient=egrad), initial_point=x0)
    assert "non-finite" in result.stopping_criterion
    assert np.all(np.isfinite(result.point)) and math.isfinite(result.cost)
    assert result.iterations == 3


@pytest.mark.parametrize("norm", [("kyfan", 2), ("fmuon", 0.5)])
def test_min_lmo_gap_with_the_family_norms_is_the_dual_norm_of_the_projected_gradient(norm):
    """Grassmann (orthonormal representative): H = (I - X X^T) E, so the logged gap at each point is the dual norm
    written out: KF_2(H) = s_1 + s_2, or 0.5 ||H||_* + 0.5 ||H||_F; the run stops by the LMO-gap rule."""
    problem, x0, _, cov = pca_problem()
    result = IMuon(norm=norm, min_lmo_gap=1e-2, min_gradient_norm=0.0, log_verbosity=1, **QUIET).run(
        problem, initial_point=x0
    )
    assert "min LMO gap" in result.stopping_criterion
    log = result.log["iterations"]
    assert log["lmo_gap"][-1] < 1e-2 <= log["lmo_gap"][-2]
    for x, gap in zip(log["point"][::7], log["lmo_gap"][::7]):
        e = -2.0 * (cov @ x)
        s = np.linalg.svd(e - x @ (x.T @ e), compute_uv=False)
        want = s[:2].sum() if norm[0] == "kyfan" else 0.5 * s.sum() + 0.5 * np.linalg.norm(s)
        assert gap == pytest.approx(want, rel=1e-9)
