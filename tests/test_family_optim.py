"""The Muon family in the torch optimizer: error feedback, input transforms, the spectral-norm constraint.

Each is checked against its rule written out here (float64 SVDs, QR whitening by hand), not the code's own output.
"""

from __future__ import annotations

import math

import geoopt
import numpy as np
import pytest
import torch

from imuon_manopt.optim import IMuon, _pairs, _steps
from imuon_manopt.transforms import muoneq, relative_gap, resolve_input_transform, root_clip

DT = torch.float64


def topk(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k V_k^T, U_k) of h by a float64 SVD."""
    u, _, vh = torch.linalg.svd(h, full_matrices=False)
    return u[..., :k] @ vh[..., :k, :], u[..., :k]


def polar(h: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(h, full_matrices=False)
    return u @ vh


def _grads(shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=DT) for _ in range(steps)]


# ----------------------------------------------------------------------------------------------- error feedback


def test_error_feedback_on_plain_matrices_follows_dions_rule():
    """M <- M + G; Z = U_k V_k^T of M; M <- M - (1 - beta) U_k U_k^T M; X <- (1 - lr wd) X - lr Z (two shapes in
    one group, so the stacked path holds two runs)."""
    k, lr, beta, wd = 3, 0.05, 0.9, 0.1
    shapes = [(10, 7), (10, 7), (6, 9)]
    x0 = [torch.randn(s, dtype=DT, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    ps = [torch.nn.Parameter(x.clone()) for x in x0]
    opt = IMuon(
        [{"params": ps, "error_feedback": True}], lr=lr, momentum=beta, weight_decay=wd, norm=("kyfan", k), polar="svd"
    )
    grads = [_grads(s, 4, 10 + i) for i, s in enumerate(shapes)]
    xs, ms = [x.clone() for x in x0], [torch.zeros(s, dtype=DT) for s in shapes]
    for t in range(4):
        for p, gs in zip(ps, grads):
            p.grad = gs[t].clone()
        opt.step()
        for i in range(len(shapes)):
            ms[i] = ms[i] + grads[i][t]
            z, u = topk(ms[i], k)
            ms[i] = ms[i] - (1 - beta) * u @ (u.T @ ms[i])
            xs[i] = (1 - lr * wd) * xs[i] - lr * z
    for p, x, m in zip(ps, xs, ms):
        torch.testing.assert_close(p.detach(), x, atol=1e-10, rtol=0)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], m, atol=1e-10, rtol=0)


def test_error_feedback_with_the_randomized_solver_removes_the_used_part():
    """Whatever subspace the sketch finds, the buffer loses (1 - beta) of the momentum's projection on the step's
    column space Z Z^T M, and keeps the rest."""
    k, lr, beta = 4, 0.1, 0.8
    p = torch.nn.Parameter(torch.zeros(64, 48, dtype=DT))
    opt = IMuon([{"params": [p], "error_feedback": True}], lr=lr, momentum=beta, norm=("kyfan", k), polar="randomized")
    m = torch.zeros(64, 48, dtype=DT)
    for g in _grads((64, 48), 3, 20):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        m = m + g
        z = (before - p.detach()) / lr
        assert float(torch.linalg.matrix_norm(z, 2)) <= 1 + 1e-10
        assert int(torch.linalg.matrix_rank(z)) == k
        m = m - (1 - beta) * z @ (z.T @ m)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], m, atol=1e-10, rtol=0)


def test_error_feedback_on_pairs_in_whitened_coordinates():
    """Pairs: H_B = M_B R_A^{-1}, H_A = R_B^{-T} M_A (QR whitening); Z = U_k V_k^T per block; xi_B = Z_B R_A^{-T},
    xi_A = R_B^{-1} Z_A; the buffers lose (1 - beta) of Z_B Z_B^T M_B and of M_A Z_A^T Z_A."""
    k, lr, beta, r = 2, 0.01, 0.9, 4
    g = torch.Generator().manual_seed(30)
    b0, a0 = torch.randn(12, r, generator=g, dtype=DT), torch.randn(r, 9, generator=g, dtype=DT)
    b, a = torch.nn.Parameter(b0.clone()), torch.nn.Parameter(a0.clone())
    opt = IMuon(
        [{"params": [b, a], "error_feedback": True}], lr=lr, momentum=beta, norm=("kyfan", k), polar="svd",
        pairs=[(b, a)],
    )  # fmt: skip
    xb, xa = b0.clone(), a0.clone()
    mb, ma = torch.zeros_like(b0), torch.zeros_like(a0)
    for gb, ga in zip(_grads((12, r), 3, 31), _grads((r, 9), 3, 32)):
        b.grad, a.grad = gb.clone(), ga.clone()
        opt.step()
        mb, ma = mb + gb, ma + ga
        rb = torch.linalg.qr(xb).R
        ra = torch.linalg.qr(xa.T).R
        zb = topk(torch.linalg.solve(ra.T, mb.T).T, k)[0]  # M_B R_A^{-1}
        za = topk(torch.linalg.solve(rb.T, ma), k)[0]  # R_B^{-T} M_A
        xi_b = torch.linalg.solve(ra, zb.T).T  # Z_B R_A^{-T}
        xi_a = torch.linalg.solve(rb, za)  # R_B^{-1} Z_A
        mb = mb - (1 - beta) * zb @ (zb.T @ mb)
        ma = ma - (1 - beta) * (ma @ za.T) @ za
        xb, xa = xb - lr * xi_b, xa - lr * xi_a
    torch.testing.assert_close(b.detach(), xb, atol=1e-10, rtol=0)
    torch.testing.assert_close(a.detach(), xa, atol=1e-10, rtol=0)
    torch.testing.assert_close(opt.state[b]["momentum_buffer"], mb, atol=1e-10, rtol=0)
    torch.testing.assert_close(opt.state[a]["momentum_buffer"], ma, atol=1e-10, rtol=0)


def test_error_feedback_per_item_functions_follow_the_rule_too():
    """The per-parameter functions (the sharded path) apply the same rule as the stacked step."""
    k, lr, beta = 2, 0.05, 0.9
    w = torch.nn.Parameter(torch.zeros(7, 5, dtype=DT))
    opts = dict(lr=lr, momentum=beta, norm=("kyfan", k), polar="svd")
    group = IMuon([{"params": [w], "error_feedback": True}], **opts).param_groups[0]
    xs, ms = _grads((7, 5), 2, 40), _grads((7, 5), 2, 41)
    per = _steps.matrix_fn(group, (7, 5), DT, DT)([(x, m) for x, m in zip(xs, ms)])
    for (x_new, m_new), x, m in zip(per, xs, ms):
        z, u = topk(m, k)
        torch.testing.assert_close(x_new, x - lr * z, atol=1e-12, rtol=0)
        torch.testing.assert_close(m_new, m - (1 - beta) * u @ (u.T @ m), atol=1e-12, rtol=0)
    b, a = torch.nn.Parameter(torch.randn(6, 3, dtype=DT)), torch.nn.Parameter(torch.randn(3, 5, dtype=DT))
    group = IMuon([{"params": [b, a], "error_feedback": True}], pairs=[(b, a)], **opts).param_groups[0]
    mb, ma = torch.randn(6, 3, dtype=DT), torch.randn(3, 5, dtype=DT)
    (out,) = _pairs.pair_fn(group, (6, 5), DT, DT, True)([(b.detach(), a.detach(), mb, ma)])
    rb, ra = torch.linalg.qr(b.detach()).R, torch.linalg.qr(a.detach().T).R
    zb = topk(torch.linalg.solve(ra.T, mb.T).T, k)[0]
    za = topk(torch.linalg.solve(rb.T, ma), k)[0]
    torch.testing.assert_close(out[0], b.detach() - lr * torch.linalg.solve(ra, zb.T).T, atol=1e-10, rtol=0)
    torch.testing.assert_close(out[1], a.detach() - lr * torch.linalg.solve(rb, za), atol=1e-10, rtol=0)
    torch.testing.assert_close(out[2], mb - (1 - beta) * zb @ (zb.T @ mb), atol=1e-10, rtol=0)
    torch.testing.assert_close(out[3], ma - (1 - beta) * (ma @ za.T) @ za, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(norm="spectral", error_feedback=True), "error_feedback=True needs a low-rank LMO"),
        (dict(norm=("kyfan", 2), error_feedback=True, momentum=0.0), "needs momentum > 0"),
        (dict(norm=("kyfan", 2), error_feedback="yes"), "error_feedback must be a bool"),
        (
            dict(norm=("kyfan", 2), error_feedback=True, input_transform="muoneq_row"),
            "use one or the other",
        ),
    ],
)
def test_error_feedback_is_refused_where_it_is_not_defined(options, match):
    w = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=match):
        IMuon([{"params": [w], **options}], lr=0.1)


def test_randomized_solver_needs_a_ky_fan_norm():
    w = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="polar='randomized' solves the Ky Fan LMO.*norm=\\('kyfan', k\\)"):
        IMuon([w], lr=0.1, polar="randomized")
    IMuon([w], lr=0.1, norm=("kyfan", 2), polar={"method": "randomized", "oversample": 4})


def test_error_feedback_refused_on_manifolds_and_the_ambient_pair_mode():
    x = geoopt.ManifoldParameter(
        torch.linalg.qr(torch.randn(6, 2)).Q, manifold=geoopt.EuclideanStiefel()
    )  # fmt: skip
    with pytest.raises(ValueError, match="error_feedback=True.*plain matrices and pairs"):
        IMuon([{"params": [x], "error_feedback": True}], lr=0.1, norm=("kyfan", 2))
    b, a = torch.nn.Parameter(torch.randn(5, 2)), torch.nn.Parameter(torch.randn(2, 4))
    with pytest.raises(ValueError, match="pair_momentum='factor'"):
        IMuon(
            [{"params": [b, a], "pair_momentum": "ambient", "error_feedback": True}], lr=0.1, norm=("kyfan", 1),
            pairs=[(b, a)],
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------- input transforms


def _one_step(g: torch.Tensor, **options) -> torch.Tensor:
    """The step Z = (x0 - x1) / lr of one IMuon step without momentum from x0 = 0."""
    w = torch.nn.Parameter(torch.zeros_like(g))
    w.grad = g.clone()
    IMuon([{"params": [w], **options}], lr=1.0, momentum=0.0, polar="svd").step()
    return -w.detach()


def test_muoneq_transforms_are_the_papers_formulas():
    g = torch.randn(9, 6, dtype=DT, generator=torch.Generator().manual_seed(50)) * torch.logspace(-2, 1, 6, dtype=DT)
    r = (g * g).sum(1, keepdim=True)
    c = (g * g).sum(0, keepdim=True)
    want = {
        "muoneq_row": polar(g / torch.sqrt(r + 1e-8)),
        "muoneq_col": polar(g / torch.sqrt(c + 1e-8)),
        "muoneq_rowcol": polar(g / torch.sqrt(r + 1e-8) / torch.sqrt(c + 1e-8)),
    }
    for name, ref in want.items():
        torch.testing.assert_close(_one_step(g, input_transform=name), ref, atol=1e-10, rtol=0)
    # not the plain step, and (row) rows of the input normalized: the step differs from Muon's
    assert float((want["muoneq_row"] - polar(g)).abs().max()) > 1e-2
    torch.testing.assert_close(muoneq(g, "row").norm(dim=1), torch.ones(9, dtype=DT), atol=1e-6, rtol=0)


def test_root_clip_is_clipping_at_the_quantile():
    g = torch.randn(10, 8, dtype=DT, generator=torch.Generator().manual_seed(51))
    g[0, 0], g[3, 5] = 40.0, -25.0  # outliers
    flat = np.sort(np.abs(g.numpy()).ravel())
    level = flat[math.ceil(0.9 * flat.size) - 1] + 1e-9
    clipped = np.clip(g.numpy(), -level, level)
    assert np.mean(np.abs(g.numpy()) > level) == pytest.approx(0.1, abs=1 / flat.size)
    # ROOT writes it as M - soft_eps(M): the same
    soft = np.sign(g.numpy()) * np.maximum(np.abs(g.numpy()) - level, 0)
    np.testing.assert_allclose(clipped, g.numpy() - soft, atol=1e-15)
    np.testing.assert_allclose(root_clip(g, 0.9).numpy(), clipped, atol=1e-15)
    step = _one_step(g, input_transform=("root_clip", 0.9))
    torch.testing.assert_close(step, polar(torch.from_numpy(clipped)), atol=1e-10, rtol=0)


def test_mimuon_switch_orthogonalizes_only_when_the_gap_is_large():
    """Singular values 6, 5, 4, 3, 2, 1: the smallest relative gap is 1/6. Threshold below: the polar factor;
    above: the momentum scaled into the spectral ball, G / ||G||_2."""
    u = torch.linalg.qr(torch.randn(8, 6, dtype=DT, generator=torch.Generator().manual_seed(52))).Q
    v = torch.linalg.qr(torch.randn(6, 6, dtype=DT, generator=torch.Generator().manual_seed(53))).Q
    s = torch.arange(6, 0, -1, dtype=DT)
    g = (u * s) @ v.T
    assert float(relative_gap(g)) == pytest.approx(1 / 6, rel=1e-12)
    torch.testing.assert_close(_one_step(g, input_transform=("mimuon", 0.1)), u @ v.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(_one_step(g, input_transform=("mimuon", 0.2)), g / 6.0, atol=1e-12, rtol=0)
    # a repeated singular value: gap 0, never orthogonalized unless the threshold is 0
    g2 = (u * torch.tensor([3.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=DT)) @ v.T
    assert float(relative_gap(g2)) < 1e-12
    torch.testing.assert_close(_one_step(g2, input_transform=("mimuon", 1e-6)), g2 / 3.0, atol=1e-12, rtol=0)


@pytest.mark.parametrize("tau", [0.0, 1.0], ids=["orthogonalize", "momentum"])
def test_mimuon_on_pairs_per_whitened_block_and_gauge_invariant(tau):
    """Pairs: the switch acts on each whitened block (H_B = E_B R_A^{-1}, H_A = R_B^{-T} E_A): tau = 0 always the
    polar factor, tau = 1 always H / ||H||_2. Under the gauge (B M, M^{-1} A) the whitened blocks change by
    orthogonal factors, so the gaps, the branch and the product's step are the same."""
    g = torch.Generator().manual_seed(70)
    b0, a0 = torch.randn(9, 3, generator=g, dtype=DT), torch.randn(3, 7, generator=g, dtype=DT)
    gamma = torch.randn(9, 7, generator=g, dtype=DT)
    lr = 1e-3

    def step(b_init, a_init):
        b, a = torch.nn.Parameter(b_init.clone()), torch.nn.Parameter(a_init.clone())
        b.grad, a.grad = gamma @ a_init.T, b_init.T @ gamma
        IMuon(
            [{"params": [b, a], "input_transform": ("mimuon", tau)}], lr=lr, momentum=0.0, polar="svd",
            pairs=[(b, a)],
        ).step()  # fmt: skip
        return b.detach(), a.detach()

    b1, a1 = step(b0, a0)
    rb, ra = torch.linalg.qr(b0).R, torch.linalg.qr(a0.T).R
    hb = torch.linalg.solve(ra.T, (gamma @ a0.T).T).T
    ha = torch.linalg.solve(rb.T, b0.T @ gamma)
    if tau == 0.0:
        zb, za = polar(hb), polar(ha)
    else:
        zb, za = hb / torch.linalg.matrix_norm(hb, 2), ha / torch.linalg.matrix_norm(ha, 2)
    torch.testing.assert_close(b1, b0 - lr * torch.linalg.solve(ra, zb.T).T, atol=1e-12, rtol=0)
    torch.testing.assert_close(a1, a0 - lr * torch.linalg.solve(rb, za), atol=1e-12, rtol=0)
    m = torch.tensor([[2.0, 0.3, 0.0], [0.1, 0.5, 0.2], [0.0, -0.4, 1.5]], dtype=DT)
    b2, a2 = step(b0 @ m, torch.linalg.solve(m, a0))
    torch.testing.assert_close(b2 @ a2, b1 @ a1, atol=1e-12, rtol=0)


def test_input_transforms_are_refused_off_plain_matrices_and_validated():
    x = geoopt.ManifoldParameter(torch.linalg.qr(torch.randn(6, 2)).Q, manifold=geoopt.EuclideanStiefel())
    with pytest.raises(ValueError, match="input_transform='muoneq_row'.*plain matrices only"):
        IMuon([{"params": [x], "input_transform": "muoneq_row"}], lr=0.1)
    b, a = torch.nn.Parameter(torch.randn(5, 2)), torch.nn.Parameter(torch.randn(2, 4))
    with pytest.raises(ValueError, match="pairs\\[0\\].*gauge invariance"):
        IMuon([{"params": [b, a], "input_transform": ("root_clip", 0.9)}], lr=0.1, pairs=[(b, a)])
    with pytest.raises(ValueError, match="pairs\\[0\\].*gauge invariance"):
        IMuon([{"params": [b, a], "input_transform": "muoneq_row"}], lr=0.1, pairs=[(b, a)])
    with pytest.raises(ValueError, match="pair_momentum='factor'"):
        IMuon(
            [{"params": [b, a], "input_transform": ("mimuon", 0.1), "pair_momentum": "ambient"}], lr=0.1,
            pairs=[(b, a)],
        )  # fmt: skip
    with pytest.raises(ValueError, match="max-rule norm"):
        IMuon([{"params": [b, a], "input_transform": ("mimuon", 0.1)}], lr=0.1, norm="frobenius", pairs=[(b, a)])
    IMuon([{"params": [b, a], "input_transform": ("mimuon", 0.1)}], lr=0.1, pairs=[(b, a)])  # gauge-safe: fine
    w = torch.nn.Parameter(torch.randn(4, 3))
    for bad, match in [
        ("muoneq", "unknown input_transform"),
        (("root_clip", 90), "fraction in \\(0, 1\\)"),
        (("mimuon", -0.1), "threshold in \\[0, 1\\]"),
        (("clip", 0.9), "invalid input_transform"),
    ]:
        with pytest.raises(ValueError, match=match):
            IMuon([{"params": [w], "input_transform": bad}], lr=0.1)
    assert resolve_input_transform(["mimuon", 0]) == ("mimuon", 0.0)
    IMuon([{"params": [x]}, {"params": [w], "input_transform": "muoneq_col"}], lr=0.1)  # per group: fine


# ----------------------------------------------------------------------------------------------- the constraint

A_SCALE = {
    None: lambda m, n: 1.0,
    "original": lambda m, n: math.sqrt(max(1.0, m / n)),
    "match_rms_adamw": lambda m, n: 0.2 * math.sqrt(max(m, n)),
}


def _target(m, n, seed=60):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=DT)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT)).Q
    t = torch.tensor([3.0, 2.5, 2.0, 1.5, 0.6, 0.4, 0.3, 0.2, 0.1], dtype=DT)[:n]
    return u, t, v


def _train(params, loss_fn, steps, **options):
    opt = IMuon(params, lr=0.02, momentum=0.9, polar="svd", **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s / 100.0))
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("adjust", [None, "original", "match_rms_adamw"])
def test_weight_decay_solves_the_spectral_norm_constrained_problem(adjust):
    """min ||X - T||_F^2 s.t. ||X||_2 <= a / wd has the solution 'clip T's singular values at a / wd'; for a pair
    (rank <= r) the top r of them, clipped. IMuon with decoupled decay wd (and a decaying lr) reaches it."""
    m, n, r, wd = 12, 9, 3, 1.0
    u, t, v = _target(m, n)
    target = (u * t) @ v.T
    radius = A_SCALE[adjust](m, n) / wd
    x = torch.nn.Parameter(torch.zeros(m, n, dtype=DT))
    _train([x], lambda: ((x - target) ** 2).sum(), 2000, weight_decay=wd, adjust_lr_fn=adjust)
    want = (u * t.clamp(max=radius)) @ v.T
    assert float((x.detach() - want).norm()) < 1e-2
    assert float(torch.linalg.matrix_norm(x.detach(), 2)) <= radius * (1 + 1e-3)

    g = torch.Generator().manual_seed(61)
    b = torch.nn.Parameter(0.1 * torch.randn(m, r, generator=g, dtype=DT))
    a = torch.nn.Parameter(0.1 * torch.randn(r, n, generator=g, dtype=DT))
    _train([b, a], lambda: ((b @ a - target) ** 2).sum(), 2000, weight_decay=wd, adjust_lr_fn=adjust, pairs=[(b, a)])
    want_r = (u[:, :r] * t[:r].clamp(max=radius)) @ v[:, :r].T
    prod = (b @ a).detach()
    assert float((prod - want_r).norm()) < 2e-2
    assert float(torch.linalg.matrix_norm(prod, 2)) <= radius * (1 + 1e-3)
