"""Tests of imuon_manopt.lmo: LMO optimality and feasibility, dual norms, norm resolution.

Truths are computed here, independently, with numpy's float64 SVD / eigh:
``<H, Z> = tau * phi_dual(H)`` and ``phi(Z) <= tau``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imuon_manopt.lmo import Norm, dual_norm, lmo, resolve_norm

INF = math.inf


def sv(x):
    return np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)


def schatten(s, p):
    """||s||_p of singular values (last axis), scaled so that huge/tiny values do not overflow."""
    s = np.asarray(s, dtype=np.float64)
    if p == INF:
        return s.max(-1)
    m = s.max(-1, keepdims=True)
    safe = np.where(m > 0, m, 1.0)
    return m[..., 0] * ((s / safe) ** p).sum(-1) ** (1.0 / p)


def dual_exp(p):
    return INF if p == 1 else 1.0 if p == INF else p / (p - 1.0)


# (norm, p) -> the primal Schatten exponent
NORMS = [
    ("spectral", None, INF),
    ("frobenius", None, 2.0),
    ("nuclear", None, 1.0),
    ("schatten", 1.5, 1.5),
    ("schatten", 3.0, 3.0),
    ("schatten", 1.0, 1.0),
    ("schatten", 2.0, 2.0),
    ("schatten", INF, INF),
]
NORM_IDS = ["spectral", "frobenius", "nuclear", "S1.5", "S3", "S1", "S2", "Sinf"]


def _spec(norm, p):
    """The norm spec of a (name, exponent) row: a name, or a ("schatten", p) pair."""
    return norm if p is None else (norm, p)


def make(kind, rng):
    if kind == "square":
        return rng.standard_normal((5, 5))
    if kind == "tall":
        return rng.standard_normal((7, 3))
    if kind == "wide":
        return rng.standard_normal((3, 7))
    if kind == "rank2":
        return rng.standard_normal((6, 2)) @ rng.standard_normal((2, 5))
    if kind == "zero":
        return np.zeros((4, 3))
    if kind == "tiny":
        return 1e-30 * rng.standard_normal((4, 6))
    if kind == "huge":
        return 1e30 * rng.standard_normal((6, 4))
    raise AssertionError(kind)


KINDS = ["square", "tall", "wide", "rank2", "zero", "tiny", "huge"]


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def check_lmo(h, z, dual, p, tau, rtol):
    """Optimality <H, Z> = tau * dual(H), feasibility phi(Z) <= tau (1 + rtol), the dual itself."""
    h = np.asarray(h, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    s = sv(h)
    true_dual = schatten(s, dual_exp(p))
    np.testing.assert_allclose(dual, true_dual, rtol=rtol, atol=0)
    inner = (h * z).sum((-2, -1))
    np.testing.assert_allclose(inner, tau * true_dual, rtol=rtol, atol=0)
    assert np.all(schatten(sv(z), p) <= tau * (1 + rtol))
    assert np.isfinite(z).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm, p, pp", NORMS, ids=NORM_IDS)
def test_lmo_optimal_and_feasible_float64(norm, p, pp, kind, rng):
    h = make(kind, rng)
    for tau in (1.0, 2.5):
        z, dual = lmo(h, _spec(norm, p), tau=tau, return_dual=True)
        assert isinstance(z, np.ndarray) and z.shape == h.shape and z.dtype == np.float64
        check_lmo(h, z, dual, pp, tau, rtol=1e-10)
        np.testing.assert_allclose(dual_norm(h, _spec(norm, p)), dual, rtol=1e-12)
    if kind == "zero":
        assert np.array_equal(z, np.zeros_like(h)) and dual == 0.0


@pytest.mark.parametrize("kind", ["square", "tall", "tiny", "huge"])
@pytest.mark.parametrize("norm, p, pp", NORMS[:5], ids=NORM_IDS[:5])
def test_lmo_float32_close_to_float64(norm, p, pp, kind, rng):
    """float32: same contract with float32 round-off (rtol 1e-5); huge/tiny entries neither
    overflow nor underflow (1e30^2 and 1e-30^2 are outside float32's range)."""
    h = make(kind, rng)
    z32, d32 = lmo(h.astype(np.float32), _spec(norm, p), return_dual=True)
    assert z32.dtype == np.float32 and d32.dtype == np.float32
    check_lmo(h.astype(np.float32), z32, d32, pp, 1.0, rtol=2e-5)


def test_lmo_rank_deficient_spectral_has_rank_of_h(rng):
    h = make("rank2", rng)
    z = lmo(h)
    s = sv(z)
    np.testing.assert_allclose(s[:2], 1.0, atol=1e-12)
    assert s[2:].max() < 1e-12


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_zero_input_every_norm(method, symmetric):
    h = np.zeros((2, 4, 4))
    for norm, p, _ in NORMS:
        z, dual = lmo(h, _spec(norm, p), symmetric=symmetric, method=method, return_dual=True)
        assert np.array_equal(z, h) and np.array_equal(dual, np.zeros(2))
        assert np.array_equal(dual_norm(h, _spec(norm, p), symmetric=symmetric), np.zeros(2))


def test_nuclear_ties_give_a_feasible_maximizer():
    for h in (np.eye(3), np.diag([2.0, 2.0, 1.0]), -np.eye(4)):
        for symmetric in (False, True):
            z, dual = lmo(h, "nuclear", symmetric=symmetric, return_dual=True)
            assert sv(z).sum() <= 1 + 1e-12
            np.testing.assert_allclose((h * z).sum(), sv(h).max(), rtol=1e-12)
            np.testing.assert_allclose(dual, sv(h).max(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# symmetric variants


def sym_case(rng, n=6):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.array([3.0, -5.0, 1.0, -0.5, 0.25, 0.0])[:n]
    return (q * lam) @ q.T


@pytest.mark.parametrize("norm, p, pp", NORMS, ids=NORM_IDS)
def test_symmetric_lmo_optimal_feasible_and_symmetric(norm, p, pp, rng):
    s = sym_case(rng)
    z, dual = lmo(s, _spec(norm, p), symmetric=True, tau=2.0, return_dual=True)
    np.testing.assert_allclose(z, z.T, atol=1e-13)
    check_lmo(s, z, dual, pp, 2.0, rtol=1e-10)
    # only sym(H) matters: an added skew part changes nothing
    a = rng.standard_normal((6, 6))
    z2 = lmo(s + (a - a.T), _spec(norm, p), symmetric=True, tau=2.0)
    np.testing.assert_allclose(z2, z, atol=1e-10)


def test_symmetric_spectral_and_nuclear_against_eigh(rng):
    s = sym_case(rng)
    lam, q = np.linalg.eigh(s)
    keep = np.abs(lam) > 1e-12
    np.testing.assert_allclose(lmo(s, symmetric=True), (q * (np.sign(lam) * keep)) @ q.T, atol=1e-12)
    np.testing.assert_allclose(lmo(s, symmetric=True, method="eigh"), (q * (np.sign(lam) * keep)) @ q.T, atol=1e-12)
    k = np.argmax(np.abs(lam))  # -5: the top |eigenvalue| pair keeps its sign
    np.testing.assert_allclose(
        lmo(s, "nuclear", symmetric=True), np.sign(lam[k]) * np.outer(q[:, k], q[:, k]), atol=1e-12
    )
    # Schatten-3 over symmetric matrices: sign(lambda) |lambda|^(q-1) / ||lambda||_q^(q-1)
    qd = 1.5
    w = np.sign(lam) * np.abs(lam) ** (qd - 1) / (np.abs(lam) ** qd).sum() ** ((qd - 1) / qd)
    np.testing.assert_allclose(lmo(s, ("schatten", 3.0), symmetric=True), (q * w) @ q.T, atol=1e-12)


def test_symmetric_newton_schulz(rng):
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    s = (q * np.array([3.0, -2.0, 1.0, -1.0, 0.5, 2.0])) @ q.T
    z, dual = lmo(s, symmetric=True, method="newton_schulz", steps=9, return_dual=True)
    lam, qq = np.linalg.eigh(s)
    np.testing.assert_allclose(z, (qq * np.sign(lam)) @ qq.T, atol=1e-8)
    np.testing.assert_allclose(dual, np.abs(lam).sum(), rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# Newton–Schulz spectral LMO


def test_newton_schulz_spectral_lmo(rng):
    h = rng.standard_normal((3, 12, 8))
    z, dual = lmo(h, method="newton_schulz", tau=2.0, return_dual=True)
    # the returned dual is the achieved gap <H, Z> / tau
    np.testing.assert_allclose(dual, (h * z).sum((-2, -1)) / 2.0, rtol=1e-12)
    # default 5 Polar Express steps: singular values within [0.84, 1.124] (see test_polar.py)
    s = sv(z) / 2.0
    assert s.max() <= 1.124 and s.min() >= 0.84
    np.testing.assert_allclose(dual, sv(h).sum(-1), rtol=0.17)
    z8, d8 = lmo(h, method="newton_schulz", steps=8, return_dual=True)
    np.testing.assert_allclose(d8, sv(h).sum(-1), rtol=1e-6)
    # non-spectral norms ignore the Newton–Schulz request and stay exact
    np.testing.assert_allclose(lmo(h, "nuclear", method="newton_schulz"), lmo(h, "nuclear"))


# ---------------------------------------------------------------------------------------------
# batching, array types, dtypes


def test_batched_equals_loop_with_tensor_tau(rng):
    h = rng.standard_normal((2, 3, 5, 4))
    tau = np.array([[1.0], [3.0]])  # broadcasts to the batch shape (2, 3)
    for norm, p, _ in NORMS:
        z, dual = lmo(h, _spec(norm, p), tau=tau, return_dual=True)
        assert z.shape == h.shape and dual.shape == (2, 3)
        for i in range(2):
            for j in range(3):
                zi, di = lmo(h[i, j], _spec(norm, p), tau=float(tau[i, 0]), return_dual=True)
                np.testing.assert_allclose(z[i, j], zi, atol=1e-12)
                np.testing.assert_allclose(dual[i, j], di, rtol=1e-12)


def test_numpy_equals_torch(rng):
    h = rng.standard_normal((2, 5, 3))
    for norm, p, _ in NORMS:
        zn, dn = lmo(h, _spec(norm, p), return_dual=True)
        zt, dt = lmo(torch.from_numpy(h), _spec(norm, p), tau=torch.tensor([1.0, 1.0]), return_dual=True)
        assert isinstance(zt, torch.Tensor) and isinstance(dt, torch.Tensor)
        np.testing.assert_allclose(zt.numpy(), zn, atol=1e-13)
        np.testing.assert_allclose(dt.numpy(), dn, rtol=1e-13)
        dd = dual_norm(torch.from_numpy(h), _spec(norm, p))
        assert isinstance(dd, torch.Tensor)
        np.testing.assert_allclose(dd.numpy(), dn, rtol=1e-12)


def test_float32_close_to_float64_with_spectral_gap(rng):
    """With well-separated singular values every LMO is a smooth function of H, so float32 and
    float64 agree to about float32 round-off times a modest condition factor (1e-4)."""
    u, _ = np.linalg.qr(rng.standard_normal((6, 4)))
    v, _ = np.linalg.qr(rng.standard_normal((5, 4)))
    h = (u * np.array([5.0, 3.0, 2.0, 1.0])) @ v.T
    for norm, p, _ in NORMS:
        z64 = lmo(h, _spec(norm, p))
        z32 = lmo(h.astype(np.float32), _spec(norm, p))
        np.testing.assert_allclose(z32, z64, atol=1e-4)


def test_bfloat16_in_bfloat16_out(rng):
    h = torch.from_numpy(rng.standard_normal((2, 6, 4))).bfloat16()
    for norm, p, _ in NORMS:
        z, dual = lmo(h, _spec(norm, p), return_dual=True)
        assert z.dtype == torch.bfloat16 and dual.dtype == torch.bfloat16
        ref, dref = lmo(h.float(), _spec(norm, p), return_dual=True)  # computed in float32
        torch.testing.assert_close(z.float(), ref, atol=1e-2, rtol=0)
        torch.testing.assert_close(dual.float(), dref, rtol=1e-2, atol=0)
    zn = lmo(h, method="newton_schulz", dtype=torch.bfloat16)
    assert zn.dtype == torch.bfloat16 and torch.isfinite(zn.float()).all()
    assert dual_norm(h).dtype == torch.bfloat16


def test_input_not_modified(rng):
    h = torch.from_numpy(rng.standard_normal((5, 5))).float()
    before = h.clone()
    for norm, p, _ in NORMS:
        for symmetric in (False, True):
            lmo(h, _spec(norm, p), symmetric=symmetric, return_dual=True)
    lmo(h, method="newton_schulz", dtype=torch.float32)
    assert torch.equal(h, before)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 6),
    n=st.integers(1, 6),
    batch=st.lists(st.integers(1, 2), max_size=1),
    which=st.integers(0, len(NORMS) - 1),
    scale_exp=st.sampled_from([-20, 0, 20]),
    rank=st.integers(0, 6),
    tau=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_lmo_property(m, n, batch, which, scale_exp, rank, tau, seed):
    rng = np.random.default_rng(seed)
    r = min(rank, m, n)
    h = rng.standard_normal((*batch, m, r)) @ rng.standard_normal((*batch, r, n))
    h = h * 10.0**scale_exp
    norm, p, pp = NORMS[which]
    z, dual = lmo(h, _spec(norm, p), tau=tau, return_dual=True)
    check_lmo(h, z, dual, pp, tau, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# resolve_norm


def test_resolve_norm_names_and_fields():
    assert resolve_norm("Spectral") == Norm("spectral", INF, 1.0, False)
    assert resolve_norm(" FROBENIUS ") == Norm("frobenius", 2.0, 2.0, True)
    assert resolve_norm("nuclear") == Norm("nuclear", 1.0, INF, False)
    n3 = resolve_norm(("schatten", 3))
    assert (n3.name, n3.p, n3.joint) == ("schatten", 3.0, True)
    assert resolve_norm(["schatten", 3.0]) == n3
    assert resolve_norm(("Schatten", 1)).name == "nuclear"
    assert resolve_norm(("schatten", 2)).name == "frobenius"
    assert resolve_norm(("schatten", math.inf)).name == "spectral"
    assert resolve_norm(("schatten", np.inf)).name == "spectral"
    assert n3.spec == ("schatten", 3.0) and resolve_norm("nuclear").spec == "nuclear"
    assert resolve_norm(n3) is n3
    with pytest.raises(dataclasses.FrozenInstanceError):
        n3.p = 4.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ("operator", ValueError, "'operator'.*'spectral', 'frobenius', 'nuclear', \\('schatten', p\\)"),
        ("schatten", ValueError, "needs its parameter.*\\('schatten', p\\)"),
        (("schatten", 0.5), ValueError, "1 <= p"),
        (("schatten", float("nan")), ValueError, "1 <= p"),
        (("schatten", "3"), ValueError, "real number"),
        (("spectral", 2), ValueError, "takes no parameter"),
        (("kyfan",), ValueError, "name or a \\(name, parameter\\) pair"),
        ("kyfan", ValueError, "needs its parameter.*\\('kyfan', k\\)"),
        (("kyfan", 0), ValueError, "int >= 1"),
        (("kyfan", 2.5), ValueError, "int >= 1"),
        (("kyfan", True), ValueError, "int >= 1"),
        (("fmuon", 1.5), ValueError, "alpha must be a number in \\[0, 1\\]"),
        (("fmuon", float("nan")), ValueError, "alpha"),
        (3, TypeError, "name"),
    ],
    ids=[
        "name", "no-p", "p<1", "p-nan", "p-str", "superfluous", "short-pair", "no-k", "k0", "k-float", "k-bool",
        "alpha>1", "alpha-nan", "type",
    ],
)  # fmt: skip
def test_resolve_norm_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        resolve_norm(args)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"h": np.ones(3)}, ValueError, "at least 2 dimensions"),
        ({"h": np.ones((3, 3), dtype=np.int32)}, TypeError, "floating-point"),
        ({"h": "abc"}, TypeError, "numpy.ndarray"),
        ({"h": np.eye(3), "method": "qr"}, ValueError, "'qr'.*'svd', 'eigh', 'newton_schulz'"),
        ({"h": np.eye(3), "method": "eigh"}, ValueError, "symmetric=True"),
        ({"h": np.ones((3, 4)), "symmetric": True}, ValueError, "square"),
        ({"h": np.eye(3), "tau": -1.0}, ValueError, "tau"),
        ({"h": np.eye(3), "tau": float("nan")}, ValueError, "tau"),
        ({"h": np.ones((2, 3, 3)), "tau": np.ones(3)}, ValueError, "broadcast"),
        ({"h": np.ones((2, 3, 3)), "tau": torch.tensor([1.0, -1.0])}, ValueError, ">= 0"),
        ({"h": np.eye(3), "norm": "max"}, ValueError, "valid choices"),
        ({"h": np.eye(3), "method": "newton_schulz", "steps": -1}, ValueError, "steps"),
    ],
    ids=[
        "1d",
        "int",
        "str",
        "method",
        "eigh-general",
        "sym-nonsquare",
        "tau-neg",
        "tau-nan",
        "tau-shape",
        "tau-tensor-neg",
        "norm",
        "steps",
    ],
)
def test_lmo_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lmo(**kwargs)


def test_dual_norm_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        dual_norm(np.ones((2, 3)), symmetric=True)
    with pytest.raises(ValueError, match="valid choices"):
        dual_norm(np.eye(2), "trace")


@pytest.mark.cuda
def test_cuda_lmo_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    h = torch.randn(2, 7, 5, dtype=torch.float64)
    for norm, p, _ in NORMS:
        z, d = lmo(h.cuda(), _spec(norm, p), tau=torch.tensor([1.0, 2.0]).cuda(), return_dual=True)
        zc, dc = lmo(h, _spec(norm, p), tau=torch.tensor([1.0, 2.0]), return_dual=True)
        assert z.is_cuda and d.is_cuda
        torch.testing.assert_close(z.cpu(), zc, atol=1e-10, rtol=0)
        torch.testing.assert_close(d.cpu(), dc)
