"""Tests of imuon_manopt.polar: exact and Newton–Schulz polar factor and matrix sign.

Truths are computed independently here: numpy's float64 SVD/eigh, and scalar evaluations of the
Newton–Schulz polynomials with the coefficients re-typed from the Polar Express paper
(arXiv:2505.16932, Algorithm 1) and from torch.optim.Muon.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imuon_manopt.polar import _use_gram, msign, polar

# ---------------------------------------------------------------------------------------------
# independent references

PE_RAW = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
PE = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in PE_RAW[:-1]] + [PE_RAW[-1]]
MUON = (3.4445, -4.7750, 2.0315)


def np_polar(x, rtol=None):
    """float64 polar factor via numpy's SVD, dropping singular values below eps*max(m,n)*s_max."""
    x = np.asarray(x, dtype=np.float64)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    tol = np.finfo(np.float64).eps * max(x.shape[-2:]) * s[..., :1] if rtol is None else rtol
    keep = (s > tol).astype(np.float64)
    return (u * keep[..., None, :]) @ vt


def schedule(coeffs, steps):
    return [coeffs[min(i, len(coeffs) - 1)] for i in range(steps)]


def scalar_ns(sigma, coeffs, steps, margin):
    """What the iteration does to each singular value: the composed odd polynomials applied to
    sigma / (margin * ||X||_F) (the caller passes sigma already divided by ||X||_F)."""
    y = np.asarray(sigma, dtype=np.float64) / margin
    for a, b, c in schedule(coeffs, steps):
        y = a * y + b * y**3 + c * y**5
    return y


def np_ns(x, coeffs, steps, margin=1.0):
    """Plain float64 numpy Newton–Schulz on the short side (reference implementation)."""
    x = np.asarray(x, dtype=np.float64)
    tall = x.shape[0] > x.shape[1]
    y = x.T if tall else x
    y = y / (margin * np.linalg.norm(y))
    for a, b, c in schedule(coeffs, steps):
        g = y @ y.T
        y = a * y + (b * g + c * g @ g) @ y
    return y.T if tall else y


def with_singular_values(m, n, s, rng):
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (u * np.asarray(s, dtype=np.float64)) @ v.T


def orth_error(z):
    """||Z_s^T Z_s - I||_2 on the short side."""
    z = np.asarray(z, dtype=np.float64)
    g = z.T @ z if z.shape[0] >= z.shape[1] else z @ z.T
    return np.linalg.norm(g - np.eye(g.shape[0]), 2)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


SHAPES = [(6, 6), (9, 4), (4, 9), (1, 5), (5, 1)]


# ---------------------------------------------------------------------------------------------
# exact path


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_svd_polar_matches_numpy(shape, rng):
    x = rng.standard_normal(shape)
    z = polar(x)
    assert isinstance(z, np.ndarray) and z.dtype == np.float64 and z.shape == shape
    np.testing.assert_allclose(z, np_polar(x), atol=1e-12)


def test_svd_polar_torch_in_torch_out_and_batched_equals_loop(rng):
    x = torch.from_numpy(rng.standard_normal((2, 3, 5, 4)))
    z = polar(x)
    assert isinstance(z, torch.Tensor) and z.dtype == torch.float64 and z.shape == x.shape
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(z[i, j].numpy(), np_polar(x[i, j].numpy()), atol=1e-12)


def test_svd_polar_rank_deficient_has_no_spurious_directions(rng):
    a, b = rng.standard_normal((7, 2)), rng.standard_normal((5, 2))
    x = a @ b.T  # rank 2
    z = polar(x)
    sv = np.linalg.svd(z, compute_uv=False)
    np.testing.assert_allclose(sv[:2], 1.0, atol=1e-12)
    assert np.all(sv[2:] < 1e-12)
    np.testing.assert_allclose(z, np_polar(x, rtol=1e-8), atol=1e-10)
    # nothing outside the column/row spaces of x
    null = np.linalg.svd(b.T)[2][2:].T  # directions orthogonal to the rows of x
    assert np.abs(z @ null).max() < 1e-12


@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_zero_input_gives_exact_zero(method):
    for shape in [(4, 4), (6, 3), (2, 3, 5)]:
        z = polar(np.zeros(shape), method=method)
        assert np.array_equal(z, np.zeros(shape))
    z = polar(torch.zeros(3, 4, dtype=torch.bfloat16), method=method)
    assert z.dtype == torch.bfloat16 and torch.equal(z, torch.zeros(3, 4, dtype=torch.bfloat16))


@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_tiny_and_huge_inputs_float32(method, scale, rng):
    """Scaling by the max-abs entry first keeps float32 from under/overflowing (1e30^2 overflows,
    1e-30^2 underflows); the polar factor is scale invariant."""
    x = rng.standard_normal((6, 4))
    ref = polar(x.astype(np.float32), method=method)
    z = polar((x * scale).astype(np.float32), method=method)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z, ref, atol=2e-5)


@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_subnormal_float32_input(method, rng):
    """Entries below float32's smallest normal number (~1.2e-38) keep only a few bits, but the
    polar factor of what is stored is still found: orthonormal, and equal to the float64 one."""
    x = (rng.standard_normal((6, 4)) * 1e-43).astype(np.float32)
    assert 0 < np.abs(x).max() < np.finfo(np.float32).tiny
    z = polar(x, method=method, steps=8)
    ref = polar(x.astype(np.float64) * 1e41)  # the same stored matrix, rescaled exactly in float64
    np.testing.assert_allclose(z, ref, atol=1e-4)


def test_empty_input():
    assert polar(np.zeros((0, 3))).shape == (0, 3)
    assert polar(np.zeros((2, 0, 3)), method="newton_schulz").shape == (2, 0, 3)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 7),
    n=st.integers(1, 7),
    batch=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**31 - 1),
)
def test_svd_polar_properties(m, n, batch, seed):
    """Z Z^T Z = Z and <X, Z> = ||X||_nuclear (numpy float64 SVD), for any shape and batch."""
    x = np.random.default_rng(seed).standard_normal((*batch, m, n))
    z = polar(x)
    np.testing.assert_allclose(z @ np.swapaxes(z, -1, -2) @ z, z, atol=1e-10)
    nuc = np.linalg.svd(x, compute_uv=False).sum(-1)
    np.testing.assert_allclose((x * z).sum((-2, -1)), nuc, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Newton–Schulz path


@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (5, 12)], ids=str)
@pytest.mark.parametrize("steps", [1, 5, 9])
def test_ns_acts_on_singular_values_as_the_composed_polynomial(shape, steps, rng):
    """Z = U p(Sigma / (1.01 ||X||_F)) V^T with p the composition of the Polar Express quintics
    (float64; the iteration is exact in exact arithmetic, so 1e-10 covers the round-off)."""
    m, n = shape
    x = with_singular_values(m, n, np.geomspace(3.0, 0.01, min(m, n)), rng)
    z = polar(x, method="newton_schulz", steps=steps)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    got = np.einsum("ik,ij,kj->k", u, z, vt)  # u_k^T Z v_k
    want = scalar_ns(s / np.linalg.norm(x), PE, steps, margin=1.01)
    np.testing.assert_allclose(got, want, atol=1e-10)
    np.testing.assert_allclose(z, np_ns(x, PE, steps, margin=1.01), atol=1e-10)


# Long-and-thin inputs (long side >= 4x the short side, enough work) take the Gram-matrix form of
# the same iteration: it must still be the composed polynomial on the singular values.
@pytest.mark.parametrize("shape", [(700, 40), (40, 700), (2, 520, 48), (4, 48, 520)], ids=str)
@pytest.mark.parametrize("cond", [1.0, 1e3, 1e9])
def test_ns_long_thin_inputs_follow_the_composed_polynomial(shape, cond, rng):
    s_min = min(shape[-2:])
    sv = np.geomspace(2.0, 2.0 / cond, s_min)
    x = np.stack([with_singular_values(*shape[-2:], sv, rng) for _ in range(int(np.prod(shape[:-2])))])
    x = x.reshape(shape)
    assert _use_gram(s_min, max(shape[-2:]), torch.float64, torch.device("cpu"))  # the path under test
    assert not _use_gram(s_min, max(shape[-2:]), torch.float64, torch.device("cuda"))
    z = polar(x, method="newton_schulz")
    want = np.stack([np_ns(xi, PE, 5, margin=1.01) for xi in x.reshape(-1, *shape[-2:])]).reshape(shape)
    np.testing.assert_allclose(z, want, atol=1e-9)
    z32 = polar(torch.from_numpy(x).float(), method="newton_schulz")
    assert z32.dtype == torch.float32
    np.testing.assert_allclose(z32.double().numpy(), want, atol=2e-4)


def test_ns_long_thin_zero_rank_deficient_huge_and_autograd(rng):
    assert np.abs(polar(np.zeros((700, 40)), method="newton_schulz")).max() == 0.0
    a, b = rng.standard_normal((700, 3)), rng.standard_normal((40, 3))
    z = polar(a @ b.T, method="newton_schulz", steps=8)
    sv = np.linalg.svd(z, compute_uv=False)
    np.testing.assert_allclose(sv[:3], 1.0, atol=1e-6)
    assert sv[3:].max() < 1e-8  # no spurious directions
    huge = torch.from_numpy(rng.standard_normal((700, 40))).float() * 1e30
    assert torch.isfinite(polar(huge, method="newton_schulz")).all()
    # with autograd recording, the small iteration runs as matrix products (no eigh backward)
    x = torch.from_numpy(rng.standard_normal((700, 40))).requires_grad_()
    z = polar(x, method="newton_schulz")
    np.testing.assert_allclose(z.detach().numpy(), np_ns(x.detach().numpy(), PE, 5, 1.01), atol=1e-9)
    (z * torch.from_numpy(rng.standard_normal((700, 40)))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_ns_muon_coefficients_match_reference_iteration(rng):
    for shape in [(7, 7), (10, 4), (4, 10)]:
        x = rng.standard_normal(shape)
        z = polar(x, method="newton_schulz", coefficients="muon", steps=5)
        np.testing.assert_allclose(z, np_ns(x, [MUON], 5), atol=1e-12)


def test_ns_custom_sequence_last_triple_repeats(rng):
    x = rng.standard_normal((6, 4))
    seq = [(3.0, -3.2, 1.2), (1.5, -0.5, 0.0)]  # the second (cubic Newton–Schulz) repeats
    z = polar(x, method="newton_schulz", coefficients=seq, steps=6)
    np.testing.assert_allclose(z, np_ns(x, seq, 6), atol=1e-12)
    z1 = polar(x, method="newton_schulz", coefficients=MUON, steps=3)  # one triple
    np.testing.assert_allclose(z1, np_ns(x, [MUON], 3), atol=1e-12)


# Default steps (5), float64. Bounds: the iteration maps each singular value through the composed
# Polar Express polynomial, which (the paper's design) sends the interval [1e-3, 1] of normalized
# singular values into [0.840, 1.124] after 5 steps (checked numerically below on a grid), so
# ||Z^T Z - I||_2 = max |p(sigma)^2 - 1| <= 1 - 0.84^2 < 0.30 when sigma_min / ||X||_F >= 1e-3
# (here: condition numbers <= 100 and n <= 24). The relative Frobenius error to U V^T is then
# <= max |p(sigma) - 1| < 0.17. For ill-conditioned inputs the small singular values are not yet
# converged, but nothing exceeds 1.124 and nothing is NaN.
def test_polar_express_five_step_envelope():
    grid = np.geomspace(1e-3, 1.0, 20001)
    y = scalar_ns(grid, PE, 5, margin=1.01)
    assert y.min() > 0.84 and y.max() < 1.124


@pytest.mark.parametrize("cond", [1.0, 10.0, 100.0])
@pytest.mark.parametrize("shape", [(16, 16), (24, 8), (8, 24)], ids=str)
def test_ns_orthogonality_well_conditioned(cond, shape, rng):
    m, n = shape
    x = with_singular_values(m, n, np.geomspace(1.0, 1.0 / cond, min(m, n)), rng)
    z = polar(x, method="newton_schulz")
    assert orth_error(z) <= 0.30
    assert np.linalg.norm(z - np_polar(x)) / np.linalg.norm(np_polar(x)) <= 0.17
    # converged after 8 steps (the schedule reaches its fixed Newton–Schulz polynomial)
    z8 = polar(x, method="newton_schulz", steps=8)
    assert orth_error(z8) <= 1e-6


def test_ns_ill_conditioned_is_bounded(rng):
    x = with_singular_values(20, 12, np.geomspace(1.0, 1e-8, 12), rng)
    z = polar(x, method="newton_schulz")
    sv = np.linalg.svd(z, compute_uv=False)
    assert np.isfinite(z).all() and sv.max() <= 1.124
    # the well-resolved directions (sigma / ||X||_F >= 1e-3) are within the 5-step envelope
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    big = s / np.linalg.norm(x) >= 1e-3 * 1.01
    got = np.einsum("ik,ij,jk->k", u, z, vt.T)[big]
    assert got.min() >= 0.84 and got.max() <= 1.124


# The Polar Express list is one schedule tuned for its full length: its first polynomials trade
# accuracy for fast growth of small singular values, so truncated below 5 steps it is *less*
# accurate than Muon's quintic (documented in polar()); from 5 steps on it is more accurate.
@pytest.mark.parametrize("steps", [5, 6, 8])
def test_polar_express_beats_muon_quintic_at_equal_steps(steps, rng):
    for shape in [(16, 16), (32, 12)]:
        x = rng.standard_normal(shape)
        ref = np_polar(x)
        e_pe = np.linalg.norm(polar(x, method="newton_schulz", steps=steps) - ref)
        e_mu = np.linalg.norm(np_ns(x, [MUON], steps) - ref)
        assert e_pe < e_mu


def test_polar_express_beats_torch_muon_in_bfloat16(rng):
    muon_ns = pytest.importorskip("torch.optim._muon")._zeropower_via_newtonschulz
    x = torch.from_numpy(rng.standard_normal((64, 32))).float()
    ref = np_polar(x.double().numpy())
    ours = polar(x, method="newton_schulz", dtype=torch.bfloat16)
    theirs = muon_ns(x, MUON, 5, 1e-7)
    assert ours.dtype == torch.float32  # input dtype, not the working dtype
    e_ours = np.linalg.norm(ours.double().numpy() - ref)
    e_theirs = np.linalg.norm(theirs.double().numpy() - ref)
    assert e_ours < e_theirs


def test_ns_rank_deficient_no_nan_and_no_new_directions(rng):
    a, b = rng.standard_normal((9, 2)), rng.standard_normal((6, 2))
    x = a @ b.T
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        z = polar(torch.from_numpy(x).to(dtype), method="newton_schulz")
        assert torch.isfinite(z).all()
    z = polar(x, method="newton_schulz", steps=8)
    sv = np.linalg.svd(z, compute_uv=False)
    np.testing.assert_allclose(sv[:2], 1.0, atol=1e-6)
    assert sv[2:].max() < 1e-8  # odd polynomials keep zero singular values at zero


def test_ns_batched_equals_loop_and_transpose_equivariance(rng):
    x = torch.from_numpy(rng.standard_normal((3, 2, 7, 5)))
    z = polar(x, method="newton_schulz")
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(z[i, j], polar(x[i, j], method="newton_schulz"))
    torch.testing.assert_close(polar(x.mT, method="newton_schulz"), z.mT)


def test_ns_dtype_rules(rng):
    x64 = rng.standard_normal((12, 8))
    x32 = torch.from_numpy(x64).float()
    ref = np_ns(x64, PE, 5, margin=1.01)
    z32 = polar(x32, method="newton_schulz")
    assert z32.dtype == torch.float32
    np.testing.assert_allclose(z32.numpy(), ref, atol=1e-5)  # float32 round-off, 5 steps
    # bfloat16 working dtype: result in the input dtype, accurate to bf16 round-off (~1e-2)
    zb = polar(x32, method="newton_schulz", dtype=torch.bfloat16)
    assert zb.dtype == torch.float32
    np.testing.assert_allclose(zb.numpy(), ref, atol=5e-2)
    # bfloat16 input: computed in float32 by default, returned in bfloat16
    xb = x32.bfloat16()
    for method in ("svd", "newton_schulz"):
        z = polar(xb, method=method)
        assert z.dtype == torch.bfloat16
        torch.testing.assert_close(z.float(), polar(xb.float(), method=method), atol=1e-2, rtol=0)
    zh = polar(x32.half(), method="newton_schulz")
    assert zh.dtype == torch.float16 and torch.isfinite(zh).all()
    # numpy dtypes are accepted for `dtype`
    z = polar(x64, method="newton_schulz", dtype=np.float32)
    assert z.dtype == np.float64
    np.testing.assert_allclose(z, ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_input_is_never_modified(dtype, method, rng):
    x = torch.from_numpy(rng.standard_normal((6, 4))).to(dtype)
    before = x.clone()
    polar(x, method=method, dtype=dtype if method == "newton_schulz" else None)
    assert torch.equal(x, before)
    xn = rng.standard_normal((4, 6))
    xn_before = xn.copy()
    polar(xn, method=method)
    assert np.array_equal(xn, xn_before)


def test_autograd_flows_through_both_methods(rng):
    """Not the optimizers' use (they run under no_grad), but polar must not break autograd:
    gradcheck in float64 (distinct singular values, so the SVD is differentiable)."""
    x = torch.from_numpy(with_singular_values(5, 3, [3.0, 2.0, 1.0], rng)).requires_grad_()
    for method in ("svd", "newton_schulz"):
        assert torch.autograd.gradcheck(lambda t, m=method: polar(t, method=m), (x,))


def test_numpy_zero_copy_and_negative_strides(rng):
    x = rng.standard_normal((5, 4))
    np.testing.assert_allclose(polar(x[::-1]), np_polar(x[::-1]), atol=1e-12)
    np.testing.assert_allclose(polar(x.T), np_polar(x.T), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# msign


def np_msign(s):
    lam, q = np.linalg.eigh(s)
    tol = np.finfo(np.float64).eps * s.shape[-1] * np.abs(lam).max(-1, keepdims=True)
    sgn = np.sign(lam) * (np.abs(lam) > tol)
    return (q * sgn[..., None, :]) @ np.swapaxes(q, -1, -2)


def test_msign_eigh_matches_numpy(rng):
    a = rng.standard_normal((3, 6, 6))
    s = a + np.swapaxes(a, -1, -2)
    np.testing.assert_allclose(msign(s), np_msign(s), atol=1e-12)
    # only the symmetric part is used
    np.testing.assert_allclose(msign(a), np_msign((a + np.swapaxes(a, -1, -2)) / 2), atol=1e-12)


def test_msign_rank_deficient_and_zero(rng):
    v = rng.standard_normal((6, 2))
    s = v @ np.diag([2.0, -1.0]) @ v.T  # eigenvalues +, -, 0, 0, 0, 0
    z = msign(s)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(z)), [-1, 0, 0, 0, 0, 1], atol=1e-12)
    assert np.array_equal(msign(np.zeros((4, 4))), np.zeros((4, 4)))
    assert np.array_equal(msign(np.zeros((4, 4)), method="newton_schulz"), np.zeros((4, 4)))


def test_msign_newton_schulz_matches_eigh(rng):
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    s = (q * np.array([3.0, 2.0, 1.0, 0.5, -0.5, -1.0, -2.0, -3.0])) @ q.T
    z = msign(torch.from_numpy(s), method="newton_schulz", steps=9)
    assert isinstance(z, torch.Tensor)
    np.testing.assert_allclose(z.numpy(), np_msign(s), atol=1e-8)
    np.testing.assert_allclose(z.numpy(), z.numpy().T, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: polar(np.ones(3)), ValueError, "at least 2 dimensions"),
        (lambda: polar(np.ones((3, 3), dtype=np.int64)), TypeError, "floating-point"),
        (lambda: polar(torch.ones(3, 3, dtype=torch.complex64)), TypeError, "floating-point"),
        (lambda: polar([[1.0, 2.0]]), TypeError, "numpy.ndarray"),
        (lambda: polar(np.eye(3), method="qr"), ValueError, "'qr'.*'svd', 'newton_schulz'"),
        (
            lambda: polar(np.eye(3), method="newton_schulz", coefficients="jordan"),
            ValueError,
            "'jordan'.*'muon', 'polar_express'",
        ),
        (
            lambda: polar(np.eye(3), method="newton_schulz", coefficients=[(1.0, 2.0)]),
            ValueError,
            r"\(a, b, c\)",
        ),
        (
            lambda: polar(np.eye(3), method="newton_schulz", coefficients=[]),
            ValueError,
            "non-empty",
        ),
        (
            lambda: polar(np.eye(3), method="newton_schulz", coefficients=[(1, float("nan"), 0)]),
            ValueError,
            "finite",
        ),
        (lambda: polar(np.eye(3), method="newton_schulz", steps=0), ValueError, "steps"),
        (lambda: polar(np.eye(3), method="newton_schulz", steps=2.5), ValueError, "steps"),
        (lambda: polar(np.eye(3), method="newton_schulz", steps=True), ValueError, "steps"),
        (lambda: polar(np.eye(3), dtype=torch.int32), ValueError, "dtype"),
        (lambda: polar(np.eye(3), dtype="banana"), ValueError, "dtype"),
        (lambda: msign(np.ones((3, 4))), ValueError, "square"),
        (lambda: msign(np.eye(3), method="svd"), ValueError, "'svd'.*'eigh', 'newton_schulz'"),
    ],
    ids=[
        "1d",
        "int",
        "complex",
        "list",
        "method",
        "coef-name",
        "coef-shape",
        "coef-empty",
        "coef-nan",
        "steps-0",
        "steps-float",
        "steps-bool",
        "dtype-int",
        "dtype-str",
        "msign-nonsquare",
        "msign-method",
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.randn(3, 64, 32, dtype=torch.float64)
    for method in ("svd", "newton_schulz"):
        z = polar(x.cuda(), method=method)
        assert z.is_cuda and z.dtype == torch.float64
        torch.testing.assert_close(z.cpu(), polar(x, method=method), atol=1e-10, rtol=0)
    zb = polar(x.float().cuda(), method="newton_schulz", dtype=torch.bfloat16)
    assert zb.dtype == torch.float32
    torch.testing.assert_close(zb.cpu().double(), polar(x, method="newton_schulz"), atol=5e-2, rtol=0)
