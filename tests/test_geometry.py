"""Conformance tests of every built-in geometry against independent truths.

Truths used: autograd gradients, finite differences of the cost along the retracted direction, closed forms
computed with numpy/scipy SVD, eigh and sqrtm, and the invariances of the spec (§6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imuon_manopt.direction import intrinsic_direction
from imuon_manopt.geometry import (
    SPD,
    Euclidean,
    FixedRank,
    Grassmann,
    MetricOperator,
    Product,
    Sphere,
    Stiefel,
)

DT = torch.float64
NORMS = [
    ("spectral", None),
    ("frobenius", None),
    ("nuclear", None),
    ("schatten", 3.0),
    ("kyfan", 2),
    ("fmuon", 0.4),
]


def _spec(norm, p):
    """The norm spec of a (name, parameter) row: a name, or the pair."""
    return norm if p is None else (norm, p)


def rand(*shape, gen=None):
    return torch.randn(*shape, dtype=DT, generator=gen)


def orth(*shape, gen=None):
    return torch.linalg.qr(rand(*shape, gen=gen))[0]


def spd(n, batch=(), gen=None, cond=10.0):
    q = orth(*batch, n, n, gen=gen)
    ev = torch.logspace(0, np.log10(cond), n, dtype=DT)
    return q @ torch.diag_embed(ev.expand(*batch, n)) @ q.mT


def qr_retraction(x, v):
    q, r = torch.linalg.qr(x + v)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def polar_retraction(x, v):
    u, _, vh = torch.linalg.svd(x + v, full_matrices=False)
    return u @ vh


def sphere_retraction(x, v):
    y = x + v
    return y / y.norm(dim=-1, keepdim=True)


def spd_exp(x, v):
    # exact affine-invariant exponential map, written independently with scipy
    xs = x.numpy()
    out = []
    for xi, vi in zip(xs.reshape(-1, *xs.shape[-2:]), v.numpy().reshape(-1, *xs.shape[-2:])):
        r = np.real(sla.sqrtm(xi))
        ri = np.linalg.inv(r)
        out.append(r @ sla.expm(ri @ vi @ ri) @ r)
    return torch.from_numpy(np.stack(out).reshape(xs.shape))


def add(x, v):
    if isinstance(x, torch.Tensor):
        return x + v
    return type(x)(add(a, b) for a, b in zip(x, v))


@dataclass
class Case:
    name: str
    geometry: MetricOperator
    point: object
    cost: Callable
    retraction: Callable

    def egrad(self, x=None):
        x = self.point if x is None else x
        leaves = [t.clone().requires_grad_(True) for t in flatten(x)]
        f = self.cost(unflatten(x, leaves))
        grads = torch.autograd.grad(f, leaves)
        return unflatten(x, list(grads))


def flatten(x):
    if isinstance(x, torch.Tensor):
        return [x]
    return [leaf for t in x for leaf in flatten(t)]


def unflatten(like, leaves):
    leaves = list(leaves)

    def build(t):
        if isinstance(t, torch.Tensor):
            return leaves.pop(0)
        items = [build(s) for s in t]
        return items if isinstance(t, list) else tuple(items)

    return build(like)


def inner(a, b):
    return sum((u * v).sum() for u, v in zip(flatten(a), flatten(b)))


def make_cases():
    g = torch.Generator().manual_seed(1)
    c7 = rand(7, 7, gen=g)
    c7 = c7 + c7.T
    d73 = rand(7, 3, gen=g)
    t64 = rand(6, 4, gen=g)
    a6 = rand(6, 6, gen=g)
    a6 = a6 + a6.T
    m, n, r = 9, 8, 3
    target = rand(m, r, gen=g) @ rand(r, n, gen=g)
    mask = (torch.rand(m, n, generator=g) < 0.6).to(DT)
    c5 = rand(5, 5, gen=g)
    cases = [
        Case(
            "euclidean", Euclidean(), rand(6, 4, gen=g), lambda x: 0.5 * ((x - t64) ** 2).sum() + (x**4).sum() / 4, add
        ),
        Case("euclidean-vector", Euclidean(), rand(5, gen=g), lambda x: ((x - 1.0) ** 2).sum(), add),
        Case(
            "sphere",
            Sphere(),
            torch.nn.functional.normalize(rand(3, 6, gen=g), dim=-1),
            lambda x: torch.einsum("bi,ij,bj->", x, a6, x) + x[:, 0].sum(),
            sphere_retraction,
        ),
        Case(
            "stiefel-embedded",
            Stiefel(),
            orth(7, 3, gen=g),
            lambda x: torch.trace(x.T @ c7 @ x) + (d73 * x).sum(),
            qr_retraction,
        ),
        Case(
            "stiefel-canonical",
            Stiefel("canonical"),
            orth(7, 3, gen=g),
            lambda x: torch.trace(x.T @ c7 @ x) + (d73 * x).sum(),
            qr_retraction,
        ),
        Case(
            "stiefel-batched",
            Stiefel(),
            orth(4, 7, 3, gen=g),
            lambda x: torch.einsum("bij,ik,bkj->", x, c7, x) + (d73 * x).sum(),
            qr_retraction,
        ),
        Case("grassmann", Grassmann(), orth(7, 3, gen=g), lambda x: -torch.trace(x.T @ c7 @ x), polar_retraction),
        Case(
            "grassmann-general",
            Grassmann("general"),
            rand(7, 3, gen=g),
            lambda y: -torch.trace(torch.linalg.solve(y.T @ y, y.T @ c7 @ y)),
            add,
        ),
        Case("spd", SPD(), spd(5, gen=g), lambda x: torch.trace(c5 @ x) + (x**2).sum() - torch.logdet(x), spd_exp),
        Case(
            "spd-batched",
            SPD(),
            spd(5, batch=(2,), gen=g),
            lambda x: torch.einsum("ij,bji->", c5, x) - torch.logdet(x).sum(),
            spd_exp,
        ),
        Case(
            "fixed-rank",
            FixedRank(),
            (rand(m, r, gen=g), rand(r, n, gen=g)),
            lambda x: 0.5 * ((mask * (x[0] @ x[1] - target)) ** 2).sum(),
            add,
        ),
        Case(
            "fixed-rank-gram",
            FixedRank("gram"),
            (rand(m, r, gen=g), rand(r, n, gen=g)),
            lambda x: 0.5 * ((mask * (x[0] @ x[1] - target)) ** 2).sum(),
            add,
        ),
        Case(
            "product",
            Product([Stiefel(), SPD(), Euclidean()]),
            [orth(7, 3, gen=g), spd(5, gen=g), rand(6, 4, gen=g)],
            lambda x: (
                torch.trace(x[0].T @ c7 @ x[0])
                + torch.trace(c5 @ x[1])
                - torch.logdet(x[1])
                + ((x[2] - t64) ** 2).sum()
            ),
            lambda x, v: [qr_retraction(x[0], v[0]), spd_exp(x[1], v[1]), x[2] + v[2]],
        ),
    ]
    return cases


CASES = make_cases()


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request):
    return request.param


@pytest.mark.parametrize("norm,p", NORMS, ids=[n if p is None else f"{n}{p:g}" for n, p in NORMS])
def test_first_order_descent(case, norm, p):
    """(f(R_x(-t xi)) - f(x)) / t -> -<E, xi> = -gap, and the gap is positive."""
    e = case.egrad()
    xi, gap = intrinsic_direction(case.geometry, case.point, e, _spec(norm, p))
    assert float(gap) > 0
    np.testing.assert_allclose(float(inner(e, xi)), float(gap), rtol=1e-10)
    f0 = float(case.cost(case.point))
    slopes = []
    for t in (1e-4, 1e-5):
        step = [-t * s for s in flatten(xi)]
        x1 = case.retraction(case.point, unflatten(xi, step))
        slopes.append((float(case.cost(x1)) - f0) / t)
    # the finite-difference error is O(t): shrinking t by 10 shrinks it by ~10
    assert abs(slopes[1] + float(gap)) < 1e-3 * max(1.0, float(gap))
    assert abs(slopes[1] + float(gap)) <= abs(slopes[0] + float(gap)) + 1e-9


CONSTRAINED = [c for c in CASES if not c.name.startswith(("euclidean", "fixed-rank"))]


@pytest.mark.parametrize("norm", ["spectral", "nuclear", ("kyfan", 2), ("fmuon", 0.4)], ids=str)
@pytest.mark.parametrize("case", CONSTRAINED, ids=[c.name for c in CONSTRAINED])
def test_tangency(case, norm):
    e = case.egrad()
    xi, _ = intrinsic_direction(case.geometry, case.point, e, norm)
    x = case.point
    name = case.name
    if name == "product":
        x, xi, name = x[0], xi[0], "stiefel"
    if name.startswith("stiefel"):
        np.testing.assert_allclose((x.mT @ xi + xi.mT @ x).abs().max(), 0, atol=1e-12)
    elif name == "grassmann":
        np.testing.assert_allclose((x.mT @ xi).abs().max(), 0, atol=1e-12)
    elif name == "grassmann-general":
        np.testing.assert_allclose((x.mT @ xi).abs().max(), 0, atol=1e-11)
    elif name.startswith("spd"):
        np.testing.assert_allclose((xi - xi.mT).abs().max(), 0, atol=1e-12)
    elif name == "sphere":
        np.testing.assert_allclose((x * xi).sum(-1).abs().max(), 0, atol=1e-12)
    else:
        raise AssertionError(f"no tangency check for {name}")


def np_polar(a):
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    keep = s > s.max() * 1e-12 * max(a.shape) if s.size and s.max() > 0 else np.zeros_like(s, bool)
    return (u[:, keep]) @ vt[keep]


def np_sign(h):
    w, q = np.linalg.eigh(h)
    return (q * np.sign(w)) @ q.T


def psd_sqrt(s):
    w, q = np.linalg.eigh(s)
    return (q * np.sqrt(w)) @ q.T


def test_closed_forms_spectral():
    """Spectral directions equal the spec's closed forms (§2), computed independently with numpy."""
    rng = np.random.default_rng(3)
    # Euclidean: Muon
    e = rng.standard_normal((6, 4))
    xi = intrinsic_direction(Euclidean(), np.zeros((6, 4)), e).xi
    np.testing.assert_allclose(xi, np_polar(e), atol=1e-12)
    # Stiefel, embedded and canonical
    x = np.linalg.qr(rng.standard_normal((8, 3)))[0]
    e = rng.standard_normal((8, 3))
    omega = 0.5 * (x.T @ e - e.T @ x)
    k = e - x @ (x.T @ e)
    np.testing.assert_allclose(intrinsic_direction(Stiefel(), x, e).xi, x @ np_polar(omega) + np_polar(k), atol=1e-12)
    np.testing.assert_allclose(
        intrinsic_direction(Stiefel("canonical"), x, e).xi, np.sqrt(2) * x @ np_polar(omega) + np_polar(k), atol=1e-12
    )
    # Grassmann, general representative: polar(Pi(E) S^{1/2}) S^{1/2}
    y = rng.standard_normal((8, 3))
    s = y.T @ y
    pi = e - y @ np.linalg.solve(s, y.T @ e)
    np.testing.assert_allclose(
        intrinsic_direction(Grassmann("general"), y, e).xi, np_polar(pi @ psd_sqrt(s)) @ psd_sqrt(s), atol=1e-10
    )
    # SPD: X^{1/2} sign(X^{1/2} sym(E) X^{1/2}) X^{1/2}
    a = rng.standard_normal((5, 5))
    xs = a @ a.T + 0.5 * np.eye(5)
    e = rng.standard_normal((5, 5))
    r = psd_sqrt(xs)
    expected = r @ np_sign(r @ (0.5 * (e + e.T)) @ r) @ r
    np.testing.assert_allclose(intrinsic_direction(SPD(), xs, e).xi, expected, atol=1e-10)


def test_fixed_rank_closed_forms():
    """Factor form (Grams) and the ambient form polar(Gamma V) V^T + U polar(U^T Gamma) agree with the core."""
    rng = np.random.default_rng(4)
    m, n, r = 10, 7, 3
    b, a = rng.standard_normal((m, r)), rng.standard_normal((r, n))
    gamma = rng.standard_normal((m, n))
    e_b, e_a = gamma @ a.T, b.T @ gamma
    xi_b, xi_a = intrinsic_direction(FixedRank(), (b, a), (e_b, e_a)).xi
    s_a, s_b = a @ a.T, b.T @ b
    ra, rb = np.linalg.inv(psd_sqrt(s_a)), np.linalg.inv(psd_sqrt(s_b))
    np.testing.assert_allclose(xi_b, np_polar(e_b @ ra) @ ra, atol=1e-10)
    np.testing.assert_allclose(xi_a, rb @ np_polar(rb @ e_a), atol=1e-10)
    u, _, vt = np.linalg.svd(b @ a, full_matrices=False)
    u, v = u[:, :r], vt[:r].T
    ambient = np_polar(gamma @ v) @ v.T + u @ np_polar(u.T @ gamma)
    np.testing.assert_allclose(xi_b @ a + b @ xi_a, ambient, atol=1e-10)


def _rand_gl(rng, r, cond):
    u = np.linalg.qr(rng.standard_normal((r, r)))[0]
    v = np.linalg.qr(rng.standard_normal((r, r)))[0]
    return u @ np.diag(np.geomspace(1.0, cond, r)) @ v.T


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    cond=st.floats(1.0, 1e3),
    norm=st.sampled_from(["spectral", "frobenius", "nuclear", ("kyfan", 2), ("fmuon", 0.4)]),
    factorization=st.sampled_from(["qr", "gram"]),
)
def test_fixed_rank_gauge_invariance(seed, cond, norm, factorization):
    """At (B M, M^-1 A) the directions are (xi_B M, M^-1 xi_A): the step's product is unchanged."""
    rng = np.random.default_rng(seed)
    m, n, r = 9, 7, 3
    b, a = rng.standard_normal((m, r)), rng.standard_normal((r, n))
    gamma = rng.standard_normal((m, n))
    mm = _rand_gl(rng, r, cond)
    mi = np.linalg.inv(mm)
    geo = FixedRank(factorization)
    xi_b, xi_a = intrinsic_direction(geo, (b, a), (gamma @ a.T, b.T @ gamma), norm).xi
    b2, a2 = b @ mm, mi @ a
    yi_b, yi_a = intrinsic_direction(geo, (b2, a2), (gamma @ a2.T, b2.T @ gamma), norm).xi
    scale = max(1.0, np.abs(xi_b @ a).max())
    np.testing.assert_allclose(yi_b @ a2 + b2 @ yi_a, xi_b @ a + b @ xi_a, atol=1e-9 * scale * cond)
    eta = 0.3
    np.testing.assert_allclose(
        (b2 - eta * yi_b) @ (a2 - eta * yi_a), (b - eta * xi_b) @ (a - eta * xi_a), atol=1e-9 * scale * cond
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    norm=st.sampled_from(["spectral", "frobenius", "nuclear", ("kyfan", 2), ("fmuon", 0.4)]),
)
def test_grassmann_gl_equivariance(seed, norm):
    """xi(Y M, E M^{-T}) = xi(Y, E) M for the general representative."""
    rng = np.random.default_rng(seed)
    y, e = rng.standard_normal((8, 3)), rng.standard_normal((8, 3))
    mm = _rand_gl(rng, 3, 30.0)
    geo = Grassmann("general")
    xi = intrinsic_direction(geo, y, e, norm).xi
    xi2 = intrinsic_direction(geo, y @ mm, e @ np.linalg.inv(mm).T, norm).xi
    np.testing.assert_allclose(xi2, xi @ mm, atol=1e-9 * max(1, np.abs(xi @ mm).max()))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    norm=st.sampled_from(["spectral", "frobenius", "nuclear", ("kyfan", 2), ("fmuon", 0.4)]),
)
def test_spd_congruence_invariance(seed, norm):
    """xi(P X P^T, P^{-T} E P^{-1}) = P xi(X, E) P^T."""
    rng = np.random.default_rng(seed)
    n = 5
    a = rng.standard_normal((n, n))
    x = a @ a.T + np.eye(n)
    e = rng.standard_normal((n, n))
    pm = _rand_gl(rng, n, 10.0)
    pi = np.linalg.inv(pm)
    xi = intrinsic_direction(SPD(), x, e, norm).xi
    xi2 = intrinsic_direction(SPD(), pm @ x @ pm.T, pi.T @ e @ pi, norm).xi
    expected = pm @ xi @ pm.T
    np.testing.assert_allclose(xi2, expected, atol=1e-9 * max(1, np.abs(expected).max()))


def test_batch_is_a_product():
    """Spectral: a batch equals a loop. Frobenius: the batch shares one budget (joint norm)."""
    rng = np.random.default_rng(5)
    x = np.linalg.qr(rng.standard_normal((4, 7, 3)))[0]
    e = rng.standard_normal((4, 7, 3))
    batched = intrinsic_direction(Stiefel(), x, e).xi
    for i in range(4):
        np.testing.assert_allclose(batched[i], intrinsic_direction(Stiefel(), x[i], e[i]).xi, atol=1e-12)
    batched_f, gap = intrinsic_direction(Stiefel(), x, e, "frobenius")
    looped = np.stack([intrinsic_direction(Stiefel(), x[i], e[i], "frobenius").xi for i in range(4)])
    # each loop direction has unit intrinsic Frobenius norm; the batch one has unit norm overall
    np.testing.assert_allclose(np.linalg.norm(batched_f), 1.0, atol=1e-12)
    cos = (batched_f * looped).sum((1, 2)) / np.linalg.norm(looped, axis=(1, 2))
    np.testing.assert_allclose(cos, np.linalg.norm(batched_f, axis=(1, 2)), atol=1e-12)
    proj = np.stack([e[i] - x[i] @ (0.5 * (x[i].T @ e[i] + e[i].T @ x[i])) for i in range(4)])
    np.testing.assert_allclose(gap, np.linalg.norm(proj), rtol=1e-12)


def test_spectral_norm_feasibility_stiefel():
    """The direction has intrinsic spectral norm max(||Omega||_2, ||K||_2) = tau."""
    rng = np.random.default_rng(6)
    x = np.linalg.qr(rng.standard_normal((9, 4)))[0]
    e = rng.standard_normal((9, 4))
    xi = intrinsic_direction(Stiefel(), x, e, tau=0.7).xi
    omega = x.T @ xi
    k = xi - x @ omega
    assert max(np.linalg.norm(omega, 2), np.linalg.norm(k, 2)) == pytest.approx(0.7, rel=1e-12)


def test_zero_gradient_gives_zero_direction(case):
    zero = unflatten(case.point, [torch.zeros_like(t) for t in flatten(case.point)])
    for norm, p in NORMS:
        xi, gap = intrinsic_direction(case.geometry, case.point, zero, _spec(norm, p))
        assert float(gap) == 0.0
        for t in flatten(xi):
            assert torch.equal(t, torch.zeros_like(t))


def test_numpy_in_numpy_out_and_float32():
    rng = np.random.default_rng(7)
    x = np.linalg.qr(rng.standard_normal((8, 3)))[0]
    e = rng.standard_normal((8, 3))
    d64 = intrinsic_direction(Stiefel(), x, e)
    assert isinstance(d64.xi, np.ndarray) and isinstance(d64.gap, float)
    d32 = intrinsic_direction(Stiefel(), x.astype(np.float32), e.astype(np.float32))
    assert d32.xi.dtype == np.float32
    np.testing.assert_allclose(d32.xi, d64.xi, atol=1e-4)
    dt = intrinsic_direction(Stiefel(), torch.from_numpy(x), torch.from_numpy(e))
    assert isinstance(dt.xi, torch.Tensor)
    np.testing.assert_allclose(dt.xi.numpy(), d64.xi, atol=1e-14)


def test_bfloat16_point_is_computed_in_float32():
    x = orth(16, 4).to(torch.bfloat16)
    e = rand(16, 4).to(torch.bfloat16)
    xi = intrinsic_direction(Stiefel(), x, e).xi
    assert xi.dtype == torch.bfloat16
    ref = intrinsic_direction(Stiefel(), x.double(), e.double()).xi
    assert (xi.double() - ref).abs().max() < 2e-2


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank-deficient.*full_rank_lora_init_"):
        intrinsic_direction(FixedRank(), (np.zeros((6, 2)), np.ones((2, 5))), (np.ones((6, 2)), np.ones((2, 5))))
    with pytest.raises(ValueError, match="rank-deficient"):
        intrinsic_direction(FixedRank("gram"), (np.zeros((6, 2)), np.ones((2, 5))), (np.ones((6, 2)), np.ones((2, 5))))
    with pytest.raises(ValueError, match="do not chain"):
        intrinsic_direction(FixedRank(), (np.ones((6, 2)), np.ones((3, 5))), (np.ones((6, 2)), np.ones((3, 5))))
    with pytest.raises(ValueError, match="not positive definite"):
        intrinsic_direction(SPD(), -np.eye(3), np.eye(3))
    with pytest.raises(TypeError, match="MetricOperator"):
        intrinsic_direction("stiefel", np.eye(3), np.eye(3))
    with pytest.raises(ValueError, match="unknown Stiefel metric"):
        Stiefel("riemannian")
    with pytest.raises(ValueError, match="needs a list of 2"):
        intrinsic_direction(Product([Euclidean(), Euclidean()]), [np.ones((2, 2))], [np.ones((2, 2))])
    with pytest.raises(ValueError):
        intrinsic_direction(Euclidean(), np.ones((3, 3)), np.ones((3, 3)), "spectrall")


@pytest.mark.parametrize("polar", ["svd", "newton_schulz"])
@pytest.mark.parametrize("norm,p", NORMS, ids=[n if p is None else f"{n}{p:g}" for n, p in NORMS])
def test_without_gap_the_direction_is_unchanged(case, norm, p, polar):
    """``gap=False`` (what the optimizers use) returns the same ``xi`` and no gap, also for the joint
    norms whose block budgets depend on the blocks' duals."""
    e = case.egrad()
    full = intrinsic_direction(case.geometry, case.point, e, _spec(norm, p), polar=polar)
    bare = intrinsic_direction(case.geometry, case.point, e, _spec(norm, p), polar=polar, gap=False)
    assert bare.gap is None
    for a, b in zip(flatten(full.xi), flatten(bare.xi)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
