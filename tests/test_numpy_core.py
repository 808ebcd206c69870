"""The core's numpy path: small numpy inputs computed in numpy give the torch path's directions and gaps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import imuon_manopt.direction as direction_module
from imuon_manopt import _backend
from imuon_manopt.direction import flat_covector, intrinsic_direction
from imuon_manopt.geometry import SPD, Euclidean, FixedRank, Grassmann, Product, Sphere, Stiefel

NORMS = ["spectral", "frobenius", "nuclear", ("schatten", 3.0)]


def _orthonormal(rng, n, p):
    return np.linalg.qr(rng.standard_normal((n, p)))[0]


def _cases():
    rng = np.random.default_rng(0)
    x = _orthonormal(rng, 12, 4)
    v = rng.standard_normal(7)
    b, a = rng.standard_normal((9, 3)), rng.standard_normal((3, 8))
    s = rng.standard_normal((5, 5))
    return [
        ("stiefel", Stiefel(), x, rng.standard_normal(x.shape)),
        ("stiefel n<2p", Stiefel(), _orthonormal(rng, 6, 4), rng.standard_normal((6, 4))),
        ("grassmann", Grassmann(), x, rng.standard_normal(x.shape)),
        ("sphere", Sphere(), v / np.linalg.norm(v), rng.standard_normal(7)),
        ("euclidean", Euclidean(), rng.standard_normal((5, 3)), rng.standard_normal((5, 3))),
        ("spd", SPD(), s @ s.T + np.eye(5), rng.standard_normal((5, 5))),
        ("fixed rank", FixedRank(), (b, a), (rng.standard_normal(b.shape), rng.standard_normal(a.shape))),
        (
            "product",
            Product([Stiefel(), Sphere()]),
            [x, v / np.linalg.norm(v)],
            [rng.standard_normal(x.shape), rng.standard_normal(7)],
        ),
    ]


def _torch(tree):
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(tree)
    return type(tree)(_torch(t) for t in tree)


def _flat(tree):
    if isinstance(tree, (list, tuple)):
        return [leaf for t in tree for leaf in _flat(t)]
    return [np.asarray(tree)]


@pytest.mark.parametrize("norm", NORMS, ids=str)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_numpy_path_equals_torch_path(case, norm):
    _, geometry, x, e = case
    assert geometry.supports_numpy
    d_np = intrinsic_direction(geometry, x, e, norm)
    d_t = intrinsic_direction(geometry, _torch(x), _torch(e), norm)
    assert isinstance(d_np.gap, float)
    for got, want in zip(_flat(d_np.xi), _flat(d_t.xi)):
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, want, atol=1e-12)
    assert d_np.gap == pytest.approx(float(d_t.gap), rel=1e-12)


def test_numpy_path_is_taken_for_small_inputs_only(monkeypatch):
    """Small numpy inputs never reach torch; above NUMPY_MAX_ELEMENTS (or for a user geometry) they are converted."""
    rng = np.random.default_rng(1)
    x, e = _orthonormal(rng, 12, 4), rng.standard_normal((12, 4))
    converted = []
    original = direction_module._to_torch
    monkeypatch.setattr(direction_module, "_to_torch", lambda t: converted.append(1) or original(t))
    intrinsic_direction(Grassmann(), x, e)
    assert not converted
    monkeypatch.setattr(_backend, "NUMPY_MAX_ELEMENTS", 10)
    d = intrinsic_direction(Grassmann(), x, e)
    assert converted and isinstance(d.xi, np.ndarray)


def test_mixed_and_scalar_leaves_take_the_torch_path():
    geometry = Product([Euclidean(), Euclidean()])
    d = intrinsic_direction(geometry, [np.ones((2, 2)), 1.0], [np.ones((2, 2)), 2.0])
    np.testing.assert_allclose(d.xi[0], np.full((2, 2), 0.5))
    assert d.gap == pytest.approx(4.0)  # nuclear norm 2 of the 2x2 block of ones, plus |2|
    d = intrinsic_direction(geometry, [np.ones((2, 2)), torch.ones(2, 2)], [np.ones((2, 2)), torch.ones(2, 2)])
    assert d.gap == pytest.approx(4.0)


@pytest.mark.parametrize("array", ["numpy", "torch"])
def test_balanced_fixed_rank_equals_the_qr_factorization(array):
    """On balanced factors ``(U s^{1/2}, s^{1/2} V^T)`` the diagonal whitening of FixedRank('balanced') is the QR
    path's, for the direction, the gap and the lowering map; a batch of two points."""
    rng = np.random.default_rng(2)
    u = np.stack([_orthonormal(rng, 10, 3) for _ in range(2)])
    v = np.stack([_orthonormal(rng, 7, 3) for _ in range(2)])
    root = np.sqrt(np.array([[3.0, 2.0, 0.5], [1.0, 1.0, 1.0]]))
    x = (u * root[:, None, :], root[:, :, None] * v.mT)
    e = (rng.standard_normal((2, 10, 3)), rng.standard_normal((2, 3, 7)))
    w = (rng.standard_normal((2, 10, 3)), rng.standard_normal((2, 3, 7)))
    if array == "torch":
        x, e, w = _torch(x), _torch(e), _torch(w)
    balanced, qr = FixedRank("balanced"), FixedRank("qr")
    for norm in NORMS:
        d_b, d_q = intrinsic_direction(balanced, x, e, norm), intrinsic_direction(qr, x, e, norm)
        for got, want in zip(d_b.xi, d_q.xi):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-12)
        assert float(d_b.gap) == pytest.approx(float(d_q.gap), rel=1e-12)
    for got, want in zip(flat_covector(balanced, x, w), flat_covector(qr, x, w)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-12)


def test_balanced_fixed_rank_refuses_a_rank_deficient_point():
    rng = np.random.default_rng(3)
    u, v = _orthonormal(rng, 6, 2), _orthonormal(rng, 5, 2)
    root = np.sqrt(np.array([1.0, 1e-40]))
    with pytest.raises(ValueError, match="rank-deficient"):
        intrinsic_direction(FixedRank("balanced"), (u * root, root[:, None] * v.T), (u, v.T))


@pytest.mark.parametrize("array", ["numpy", "torch"])
def test_a_gradient_along_the_point_gives_no_direction(array):
    """At a critical point the projected gradient is zero in exact arithmetic and rounding noise in floating point;
    the LMO must not normalize that noise into a unit step (Sphere: e parallel to x; Grassmann and Stiefel: E = X S
    with S symmetric, e.g. the gradient of tr(X^T C X) at an eigenbasis)."""
    rng = np.random.default_rng(5)
    v = rng.standard_normal(9)
    v /= np.linalg.norm(v)
    x = _orthonormal(rng, 9, 3)
    sym = rng.standard_normal((3, 3))
    cases = [(Sphere(), v, 3.7 * v), (Grassmann(), x, x @ (sym + sym.T)), (Stiefel(), x, x @ (sym + sym.T))]
    for geometry, point, gradient in cases:
        if array == "torch":
            point, gradient = torch.from_numpy(point), torch.from_numpy(gradient)
        d = intrinsic_direction(geometry, point, gradient)
        assert np.all(np.asarray(d.xi) == 0), geometry
        assert float(d.gap) == 0.0


@pytest.mark.parametrize("transform", ["muoneq_row", ("root_clip", 0.9), ("mimuon", 0.1)], ids=str)
def test_input_transforms_on_numpy_inputs_take_the_torch_path(transform):
    rng = np.random.default_rng(6)
    x, e = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    d_np = intrinsic_direction(Euclidean(), x, e, transform=transform)
    d_t = intrinsic_direction(Euclidean(), torch.from_numpy(x), torch.from_numpy(e), transform=transform)
    assert isinstance(d_np.xi, np.ndarray)
    np.testing.assert_allclose(d_np.xi, d_t.xi.numpy(), atol=1e-12)
    assert d_np.gap == pytest.approx(float(d_t.gap), rel=1e-12)


@pytest.mark.parametrize(
    "values",
    [
        [3.0, -4.0, 0.0],  # ordinary: (0.6, -0.8, 0), norm 5
        [0.0, 0.0, 0.0],  # zero: zero factor, zero norm
        [5e-324, -5e-324, 0.0],  # subnormal: still a unit vector
        [1e300, -1e300, 1e300],  # huge: no overflow
        [1.0, float("nan"), 0.0],  # NaN propagates
    ],
    ids=["ordinary", "zero", "subnormal", "huge", "nan"],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numpy_vector_polar_factor_equals_torch_and_the_closed_form(values, dtype):
    """A vector's polar factor is ``v / ||v||`` and its singular value ``||v||``: the numpy kernel gives the torch
    kernel's result bit for bit on ordinary, zero, subnormal, huge and NaN vectors, and the closed form where the
    norm is representable."""
    from imuon_manopt.polar import vector_parts

    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        v = np.array(values, dtype=dtype)[:, None]
    if not np.all((v != 0) == (np.array(values)[:, None] != 0)):  # (float32 flushes the subnormal to zero)
        v = np.array([1e-45, -1e-45, 0.0], dtype=dtype)[:, None]
    z_np, n_np = vector_parts(v)
    z_t, n_t = vector_parts(torch.from_numpy(v))
    np.testing.assert_array_equal(z_np, z_t.numpy())
    np.testing.assert_array_equal(n_np, n_t.numpy())
    if np.all(np.isfinite(v)) and np.any(v != 0):
        w = v[:, 0].astype(np.float64)
        w = w / np.abs(w).max()  # (exact: a power of two apart or the same value)
        np.testing.assert_allclose(z_np[:, 0], w / np.sqrt(np.sum(w**2)), rtol=1e-6 if dtype == np.float32 else 1e-15)
        assert np.all(np.abs(np.linalg.norm(z_np.astype(np.float64)) - 1.0) < 1e-6)


def test_drop_rounding_on_one_matrix_equals_the_batched_rule():
    """``drop_rounding`` on a single matrix (the two-float test) keeps or zeroes exactly what the per-matrix rule does
    on the same matrix inside a batch, NaN kept."""
    from imuon_manopt.geometry.base import drop_rounding

    rng = np.random.default_rng(5)
    source = rng.standard_normal((6, 4))
    eps = np.finfo(np.float64).eps
    cases = [rng.standard_normal((6, 4)), source * (3 * eps), np.zeros((6, 4)), np.full((6, 4), np.nan)]
    for block in cases:
        one = drop_rounding(block, source, 10)
        batched = drop_rounding(np.stack([block, source]), np.stack([source, source]), 10)[0]
        np.testing.assert_array_equal(one, batched)
    assert not np.any(drop_rounding(source * (3 * eps), source, 10))
    assert np.all(drop_rounding(source, source, 10) == source)
