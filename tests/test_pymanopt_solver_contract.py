"""Pymanopt solver contract: Armijo at rounding level, the exact sphere step, metric lowering for custom
geometries, Pymanopt's iteration counting, argument validation in one place, and gradient shape errors."""

from __future__ import annotations

import math

import numpy as np
import pymanopt
import pytest
import torch
from pymanopt import manifolds as pm

from imuon_manopt.direction import flat_covector, intrinsic_direction
from imuon_manopt.geometry import SPD, Sphere
from imuon_manopt.optimizers import Armijo, IMuon
from imuon_manopt.optimizers._pymanopt_geometry import host_geometry

QUIET = {"verbosity": 0}


def _pca_example(seed: int):
    """Pymanopt's PCA example (Stiefel(3, 2), squared reconstruction error of 200 samples), numpy backend."""
    rng = np.random.RandomState(seed)
    samples = rng.randn(200, 3) @ np.diag([3.0, 2.0, 1.0])
    samples -= samples.mean(axis=0)
    manifold = pm.Stiefel(3, 2)

    @pymanopt.function.numpy(manifold)
    def cost(w):
        return float(np.linalg.norm(samples - samples @ w @ w.T) ** 2)

    @pymanopt.function.numpy(manifold)
    def egrad(w):
        r = samples - samples @ w @ w.T
        return -2.0 * (samples.T @ r + r.T @ samples) @ w

    x0 = np.linalg.qr(rng.randn(3, 2))[0]
    return pymanopt.Problem(manifold, cost, euclidean_gradient=egrad), x0


# ---------------------------------------------------------------------------------------------- Armijo


def test_armijo_rejects_a_step_without_decrease_at_rounding_level():
    # f0 - c * eta * slope rounds to f0: a trial with new_f == f0 used to be accepted.
    manifold = pm.Euclidean(3)
    x = np.ones(3)
    calls = []

    def constant(y):
        calls.append(1)
        return 1.0

    step = Armijo().search(constant, manifold, x, np.ones(3), 1.0, 1e-20)
    assert step.step_size == 0.0 and step.point is x
    assert step.cost_evaluations == len(calls) == 1


def test_armijo_still_accepts_a_real_decrease_below_the_required_rounding():
    manifold = pm.Euclidean(1)
    x = np.array([1.0])
    step = Armijo(initial_step_size=1e-3).search(
        lambda y: 1.0 + float(y[0]) * 1e-10, manifold, x, np.array([1.0]), 1.0 + 1e-10, 1e-20
    )
    assert step.step_size == 1e-3 and step.cost < 1.0 + 1e-10


def test_constant_cost_stops_on_min_step_size():
    manifold = pm.Stiefel(5, 2)

    @pymanopt.function.numpy(manifold)
    def cost(x):
        return 3.0

    @pymanopt.function.numpy(manifold)
    def egrad(x):  # a fake non-zero gradient: no step can decrease the cost
        return np.ones_like(x)

    x0 = np.linalg.qr(np.random.default_rng(0).standard_normal((5, 2)))[0]
    result = IMuon(max_iterations=200, **QUIET).run(
        pymanopt.Problem(manifold, cost, euclidean_gradient=egrad), initial_point=x0
    )
    assert result.stopping_criterion.startswith("Terminated - min step_size")
    assert result.iterations <= 2


@pytest.mark.parametrize("seed", [0, 4])
def test_pymanopt_pca_example_stops_like_steepest_descent(seed):
    # Seed 4 used to cycle between two points with equal cost until max_iterations.
    problem, x0 = _pca_example(seed)
    result = IMuon(max_iterations=300, **QUIET).run(problem, initial_point=x0)
    reference = pymanopt.optimizers.SteepestDescent(**QUIET).run(problem, initial_point=x0)
    assert result.iterations < 100
    assert result.stopping_criterion.startswith(("Terminated - min step_size", "Terminated - min grad norm"))
    assert result.cost == pytest.approx(reference.cost, rel=1e-10)


# ---------------------------------------------------------------------------------------------- Sphere


@pytest.mark.parametrize("polar", ["svd", "newton_schulz"])
def test_sphere_step_moves_exactly_the_step_size(polar):
    # The polar factor of a vector is its normalization: a constant step eta moves the point by the angle
    # atan(eta) under Pymanopt's projective retraction (Newton–Schulz used to move 0.877 eta).
    manifold = pm.Sphere(64)
    rng = np.random.default_rng(1)
    target = rng.standard_normal(64)

    @pymanopt.function.numpy(manifold)
    def cost(x):
        return -float(target @ x)

    @pymanopt.function.numpy(manifold)
    def egrad(x):
        return -target

    x0 = rng.standard_normal(64)
    x0 /= np.linalg.norm(x0)
    result = IMuon(step_size=0.05, polar=polar, max_iterations=1, **QUIET).run(
        pymanopt.Problem(manifold, cost, euclidean_gradient=egrad), initial_point=x0
    )
    angle = math.acos(min(1.0, float(result.point @ x0)))
    assert angle == pytest.approx(math.atan(0.05), rel=1e-9)


@pytest.mark.parametrize("norm,p", [("spectral", None), ("frobenius", None), ("nuclear", None), ("schatten", 3.0)])
@pytest.mark.parametrize("polar", ["svd", "newton_schulz"])
@pytest.mark.parametrize("scale", [1.0, 1e300, 1e-300])
def test_sphere_direction_is_the_normalized_projected_gradient(norm, p, polar, scale):
    # A vector has one singular value, so every norm's direction is P_x(e) / ||P_x(e)|| with gap ||P_x(e)||: the
    # closed form, written out here in float64 (scaled first, so 1e300 and 1e-300 neither overflow nor underflow),
    # against the core's numpy path (the solver's) and its torch path.
    if polar == "newton_schulz" and norm != "spectral":
        pytest.skip("Newton–Schulz applies to the spectral norm only")
    manifold = pm.Sphere(3, 4)
    host = host_geometry(manifold)
    rng = np.random.default_rng(2)
    x = manifold.random_point()
    e = rng.standard_normal((3, 4)) * scale
    spec = norm if p is None else (norm, p)
    v, c = x.reshape(-1), host.core_egrad(x, e)
    g = c / scale - (v @ (c / scale)) * v
    expected, expected_gap = g / np.linalg.norm(g), np.linalg.norm(g) * scale
    d = intrinsic_direction(Sphere(), host.core_point(x), c, spec, polar=polar)
    assert isinstance(d.xi, np.ndarray) and isinstance(d.gap, float)
    np.testing.assert_allclose(d.xi, expected, atol=1e-14)
    assert d.gap == pytest.approx(expected_gap, rel=1e-12)
    t = intrinsic_direction(Sphere(), torch.from_numpy(v), torch.from_numpy(c), spec, polar=polar)
    np.testing.assert_allclose(t.xi.numpy(), expected, atol=1e-14)
    zero = intrinsic_direction(Sphere(), v, np.zeros(12), spec, polar=polar)
    assert np.all(zero.xi == 0) and zero.gap == 0


# ---------------------------------------------------------------------------------------------- flat


def _spd_problem(seed=0, n=4):
    rng = np.random.default_rng(seed)
    manifold = pm.SymmetricPositiveDefinite(n)
    b = rng.standard_normal((n, n))
    x0 = b @ b.T + np.eye(n)
    a = rng.standard_normal((n, n))
    target = x0 + (a + a.T)  # an indefinite gradient at x0: its matrix sign is not +-I

    @pymanopt.function.numpy(manifold)
    def cost(x):
        return float(np.sum((x - target) ** 2))

    @pymanopt.function.numpy(manifold)
    def egrad(x):
        return 2.0 * (x - target)

    return pymanopt.Problem(manifold, cost, euclidean_gradient=egrad), x0


def test_custom_geometry_momentum_lowers_with_the_geometrys_metric():
    # The momentum buffer starts at the Riemannian gradient, so the first momentum step must equal the plain
    # step: that needs the affine-invariant lowering X^{-1} v X^{-1}, not the identity.
    problem, x0 = _spd_problem()
    plain = IMuon(step_size=0.1, geometry=SPD(), max_iterations=1, **QUIET).run(problem, initial_point=x0)
    heavy = IMuon(step_size=0.1, momentum=0.5, nesterov=False, geometry=SPD(), max_iterations=1, **QUIET)
    np.testing.assert_allclose(heavy.run(problem, initial_point=x0).point, plain.point, atol=1e-12)


def test_adapter_flat_is_the_core_flat():
    rng = np.random.default_rng(3)
    for manifold in (pm.SymmetricPositiveDefinite(4), pm.Stiefel(6, 2), pm.Grassmann(5, 2), pm.Euclidean(3, 2)):
        host = host_geometry(manifold)
        x = manifold.random_point()
        v = manifold.random_tangent_vector(x)
        np.testing.assert_allclose(host.flat(x, v), flat_covector(host.geometry, x, v), atol=1e-12)
    x = pm.SymmetricPositiveDefinite(3).random_point()
    v = rng.standard_normal((3, 3))
    v = v + v.T
    expected = np.linalg.solve(x, np.linalg.solve(x, v).T)  # X^{-1} v X^{-1}
    c = flat_covector(SPD(), x, v)  # numpy path
    assert isinstance(c, np.ndarray)
    np.testing.assert_allclose(c, expected, atol=1e-10)
    c_torch = flat_covector(SPD(), torch.from_numpy(x), torch.from_numpy(v))
    np.testing.assert_allclose(c_torch.numpy(), expected, atol=1e-10)


# ---------------------------------------------------------------------------------------------- table, args


def test_iteration_table_counts_from_one_with_max_iterations_rows(capsys):
    problem, x0 = _pca_example(0)
    IMuon(max_iterations=3, verbosity=2).run(problem, initial_point=x0)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split()[0] for line in lines if line.strip() and line.split()[0].isdigit()]
    assert rows == ["1", "2", "3"]
    result = IMuon(max_iterations=3, **QUIET).run(problem, initial_point=x0)
    assert result.iterations == 3 and "max iterations" in result.stopping_criterion


def test_norm_names_resolve_in_one_place():
    problem, x0 = _pca_example(0)
    runs = [
        IMuon(norm=norm, max_iterations=4, step_size=0.1, **QUIET).run(problem, initial_point=x0).point
        for norm in ("spectral", "Spectral", " SPECTRAL ", ("schatten", math.inf), ("fmuon", 1.0))
    ]
    for point in runs[1:]:
        np.testing.assert_array_equal(point, runs[0])
    frob = IMuon(norm=("schatten", 2), max_iterations=4, step_size=0.1, **QUIET).run(problem, initial_point=x0)
    ref = IMuon(norm="Frobenius", max_iterations=4, step_size=0.1, **QUIET).run(problem, initial_point=x0)
    np.testing.assert_array_equal(frob.point, ref.point)


@pytest.mark.parametrize("bad", ["no", 0, None, np.float64(1.0)])
def test_nesterov_must_be_a_bool(bad):
    with pytest.raises(ValueError, match="nesterov must be True"):
        IMuon(momentum=0.5, nesterov=bad)
    IMuon(momentum=0.5, nesterov=np.bool_(False))


@pytest.mark.parametrize("which", ["euclidean", "riemannian"])
def test_gradient_of_the_wrong_shape_names_the_gradient(which):
    manifold = pm.Stiefel(6, 2)

    @pymanopt.function.numpy(manifold)
    def cost(x):
        return float(np.sum(x))

    @pymanopt.function.numpy(manifold)
    def grad(x):
        return np.ones((2, 6))

    kwargs = {"euclidean_gradient": grad} if which == "euclidean" else {"riemannian_gradient": grad}
    problem = pymanopt.Problem(manifold, cost, **kwargs)
    x0 = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 2)))[0]
    with pytest.raises(ValueError, match=f"{which}_gradient returned \\(2, 6\\).*shape \\(6, 2\\)"):
        IMuon(**QUIET).run(problem, initial_point=x0)


def test_product_component_gradient_of_the_wrong_shape_names_the_component():
    manifold = pm.Product([pm.Sphere(3), pm.Euclidean(2)])

    @pymanopt.function.numpy(manifold)
    def cost(x, y):
        return float(np.sum(x) + np.sum(y))

    @pymanopt.function.numpy(manifold)
    def egrad(x, y):
        return [np.ones(3), np.ones(5)]

    problem = pymanopt.Problem(manifold, cost, euclidean_gradient=egrad)
    with pytest.raises(ValueError, match=r"Euclidean: the problem's euclidean_gradient returned \(5,\)"):
        IMuon(**QUIET).run(problem, initial_point=[np.array([1.0, 0.0, 0.0]), np.zeros(2)])


def test_torch_threads_restored():
    threads = torch.get_num_threads()
    problem, x0 = _spd_problem()
    IMuon(max_iterations=2, momentum=0.5, geometry=SPD(), **QUIET).run(problem, initial_point=x0)
    assert torch.get_num_threads() == threads
