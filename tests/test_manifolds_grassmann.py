"""Tests for :class:`imuon_manopt.manifolds.Grassmann` against independent truths.

Principal angles are computed with numpy (SVD of ``X^T Y`` / projector comparisons); geodesic
facts (``dist(X, Exp_X(tU)) = t ||U||``), first-order finite differences and the top-p
eigenvectors of a symmetric matrix (``numpy.linalg.eigh``) are the references.
"""

from __future__ import annotations

import geoopt
import numpy as np
import pytest
import torch

from imuon_manopt.manifolds import Grassmann

DT = torch.float64
RETRACTIONS = ("polar", "qr")
SHAPES = [(5, 1), (6, 3), (7, 7), (2, 8, 3), (2, 3, 6, 2)]


def _ids(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@pytest.fixture(autouse=True)
def _float64_and_seed():
    old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(DT)
    # The matrices here are at most 9 x 9; on a busy machine a multithreaded LAPACK QR of such a
    # matrix can wait milliseconds on its thread pool, so the tests run single-threaded.
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    yield
    torch.set_num_threads(old_threads)
    torch.set_default_dtype(old_dtype)


@pytest.fixture(params=RETRACTIONS)
def gr(request) -> Grassmann:
    return Grassmann(retraction=request.param)


@pytest.fixture(params=SHAPES, ids=_ids)
def shape(request) -> tuple[int, ...]:
    return request.param


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _principal_angles(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Principal angles between span(x) and span(y), orthonormal bases, ascending (numpy)."""
    q1, _ = np.linalg.qr(x)
    q2, _ = np.linalg.qr(y)
    cos = np.linalg.svd(q1.T @ q2, compute_uv=False)
    return np.sort(np.arccos(np.clip(cos, -1.0, 1.0)))


def _projector(x: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(x)
    return q @ q.T


def _tangent(m: Grassmann, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return scale * m.proju(x, torch.randn_like(x))


def _assert_orthonormal(y: torch.Tensor, tol: float = 1e-12) -> None:
    eye = torch.eye(y.shape[-1])
    assert torch.allclose(y.mT @ y, eye.expand(*y.shape[:-2], -1, -1), atol=tol)


# --------------------------------------------------------------------- basics


def test_class_attributes_and_repr():
    m = Grassmann()
    assert isinstance(m, geoopt.Manifold)
    assert (m.name, m.ndim, m.reversible) == ("Grassmann", 2, False)
    assert m.retraction == "polar"
    assert "retraction=qr" in repr(Grassmann(retraction="qr"))


def test_unknown_retraction_is_rejected_by_name():
    with pytest.raises(ValueError, match="'cayley'"):
        Grassmann(retraction="cayley")


def test_random_points_are_orthonormal_manifold_tensors(gr, shape):
    x = gr.random(*shape)
    assert isinstance(x, geoopt.ManifoldTensor) and x.manifold is gr
    assert x.shape == shape and x.dtype == DT
    xn = _np(x).reshape(-1, *shape[-2:])
    for xi in xn:
        np.testing.assert_allclose(xi.T @ xi, np.eye(shape[-1]), atol=1e-12)
    assert gr.check_point_on_manifold(x)
    assert gr.random_naive(shape).shape == shape  # a tuple is accepted too


def test_random_float32_passes_default_tolerances():
    m = Grassmann()
    x = m.random(30, 4, dtype=torch.float32)
    assert x.dtype == torch.float32
    m.assert_check_point_on_manifold(x)


def test_random_generator_is_reproducible():
    m = Grassmann()
    a = m.random(6, 2, generator=torch.Generator().manual_seed(3))
    b = m.random(6, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_origin_spans_first_coordinates(shape):
    m = Grassmann()
    o = m.origin(*shape)
    assert isinstance(o, geoopt.ManifoldTensor) and o.shape == shape
    expected = np.eye(shape[-2], shape[-1])
    for oi in _np(o).reshape(-1, *shape[-2:]):
        np.testing.assert_array_equal(oi, expected)


# ----------------------------------------------------------------- checks


def test_manifold_parameter_construction_and_rejection():
    m = Grassmann()
    p = geoopt.ManifoldParameter(m.random(7, 3), manifold=m)
    assert p.manifold is m and p.requires_grad
    m.assert_check_point_on_manifold(p)

    bad = torch.randn(7, 3)
    ok, reason = m.check_point_on_manifold(bad, explain=True)
    assert not ok
    assert "not orthonormal" in reason and "max |X^T X - I| =" in reason
    with pytest.raises(ValueError, match="not lying on Grassmann") as info:
        m.assert_check_point_on_manifold(bad)
    assert "not orthonormal" in str(info.value)

    nan = m.random(7, 3).clone()
    nan[0, 0] = float("nan")
    ok, reason = m.check_point_on_manifold(nan, explain=True)
    assert not ok and "non-finite" in reason


def test_wide_matrix_is_rejected_by_shape():
    m = Grassmann()
    ok, reason = m.check_point(torch.zeros(3, 5), explain=True)
    assert not ok and "p <= n" in reason and "p=5 > n=3" in reason
    with pytest.raises(ValueError, match="p <= n"):
        geoopt.ManifoldParameter(torch.zeros(3, 5), manifold=m)
    with pytest.raises(ValueError, match="p <= n"):
        m.random(3, 5)
    ok, reason = m.check_point(torch.zeros(4), explain=True)
    assert not ok and "requires more than 2 dim" in reason


def test_vector_check_names_the_problem():
    m = Grassmann()
    x = m.random(7, 3)
    u = _tangent(m, x)
    assert m.check_vector_on_tangent(x, u)
    ok, reason = m.check_vector_on_tangent(x, u + x, explain=True)
    assert not ok and "not horizontal" in reason and "max |X^T u| =" in reason
    ok, reason = m.check_vector_on_tangent(x, torch.zeros(7, 2), explain=True)
    assert not ok and "trailing shape" in reason
    with pytest.raises(ValueError, match="not horizontal"):
        m.assert_check_vector_on_tangent(x, u + x)


# --------------------------------------------------------- projections


def test_proju_is_horizontal_idempotent_and_self_adjoint(shape):
    m = Grassmann()
    x = m.random(*shape)
    a, b = torch.randn(*shape), torch.randn(*shape)
    pa, pb = m.proju(x, a), m.proju(x, b)
    assert torch.allclose(x.mT @ pa, torch.zeros(()), atol=1e-12)
    assert torch.allclose(m.proju(x, pa), pa, atol=1e-12)
    # orthogonal projection: <P a, b> = <a, P b>
    assert torch.allclose(m.inner(x, pa, b), m.inner(x, a, pb), atol=1e-12)
    assert torch.equal(m.egrad2rgrad(x, a), pa)


def test_proju_is_equivariant_under_change_of_basis():
    m = Grassmann()
    x, a = m.random(8, 3), torch.randn(8, 3)
    q = torch.linalg.qr(torch.randn(3, 3))[0]
    assert torch.allclose(m.proju(x @ q, a @ q), m.proju(x, a) @ q, atol=1e-12)


def test_projx_gives_a_basis_of_the_same_subspace(shape):
    m = Grassmann()
    a = torch.randn(*shape)
    y = m.projx(a)
    _assert_orthonormal(y)
    for ai, yi in zip(_np(a).reshape(-1, *shape[-2:]), _np(y).reshape(-1, *shape[-2:])):
        np.testing.assert_allclose(_projector(yi), _projector(ai), atol=1e-10)


def test_inner_norm_keepdim_and_component_inner():
    m = Grassmann()
    x = m.random(2, 6, 3)
    u, v = _tangent(m, x), _tangent(m, x)
    expected = np.einsum("bij,bij->b", _np(u), _np(v))
    np.testing.assert_allclose(_np(m.inner(x, u, v)), expected, atol=1e-12)
    assert m.inner(x, u, v, keepdim=True).shape == (2, 1, 1)
    assert m.component_inner(x, u, v).shape == (2, 1, 1)
    np.testing.assert_allclose(_np(m.norm(x, u)), np.linalg.norm(_np(u), axis=(1, 2)))
    np.testing.assert_allclose(_np(m.inner(x, u)), _np(m.norm(x, u)) ** 2)


# ---------------------------------------------------- retraction and exp


def test_retr_stays_on_manifold_and_spans_x_plus_u(gr, shape):
    x = gr.random(*shape)
    u = _tangent(gr, x, scale=0.7)
    y = gr.retr(x, u)
    assert y.shape == shape
    _assert_orthonormal(y)
    s = (*shape[-2:],)
    for xi, ui, yi in zip(_np(x).reshape(-1, *s), _np(u).reshape(-1, *s), _np(y).reshape(-1, *s)):
        np.testing.assert_allclose(_projector(yi), _projector(xi + ui), atol=1e-10)


def test_retr_at_zero_is_identity(gr):
    x = gr.random(6, 3)
    assert torch.allclose(gr.retr(x, torch.zeros_like(x)), x, atol=1e-12)


def test_polar_retraction_is_equivariant():
    m = Grassmann("polar")
    x = m.random(8, 3)
    u = _tangent(m, x)
    q = torch.linalg.qr(torch.randn(3, 3))[0]
    assert torch.allclose(m.retr(x @ q, u @ q), m.retr(x, u) @ q, atol=1e-12)


def test_polar_retraction_is_exp_with_arctan_angles():
    m = Grassmann("polar")
    x = m.random(9, 3)
    u = _tangent(m, x, scale=2.0)
    w, s, vh = torch.linalg.svd(u, full_matrices=False)
    u_atan = w @ torch.diag_embed(torch.atan(s)) @ vh
    assert torch.allclose(m.retr(x, u), m.expmap(x, u_atan), atol=1e-12)


def test_expmap_is_a_geodesic_with_the_right_speed(shape):
    """Principal angles between X and Exp_X(tU) are t * sigma_i(U) while below pi/2."""
    if shape[-1] == shape[-2]:
        pytest.skip("Gr(n, n) is a single point: its tangent space is {0}")
    m = Grassmann()
    x = m.random(*shape)
    u = _tangent(m, x)
    smax = torch.linalg.matrix_norm(u, ord=2).max()
    u = u / smax  # spectral norm 1 in every batch entry at most
    sig = _np(torch.linalg.svdvals(u)).reshape(-1, shape[-1])
    s = (*shape[-2:],)
    for t in (0.1, 0.7, 1.5):
        y = m.expmap(x, t * u)
        _assert_orthonormal(y)
        for xi, yi, si in zip(_np(x).reshape(-1, *s), _np(y).reshape(-1, *s), sig):
            np.testing.assert_allclose(_principal_angles(xi, yi), np.sort(t * si), atol=1e-7)
        # geodesic distance equals t * ||U||_F
        np.testing.assert_allclose(_np(m.dist(x, y)), t * _np(m.norm(x, u)), atol=1e-10)


def test_expmap_velocity_at_zero_is_u():
    m = Grassmann()
    x = m.random(7, 3)
    u = _tangent(m, x)
    h = 1e-6
    fd = (m.expmap(x, h * u) - m.expmap(x, -h * u)) / (2 * h)
    assert torch.allclose(fd, u, atol=1e-8)


def test_expmap_agrees_with_integrated_geodesic_equation():
    """Integrate the Grassmann geodesic ODE X'' = -X (X'^T X'), X' horizontal, with RK4."""
    m = Grassmann()
    x0 = m.random(7, 2)
    v0 = _tangent(m, x0)

    def rhs(state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, v = state
        return v, -x @ (v.mT @ v)

    state, n_steps = (x0.clone(), v0.clone()), 400
    h = 1.0 / n_steps
    for _ in range(n_steps):
        k1 = rhs(state)
        k2 = rhs(tuple(s + 0.5 * h * k for s, k in zip(state, k1)))
        k3 = rhs(tuple(s + 0.5 * h * k for s, k in zip(state, k2)))
        k4 = rhs(tuple(s + h * k for s, k in zip(state, k3)))
        state = tuple(s + h / 6 * (a + 2 * b + 2 * c + d) for s, a, b, c, d in zip(state, k1, k2, k3, k4))
    assert torch.allclose(m.expmap(x0, v0), state[0], atol=1e-9)


def test_logmap_inverts_expmap(shape):
    if shape[-1] == shape[-2]:
        pytest.skip("Gr(n, n) is a single point: its tangent space is {0}")
    m = Grassmann()
    x = m.random(*shape)
    u = _tangent(m, x)
    u = 1.3 * u / torch.linalg.matrix_norm(u, ord=2).max()  # angles below pi / 2
    y = m.expmap(x, u)
    assert torch.allclose(m.logmap(x, y), u, atol=1e-10)


def test_logmap_is_representative_independent_and_reaches_y():
    m = Grassmann()
    x, y = m.random(3, 8, 3), m.random(3, 8, 3)
    q = torch.linalg.qr(torch.randn(3, 3, 3))[0]
    log = m.logmap(x, y)
    assert torch.allclose(m.logmap(x, y @ q), log, atol=1e-10)
    assert torch.allclose(x.mT @ log, torch.zeros(()), atol=1e-12)
    z = m.expmap(x, log)
    for zi, yi in zip(_np(z), _np(y)):
        np.testing.assert_allclose(_projector(zi), _projector(yi), atol=1e-9)


def test_dist_matches_numpy_principal_angles():
    m = Grassmann()
    x, y = m.random(4, 9, 3), m.random(4, 9, 3)
    expected = [np.linalg.norm(_principal_angles(a, b)) for a, b in zip(_np(x), _np(y))]
    np.testing.assert_allclose(_np(m.dist(x, y)), expected, atol=1e-8)
    np.testing.assert_allclose(_np(m.dist2(x, y)), np.square(expected), atol=1e-8)
    assert m.dist(x, y, keepdim=True).shape == (4, 1, 1)
    np.testing.assert_allclose(_np(m.dist(x, x)), 0.0, atol=1e-7)
    np.testing.assert_allclose(_np(m.dist(x, y)), _np(m.dist(y, x)), atol=1e-10)
    assert torch.allclose(m.logmap(x, x), torch.zeros(()), atol=1e-7)


def test_dist_at_orthogonal_subspaces_is_pi_over_two_per_angle():
    m = Grassmann()
    e = torch.eye(6)
    x, y = e[:, :2], e[:, 2:4]
    assert torch.allclose(m.dist(x, y), torch.tensor(np.pi / 2 * np.sqrt(2)), atol=1e-12)


def test_scaled_wrapper_scales_distance():
    m = Grassmann()
    x, y = m.random(6, 2), m.random(6, 2)
    assert torch.allclose(geoopt.Scaled(m, 2.0).dist(x, y), 2 * m.dist(x, y))


# -------------------------------------------------------------- transport


def test_transport_gives_horizontal_vectors(gr, shape):
    x = gr.random(*shape)
    u, v = _tangent(gr, x, 0.5), _tangent(gr, x)
    y = gr.retr(x, u)
    zero = torch.zeros(())
    for w in (gr.transp(x, y, v), gr.transp_follow_retr(x, u, v)):
        assert torch.allclose(y.mT @ w, zero, atol=1e-12)
    y2, w2 = gr.retr_transp(x, u, v)
    assert torch.allclose(y2, y) and torch.allclose(w2, gr.proju(y, v))
    ye, we = gr.expmap_transp(x, u, v)
    assert torch.allclose(ye.mT @ we, zero, atol=1e-12)
    assert torch.allclose(gr.transp_follow_expmap(x, u, v), we)
    # transport along a zero step is the identity
    assert torch.allclose(gr.transp_follow_retr(x, torch.zeros_like(u), v), v, atol=1e-12)


# ------------------------------------------------------------ batching


@pytest.mark.parametrize("retraction", RETRACTIONS)
def test_batch_equals_loop(retraction):
    m = Grassmann(retraction)
    x = m.random(2, 3, 7, 3)
    u, v = _tangent(m, x, 0.8), _tangent(m, x)
    y = m.random(2, 3, 7, 3)
    batched = {
        "retr": m.retr(x, u),
        "expmap": m.expmap(x, u),
        "logmap": m.logmap(x, y),
        "dist": m.dist(x, y),
        "transp": m.transp(x, y, v),
        "inner": m.inner(x, u, v),
        "projx": m.projx(x + u),
    }
    for i in range(2):
        for j in range(3):
            xi, ui, vi, yi = x[i, j], u[i, j], v[i, j], y[i, j]
            single = {
                "retr": m.retr(xi, ui),
                "expmap": m.expmap(xi, ui),
                "logmap": m.logmap(xi, yi),
                "dist": m.dist(xi, yi),
                "transp": m.transp(xi, yi, vi),
                "inner": m.inner(xi, ui, vi),
                "projx": m.projx(xi + ui),
            }
            for key, value in single.items():
                assert torch.allclose(batched[key][i, j], value, atol=1e-12), key


# --------------------------------------------------------- first order


def _cost(c: torch.Tensor, b: torch.Tensor):
    def f(x: torch.Tensor) -> torch.Tensor:
        xbx = x.mT @ b @ x
        return -torch.trace(x.mT @ c @ x) + 0.5 * (xbx * xbx).sum()

    return f


def _sym(n: int) -> torch.Tensor:
    a = torch.randn(n, n)
    return 0.5 * (a + a.mT)


@pytest.mark.parametrize("step", ["retr", "expmap"])
def test_first_order_finite_differences(gr, step):
    """d/dt f(R_x(t u)) at 0 equals <egrad2rgrad(x, egrad), u>_x."""
    n, p = 8, 3
    f = _cost(_sym(n), _sym(n))
    x = gr.random(n, p).detach()
    u = _tangent(gr, x)
    xg = x.clone().requires_grad_(True)
    f(xg).backward()
    rgrad = gr.egrad2rgrad(x, xg.grad)
    expected = gr.inner(x, rgrad, u).item()
    move = getattr(gr, step)
    h = 1e-5
    fd = (f(move(x, h * u)) - f(move(x, -h * u))).item() / (2 * h)
    assert fd == pytest.approx(expected, rel=1e-7, abs=1e-8)


# ------------------------------------------------------- geoopt optimizers


def _dominant_problem(n: int = 8, p: int = 2) -> tuple[torch.Tensor, np.ndarray]:
    """Symmetric C with eigenvalues (6, 5, 1, 0.9, ...): eigengap 4 after the top p."""
    q = torch.linalg.qr(torch.randn(n, n))[0]
    eigs = torch.cat([torch.tensor([6.0, 5.0]), torch.linspace(1.0, 0.2, n - p)])
    c = q @ torch.diag(eigs) @ q.mT
    _, vecs = np.linalg.eigh(_np(c))
    return c, vecs[:, -p:]


@pytest.mark.parametrize(
    "make_opt",
    [
        pytest.param(lambda ps: geoopt.optim.RiemannianSGD(ps, lr=0.05), id="sgd"),
        pytest.param(
            lambda ps: geoopt.optim.RiemannianSGD(ps, lr=0.03, momentum=0.5, nesterov=True, stabilize=10),
            id="sgd-nesterov",
        ),
        pytest.param(lambda ps: geoopt.optim.RiemannianAdam(ps, lr=0.05), id="adam"),
    ],
)
def test_geoopt_optimizers_find_dominant_subspace(gr, make_opt):
    c, top = _dominant_problem()
    x = geoopt.ManifoldParameter(gr.origin(8, 2), manifold=gr)
    x.data.copy_(gr.random(8, 2))
    opt = make_opt([x])
    for _ in range(300):
        opt.zero_grad()
        loss = -torch.trace(x.mT @ c @ x)
        loss.backward()
        opt.step()
    gr.assert_check_point_on_manifold(x.detach(), atol=1e-10, rtol=0)
    assert _principal_angles(_np(x), top).max() < 1e-3
