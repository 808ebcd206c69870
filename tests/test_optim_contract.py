"""IMuon's step against the spec's intrinsic direction, per geometry, and its momentum / lr / decay
rules.

The contract: with ``momentum=0``, ``polar="svd"``, no weight decay and no lr adjustment, one
    ``step()`` gives
``manifold.retr(x, -lr * xi)`` with ``xi = intrinsic_direction(geometry, x, E)`` of the matching
core geometry (``x - lr * xi`` for plain matrices, ``(B - lr xi_B, A - lr xi_A)`` for pairs).
"""

from __future__ import annotations

import geoopt
import pytest
import torch

from imuon_manopt import geometry as geo
from imuon_manopt.direction import intrinsic_direction
from imuon_manopt.optim import IMuon, _dispatch, register_adjust_lr_fn, register_manifold

DT = torch.float64
LR = 0.05


def _grassmann_case():
    try:
        from imuon_manopt.manifolds import Grassmann
    except ImportError:
        return []
    m = Grassmann()
    q = torch.linalg.qr(torch.randn(2, 7, 3, dtype=DT))[0]
    return [pytest.param(m, q, geo.Grassmann("orthonormal"), id="grassmann")]


def _stiefel(m, *shape):
    return torch.linalg.qr(torch.randn(*shape, dtype=DT))[0]


def _spd(*shape):
    a = torch.randn(*shape, dtype=DT)
    return a @ a.mT + 0.5 * torch.eye(shape[-1], dtype=DT)


def _sphere(*shape):
    x = torch.randn(*shape, dtype=DT)
    return x / x.norm(dim=-1, keepdim=True)


def manifold_cases():
    torch.manual_seed(1)
    cases = [
        pytest.param(
            geoopt.EuclideanStiefel(),
            _stiefel(None, 7, 3),
            geo.Stiefel("embedded"),
            id="euclidean-stiefel",
        ),
        pytest.param(geoopt.Stiefel(), _stiefel(None, 7, 3), geo.Stiefel("canonical"), id="canonical-stiefel"),
        pytest.param(
            geoopt.EuclideanStiefel(),
            _stiefel(None, 2, 3, 6, 2),
            geo.Stiefel("embedded"),
            id="batched-stiefel",
        ),
        pytest.param(geoopt.SymmetricPositiveDefinite(), _spd(4, 4), geo.SPD(), id="spd"),
        pytest.param(geoopt.SymmetricPositiveDefinite(), _spd(3, 4, 4), geo.SPD(), id="batched-spd"),
        pytest.param(geoopt.Sphere(), _sphere(3, 5), geo.Sphere(), id="sphere"),
        pytest.param(
            geoopt.EuclideanStiefelExact(),
            _stiefel(None, 5, 2),
            geo.Stiefel("embedded"),
            id="stiefel-exact-subclass",
        ),
    ]
    return cases + _grassmann_case()


@pytest.mark.parametrize("manifold, x0, geometry", manifold_cases())
def test_one_step_is_retraction_of_intrinsic_direction(manifold, x0, geometry):
    p = geoopt.ManifoldParameter(x0.clone(), manifold=manifold)
    egrad = torch.randn_like(x0)
    p.grad = egrad.clone()
    IMuon([p], lr=LR, momentum=0.0, polar="svd").step()
    xi = intrinsic_direction(geometry, x0, egrad, polar="svd").xi
    # geoopt's canonical Cayley retraction takes a covector: it moves along xi when handed flat(xi)
    u = geometry.flat(geometry.at(x0), xi) if isinstance(manifold, geoopt.CanonicalStiefel) else xi
    expected = manifold.retr(x0, -LR * u)
    torch.testing.assert_close(p.detach(), expected, atol=1e-10, rtol=1e-10)
    assert (p.detach() - x0).abs().max() > 1e-3  # it moved
    assert manifold.check_point_on_manifold(p.detach())


@pytest.mark.parametrize("manifold, x0, geometry", manifold_cases())
def test_small_step_decreases_a_quadratic(manifold, x0, geometry):
    """Independent of the core: -xi is a descent direction, so a small step lowers f."""
    target = torch.randn_like(x0)
    p = geoopt.ManifoldParameter(x0.clone(), manifold=manifold)
    opt = IMuon([p], lr=1e-3, momentum=0.0, polar="svd")
    loss0 = 0.5 * ((p - target) ** 2).sum()
    loss0.backward()
    opt.step()
    loss1 = 0.5 * ((p.detach() - target) ** 2).sum()
    assert loss1 < loss0.detach()


def test_canonical_and_embedded_stiefel_take_different_steps():
    x0 = _stiefel(None, 8, 3)
    egrad = torch.randn_like(x0)
    out = []
    for manifold in (geoopt.EuclideanStiefel(), geoopt.CanonicalStiefel()):
        p = geoopt.ManifoldParameter(x0.clone(), manifold=manifold)
        p.grad = egrad.clone()
        IMuon([p], lr=LR, momentum=0.0, polar="svd").step()
        out.append(p.detach())
    assert (out[0] - out[1]).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(6, 4), (3, 8), (4, 3, 2, 2)], ids=["tall", "wide", "conv"])
def test_plain_matrices_take_the_muon_step(shape):
    w = torch.nn.Parameter(torch.randn(*shape, dtype=DT))
    x0 = w.detach().clone()
    w.grad = torch.randn_like(w)
    IMuon([w], lr=LR, momentum=0.0, polar="svd").step()
    flat = (shape[0], -1)
    xi = intrinsic_direction(geo.Euclidean(), x0.reshape(flat), w.grad.reshape(flat), polar="svd").xi
    torch.testing.assert_close(w.detach(), x0 - LR * xi.reshape(shape), atol=1e-12, rtol=1e-12)
    # independent truth: a full-rank Muon step has all singular values equal to lr
    s = torch.linalg.svdvals((w.detach() - x0).reshape(flat))
    torch.testing.assert_close(s, torch.full_like(s, LR))


def test_geoopt_euclidean_manifold_parameter_is_plain():
    w = geoopt.ManifoldParameter(torch.randn(5, 3, dtype=DT))
    x0 = w.detach().clone()
    w.grad = torch.randn_like(x0)
    IMuon([w], lr=LR, momentum=0.0, polar="svd").step()
    xi = intrinsic_direction(geo.Euclidean(), x0, w.grad, polar="svd").xi
    torch.testing.assert_close(w.detach(), x0 - LR * xi)


@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "batched"])
def test_pair_step_is_the_fixed_rank_direction(batch):
    b = torch.nn.Parameter(torch.randn(*batch, 7, 2, dtype=DT))
    a = torch.nn.Parameter(torch.randn(*batch, 2, 5, dtype=DT))
    b0, a0 = b.detach().clone(), a.detach().clone()
    b.grad, a.grad = torch.randn_like(b), torch.randn_like(a)
    IMuon([b, a], lr=LR, momentum=0.0, polar="svd", pairs=[(b, a)]).step()
    xi_b, xi_a = intrinsic_direction(geo.FixedRank(), (b0, a0), (b.grad, a.grad), polar="svd").xi
    torch.testing.assert_close(b.detach(), b0 - LR * xi_b, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a.detach(), a0 - LR * xi_a, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("norm", ["spectral", "frobenius"])
@pytest.mark.parametrize("manifold, x0, geometry", manifold_cases())
def test_first_momentum_step_equals_plain_step(manifold, x0, geometry, norm):
    """With an empty buffer, E~ = (1 + beta) E as a covector, and every LMO is scale invariant.

    This checks that the momentum path (Riemannian gradient -> metric lowering ``flat``) reproduces
    the Euclidean covector for every metric (canonical Stiefel and SPD are not the identity).
    """
    egrad = torch.randn_like(x0)
    out = []
    for beta in (0.0, 0.9):
        p = geoopt.ManifoldParameter(x0.clone(), manifold=manifold)
        p.grad = egrad.clone()
        IMuon([p], lr=LR, momentum=beta, polar="svd", norm=norm).step()
        out.append(p.detach())
    torch.testing.assert_close(out[0], out[1], atol=1e-9, rtol=1e-9)


def test_euclidean_nesterov_and_heavy_ball_by_hand():
    beta = 0.9
    grads = [torch.randn(5, 4, dtype=DT) for _ in range(3)]
    for nesterov in (True, False):
        w = torch.nn.Parameter(torch.randn(5, 4, dtype=DT))
        x = w.detach().clone()
        opt = IMuon([w], lr=LR, momentum=beta, nesterov=nesterov, polar="svd")
        buf = torch.zeros_like(x)
        for g in grads:
            w.grad = g.clone()
            opt.step()
            buf = beta * buf + g
            e = g + beta * buf if nesterov else buf
            x = x - LR * intrinsic_direction(geo.Euclidean(), x, e, polar="svd").xi
        torch.testing.assert_close(w.detach(), x, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(opt.state[w]["momentum_buffer"], buf)


def test_manifold_momentum_is_transported_by_hand():
    """Stiefel (embedded): buffer of Riemannian gradients, carried by geoopt's retr_transp."""
    beta, manifold = 0.8, geoopt.EuclideanStiefel()
    x = _stiefel(None, 6, 3)
    p = geoopt.ManifoldParameter(x.clone(), manifold=manifold)
    opt = IMuon([p], lr=LR, momentum=beta, polar="svd")
    buf = torch.zeros_like(x)
    for _ in range(3):
        g = torch.randn_like(x)
        p.grad = g.clone()
        opt.step()
        r = manifold.egrad2rgrad(x, g)
        buf = beta * buf + r
        xi = intrinsic_direction(geo.Stiefel(), x, r + beta * buf, polar="svd").xi
        x, buf = manifold.retr_transp(x, -LR * xi, buf)
    torch.testing.assert_close(p.detach(), x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, atol=1e-12, rtol=1e-12)


def test_pair_factor_momentum_by_hand():
    beta = 0.9
    b = torch.nn.Parameter(torch.randn(6, 2, dtype=DT))
    a = torch.nn.Parameter(torch.randn(2, 5, dtype=DT))
    xb, xa = b.detach().clone(), a.detach().clone()
    opt = IMuon([b, a], lr=LR, momentum=beta, polar="svd", pairs=[(b, a)])
    mb, ma = torch.zeros_like(xb), torch.zeros_like(xa)
    for _ in range(3):
        gb, ga = torch.randn_like(xb), torch.randn_like(xa)
        b.grad, a.grad = gb.clone(), ga.clone()
        opt.step()
        mb, ma = beta * mb + gb, beta * ma + ga
        xi_b, xi_a = intrinsic_direction(geo.FixedRank(), (xb, xa), (gb + beta * mb, ga + beta * ma), polar="svd").xi
        xb, xa = xb - LR * xi_b, xa - LR * xi_a
    torch.testing.assert_close(b.detach(), xb, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a.detach(), xa, atol=1e-12, rtol=1e-12)


def _polar(h):
    u, _, vh = torch.linalg.svd(h, full_matrices=False)
    return u @ vh


def test_pair_ambient_mode_matches_the_reference_formula():
    """Spec §3: xi_B = polar(M Q_A) R_A^{-T}, xi_A = R_B^{-1} polar(Q_B^T M), M = E_B A + B E_A."""
    b = torch.nn.Parameter(torch.randn(6, 2, dtype=DT))
    a = torch.nn.Parameter(torch.randn(2, 5, dtype=DT))
    b0, a0 = b.detach().clone(), a.detach().clone()
    gb, ga = torch.randn_like(b0), torch.randn_like(a0)
    b.grad, a.grad = gb.clone(), ga.clone()
    IMuon([{"params": [b, a], "pair_momentum": "ambient"}], lr=LR, momentum=0.0, polar="svd", pairs=[(b, a)]).step()
    m = gb @ a0 + b0 @ ga
    q_a, r_a = torch.linalg.qr(a0.mT)
    q_b, r_b = torch.linalg.qr(b0)
    xi_b = _polar(m @ q_a) @ torch.linalg.inv(r_a).mT
    xi_a = torch.linalg.inv(r_b) @ _polar(q_b.mT @ m)
    torch.testing.assert_close(b.detach(), b0 - LR * xi_b, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a.detach(), a0 - LR * xi_a, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "fn, scale",
    [
        ("original", (8 / 3) ** 0.5),
        ("match_rms_adamw", 0.2 * 8**0.5),
        ("test_triple", 3.0),
    ],
    ids=["original", "match_rms_adamw", "registered"],
)
def test_adjust_lr_fn_scales_the_step(fn, scale):
    register_adjust_lr_fn("test_triple", lambda lr, shape: 3 * lr)
    g = torch.randn(8, 3, dtype=DT)
    deltas = []
    for adjust in (None, fn):
        w = torch.nn.Parameter(torch.ones(8, 3, dtype=DT))
        w.grad = g.clone()
        IMuon([w], lr=LR, momentum=0.0, polar="svd", adjust_lr_fn=adjust).step()
        deltas.append(w.detach() - 1.0)
    torch.testing.assert_close(deltas[1], scale * deltas[0])


def test_decoupled_weight_decay_on_plain_and_pairs():
    wd = 0.1
    w = torch.nn.Parameter(torch.randn(5, 4, dtype=DT))
    x0 = w.detach().clone()
    w.grad = torch.randn_like(x0)
    IMuon([w], lr=LR, momentum=0.0, polar="svd", weight_decay=wd).step()
    xi = intrinsic_direction(geo.Euclidean(), x0, w.grad, polar="svd").xi
    torch.testing.assert_close(w.detach(), x0 * (1 - LR * wd) - LR * xi)

    products = []
    gb, ga = torch.randn(6, 2, dtype=DT), torch.randn(2, 5, dtype=DT)
    b_init, a_init = torch.randn(6, 2, dtype=DT), torch.randn(2, 5, dtype=DT)
    for decay in (0.0, wd):
        b, a = torch.nn.Parameter(b_init.clone()), torch.nn.Parameter(a_init.clone())
        b.grad, a.grad = gb.clone(), ga.clone()
        IMuon([b, a], lr=LR, momentum=0.0, polar="svd", pairs=[(b, a)], weight_decay=decay).step()
        products.append(b.detach() @ a.detach())
    torch.testing.assert_close(products[1], (1 - LR * wd) ** 2 * products[0])  # per factor, as AdamW


def test_weight_decay_on_a_manifold_group_is_refused():
    p = geoopt.ManifoldParameter(_stiefel(None, 5, 2), manifold=geoopt.EuclideanStiefel())
    w = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="weight_decay=0.1"):
        IMuon([p, w], lr=LR, weight_decay=0.1)
    IMuon([{"params": [p], "weight_decay": 0.0}, {"params": [w]}], lr=LR, weight_decay=0.1)


def test_adamw_fallback_matches_torch_adamw():
    kw = dict(lr=1e-2, weight_decay=0.05)
    bias = torch.nn.Parameter(torch.randn(7, dtype=DT))
    scalar = torch.nn.Parameter(torch.tensor(0.3, dtype=DT))
    head = torch.nn.Parameter(torch.randn(4, 3, dtype=DT))  # use_imuon=False: every plain tensor -> AdamW
    ref = [torch.nn.Parameter(t.detach().clone()) for t in (bias, scalar, head)]
    opt = IMuon(
        [{"params": [bias, scalar]}, {"params": [head], "use_imuon": False}],
        momentum=0.9,
        fallback={"name": "adamw", "betas": (0.8, 0.95), "eps": 1e-6},
        **kw,
    )
    ref_opt = torch.optim.AdamW(ref, betas=(0.8, 0.95), eps=1e-6, **kw)
    for _ in range(4):
        grads = [torch.randn_like(t) for t in ref]
        for p, q, g in zip((bias, scalar, head), ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip((bias, scalar, head), ref):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-12, rtol=1e-12)


def test_sgd_fallback_matches_torch_sgd_nesterov():
    bias = torch.nn.Parameter(torch.randn(5, dtype=DT))
    ref = torch.nn.Parameter(bias.detach().clone())
    opt = IMuon([bias], lr=0.1, momentum=0.9, fallback="sgd")
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(4):
        g = torch.randn_like(ref)
        bias.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(bias.detach(), ref.detach(), atol=1e-12, rtol=1e-12)


def test_fallback_lr_follows_the_schedule():
    bias = torch.nn.Parameter(torch.zeros(3, dtype=DT))
    opt = IMuon([bias], lr=1.0, momentum=0.0, fallback={"name": "sgd", "lr": 0.1})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    moves = []
    for _ in range(3):
        before = bias.detach().clone()
        bias.grad = torch.ones(3, dtype=DT)
        opt.step()
        sched.step()
        moves.append(float((before - bias.detach())[0]))
    assert moves == pytest.approx([0.1, 0.05, 0.025])


@pytest.mark.parametrize("polar", ["svd", "newton_schulz"])
def test_bfloat16_parameters_keep_their_dtype(polar):
    w = torch.nn.Parameter(torch.randn(16, 8).to(torch.bfloat16))
    bias = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16))
    st = geoopt.ManifoldParameter(
        geoopt.EuclideanStiefel().random(8, 3).to(torch.bfloat16),
        manifold=geoopt.EuclideanStiefel(),
    )
    b = torch.nn.Parameter(torch.randn(8, 2).to(torch.bfloat16))
    a = torch.nn.Parameter(torch.randn(2, 6).to(torch.bfloat16))
    params = [w, bias, st, b, a]
    opt = IMuon(params, lr=0.01, polar=polar, pairs=[(b, a)])
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        for value in opt.state[p].values():  # buffers in float32: a bfloat16 sum of gradients loses them
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert value.dtype == torch.float32
    # the bf16 step is the float32 step, rounded once
    w32 = torch.nn.Parameter(torch.randn(16, 8))
    w16 = torch.nn.Parameter(w32.detach().to(torch.bfloat16))
    g = torch.randn(16, 8)
    w32.grad, w16.grad = g.clone(), g.to(torch.bfloat16)
    x16 = w16.detach().float()
    IMuon([w16], lr=0.01, polar=polar, momentum=0.0).step()
    step16 = x16 - w16.detach().float()
    w32.data.copy_(x16)
    w32.grad = w16.grad.float()
    IMuon([w32], lr=0.01, polar=polar, momentum=0.0).step()
    step32 = x16 - w32.detach()
    assert (step16 - step32).abs().max() < 0.02 * step32.abs().max() + 1e-2 * x16.abs().max()


def _polar_svd(g):
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u @ vh


def test_ns_dtype_rounds_only_the_orthogonalization():
    """``ns_dtype=torch.bfloat16``: the Muon step is the polar factor to bfloat16 accuracy (not to
    the float32 accuracy of the default), and a Stiefel point still lands on the manifold to float32
    accuracy because the retraction stays in the working dtype."""
    # singular values in [0.5, 1]: eight Polar Express steps converge (five leave them in
    # [0.87, 1.12] by design), so the error left is rounding
    q1 = torch.linalg.qr(torch.randn(48, 32, dtype=DT))[0]
    q2 = torch.linalg.qr(torch.randn(32, 32, dtype=DT))[0]
    g = (q1 @ torch.diag(torch.linspace(0.5, 1.0, 32, dtype=DT)) @ q2.T).float()
    errors = {}
    for nsd in (None, torch.bfloat16):
        w = torch.nn.Parameter(torch.zeros(48, 32))
        w.grad = g.clone()
        IMuon([w], lr=1.0, momentum=0.0, polar={"method": "newton_schulz", "steps": 8, "dtype": nsd}).step()
        assert w.dtype == torch.float32
        errors[nsd] = float((-w.detach().double() - _polar_svd(g)).norm() / 32**0.5)
    assert errors[None] < 1e-5
    assert 1e-3 < errors[torch.bfloat16] < 3e-2

    x = geoopt.ManifoldParameter(_stiefel(None, 64, 8).float(), manifold=geoopt.EuclideanStiefel())
    opt = IMuon([x], lr=0.1, polar={"method": "newton_schulz", "dtype": torch.bfloat16})
    for _ in range(20):
        x.grad = torch.randn(64, 8)
        opt.step()
    gram = x.detach().double().T @ x.detach().double()
    assert float((gram - torch.eye(8, dtype=DT)).abs().max()) < 1e-5


def test_polar_dict_survives_state_dict_and_earlier_layouts_are_refused():
    w = torch.nn.Parameter(torch.randn(6, 4))
    w.grad = torch.randn(6, 4)
    polar = {"method": "newton_schulz", "dtype": torch.bfloat16}
    opt = IMuon([w], lr=0.01, polar=polar)
    opt.step()
    sd = opt.state_dict()
    fresh = IMuon([w], lr=0.01)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["polar"] == polar
    for group in sd["param_groups"]:  # the flattened keys of an earlier layout
        group["polar"] = "newton_schulz"
        group["ns_dtype"] = torch.bfloat16
    with pytest.raises(ValueError, match=r"\['ns_dtype'\] no longer exist: use ns_dtype -> polar="):
        IMuon([w], lr=0.01).load_state_dict(sd)


BAD_OPTIONS = [
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(momentum=1.0), "momentum: 1.0"),
    (dict(momentum=-0.1), "momentum: -0.1"),
    (dict(weight_decay=-1e-3), "weight_decay: -0.001"),
    (dict(norm="operator"), "norm='operator'"),
    (dict(norm="schatten"), "norm='schatten'"),
    (dict(norm=("schatten", 0.5)), "norm=('schatten', 0.5)"),
    (dict(norm=("kyfan", 0)), "norm=('kyfan', 0)"),
    (dict(polar={"method": "randomized", "oversample": -1}), "oversample"),
    (dict(polar="qr"), "polar='qr'"),
    (dict(polar={"method": "newton_schulz", "steps": 0}), "polar 'steps' must be a positive int"),
    (dict(polar={"method": "newton_schulz", "dtype": torch.int32}), "got torch.int32"),
    (dict(polar={"method": "newton_schulz", "dtype": "bf16"}), "bf16"),
    (dict(polar={"steps": 5}), "invalid polar"),
    (dict(adjust_lr_fn="sqrt"), "adjust_lr_fn='sqrt'"),
    (dict(fallback="adam"), "fallback='adam'"),
    (dict(fallback={"name": "adamw", "lr": -1.0}), "fallback 'lr': -1.0"),
    (dict(fallback={"name": "adamw", "betas": (1.0, 0.9)}), "betas"),
    (dict(fallback={"name": "adamw", "eps": -1.0}), "fallback 'eps': -1.0"),
    (dict(fallback={"name": "adamw", "beta": 0.9}), "invalid fallback"),
    (dict(nonfinite="ignore"), "'ignore'"),
    (dict(stabilize=0), "stabilize"),
]


@pytest.mark.parametrize("kwargs, match", BAD_OPTIONS, ids=[str(k) for k, _ in BAD_OPTIONS])
def test_constructor_value_errors_name_the_bad_value(kwargs, match):
    w = torch.nn.Parameter(torch.randn(3, 3))
    opts = {"lr": 0.01, **kwargs}
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        IMuon([w], **opts)


def test_group_options_are_validated_too():
    w, v = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="param group 1: invalid momentum"):
        IMuon([{"params": [w]}, {"params": [v], "momentum": 2.0}], lr=0.01)
    with pytest.raises(ValueError, match="param group 1: unknown pair_momentum='ema'"):
        IMuon([{"params": [w]}, {"params": [v], "pair_momentum": "ema"}], lr=0.01)
    with pytest.raises(ValueError, match="param group 0: use_imuon must be a bool"):
        IMuon([{"params": [w], "use_imuon": "yes"}], lr=0.01)


def test_bad_pairs_are_refused():
    b, a = torch.nn.Parameter(torch.randn(6, 2)), torch.nn.Parameter(torch.randn(2, 5))
    other = torch.nn.Parameter(torch.randn(3, 5))
    with pytest.raises(ValueError, match="not among the optimizer's params"):
        IMuon([b], lr=0.01, pairs=[(b, a)])
    with pytest.raises(ValueError, match="do not chain"):
        IMuon([b, other], lr=0.01, pairs=[(b, other)])
    with pytest.raises(ValueError, match="list of \\(B, A\\) tuples"):
        IMuon([b, a], lr=0.01, pairs=(b, a))
    with pytest.raises(ValueError, match="same tensor"):
        IMuon([b], lr=0.01, pairs=[(b, b)])
    with pytest.raises(ValueError, match="share one group"):
        IMuon([{"params": [b]}, {"params": [a]}], lr=0.01, pairs=[(b, a)])
    a2 = torch.nn.Parameter(torch.randn(2, 4))
    with pytest.raises(ValueError, match="already belongs to pairs\\[0\\]"):
        IMuon([b, a, a2], lr=0.01, pairs=[(b, a), (b, a2)])
    wide = torch.nn.Parameter(torch.randn(6, 7))
    with pytest.raises(ValueError, match="rank r = 7"):
        IMuon(
            [wide, torch.nn.Parameter(torch.randn(7, 9))],
            lr=0.01,
            pairs=[(wide, torch.nn.Parameter(torch.randn(7, 9)))],
        )


def test_unsupported_manifold_names_supported_ones_and_the_interface():
    ball = geoopt.PoincareBall()
    p = geoopt.ManifoldParameter(ball.random(4, 3) * 0.1, manifold=ball)
    with pytest.raises(TypeError) as info:
        IMuon([p], lr=0.01)
    msg = str(info.value)
    for name in (
        "PoincareBall",
        "EuclideanStiefel",
        "CanonicalStiefel",
        "SymmetricPositiveDefinite",
        "Sphere",
        "MetricOperator",
        "register_manifold",
    ):
        assert name in msg


def test_sphere_restricted_to_a_subspace_is_refused():
    sphere = geoopt.Sphere(intersection=torch.randn(5, 3))
    p = geoopt.ManifoldParameter(sphere.random(2, 5), manifold=sphere)
    with pytest.raises(TypeError, match="subspace"):
        IMuon([p], lr=0.01)


def test_register_manifold_plugs_in_a_metric_operator():
    ball = geoopt.PoincareBall()
    saved = dict(_dispatch._RULES)
    try:
        register_manifold(geoopt.PoincareBall, geo.Euclidean())
        x0 = ball.random(4, 3) * 0.1  # float32: the ball's curvature buffer is float32
        p = geoopt.ManifoldParameter(x0.clone(), manifold=ball)
        g = torch.randn_like(x0)
        p.grad = g.clone()
        IMuon([p], lr=LR, momentum=0.0, polar="svd").step()
        xi = intrinsic_direction(geo.Euclidean(), x0, g, polar="svd").xi
        torch.testing.assert_close(p.detach(), ball.retr(x0, -LR * xi), atol=1e-6, rtol=1e-6)
    finally:
        _dispatch._RULES.clear()
        _dispatch._RULES.update(saved)
    with pytest.raises(TypeError, match="geoopt.Manifold subclass"):
        register_manifold(int, geo.Euclidean())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    man = geoopt.EuclideanStiefel()
    x0 = _stiefel(None, 2, 9, 3).float()
    cpu_params = [
        torch.nn.Parameter(torch.randn(6, 4)),
        torch.nn.Parameter(torch.randn(4)),
        geoopt.ManifoldParameter(x0, manifold=man),
        torch.nn.Parameter(torch.randn(6, 2)),
        torch.nn.Parameter(torch.randn(2, 5)),
    ]
    cuda_params = [
        type(p)(p.detach().cuda(), **({"manifold": man} if hasattr(p, "manifold") else {})) for p in cpu_params
    ]
    grads = [[torch.randn_like(p) for p in cpu_params] for _ in range(3)]
    for params in (cpu_params, cuda_params):
        opt = IMuon(params, lr=0.02, polar="svd", pairs=[(params[3], params[4])])
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.to(p.device)
            opt.step()
    for p, q in zip(cpu_params, cuda_params):
        assert q.device.type == "cuda"
        torch.testing.assert_close(q.detach().cpu(), p.detach(), atol=1e-4, rtol=1e-4)
