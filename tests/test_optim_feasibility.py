"""Long float32 runs stay feasible: Stiefel frames orthonormal, SPD positive definite, pairs full
rank.

The canonical Stiefel parameter takes every one of the 10k steps: its Cayley retraction is
    orthogonal only in
exact arithmetic, so rounding accumulates there (the optimizer polishes it). The embedded Stiefel
(QR retraction), SPD (``X + u + u X^{-1} u / 2 = (X + (X + u) X^{-1} (X + u)) / 2``, positive by
construction) and pair (rank-guarded by backtracking) parameters are feasible step by step, so to
keep the test fast they get a gradient every ``SPARSE``-th step (1k steps each);
``IMUON_LONG_TESTS=1`` gives them all 10k steps too.
"""

from __future__ import annotations

import os

import geoopt
import pytest
import torch

from imuon_manopt.optim import IMuon

STEPS = 10_000
SPARSE = 1 if os.environ.get("IMUON_LONG_TESTS") else 10


@pytest.mark.slow
def test_ten_thousand_float32_steps_stay_feasible():
    torch.manual_seed(8)
    emb, can, spd = (
        geoopt.EuclideanStiefel(),
        geoopt.CanonicalStiefel(),
        geoopt.SymmetricPositiveDefinite(),
    )
    y = geoopt.ManifoldParameter(can.random(2, 8, 3), manifold=can)
    x = geoopt.ManifoldParameter(emb.random(2, 8, 3), manifold=emb)
    s = geoopt.ManifoldParameter(spd.random(2, 4, 4), manifold=spd)
    b, a = torch.nn.Parameter(torch.randn(8, 2)), torch.nn.Parameter(torch.randn(2, 6))
    opt = IMuon([y, x, s, b, a], lr=0.01, pairs=[(b, a)], polar="svd")  # Nesterov 0.95
    frame_target = torch.randn(2, 8, 3)
    spd_target = torch.diag(torch.tensor([1e-2, 0.1, 1.0, 10.0]))  # pulls towards an ill-conditioned SPD
    pair_target = torch.randn(8, 2) @ torch.randn(2, 6)
    noise = torch.randn(64, 2, 8, 3)
    pair_noise = 0.1 * torch.randn(64, 8, 6)
    for i in range(STEPS):
        z = noise[i % 64]
        y.grad = y.detach() - frame_target - z
        if i % SPARSE == 0:
            x.grad = x.detach() - frame_target + z
            s.grad = s.detach() - spd_target + z[:, :4, :3].sum(-1).diag_embed()
            gamma = b.detach() @ a.detach() - pair_target + pair_noise[i % 64]
            b.grad, a.grad = gamma @ a.detach().T, b.detach().T @ gamma
        else:
            x.grad = s.grad = b.grad = a.grad = None
        opt.step()
    assert opt.state[y]["step"] == STEPS and opt.state[s]["step"] == STEPS // SPARSE
    eye = torch.eye(3)
    assert torch.linalg.matrix_norm(x.detach().mT @ x.detach() - eye).max() < 1e-5
    assert torch.linalg.matrix_norm(y.detach().mT @ y.detach() - eye).max() < 1e-5
    assert torch.allclose(s.detach(), s.detach().mT)
    assert torch.linalg.eigvalsh(s.detach().double()).min() > 0
    for f in (b.detach(), a.detach().T):
        sv = torch.linalg.svdvals(f.double())
        assert sv[-1] > 1e-3 * sv[0]
    assert all(torch.isfinite(p).all() for p in (x, y, s, b, a))
