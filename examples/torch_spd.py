"""Maximum-likelihood Gaussian covariance from minibatches on the SPD manifold: iMuon against geoopt's optimizers.

Model: a covariance ``S`` (a geoopt ``ManifoldParameter`` on ``SymmetricPositiveDefinite``, affine-invariant
metric) of a zero-mean Gaussian. The negative log-likelihood of a minibatch ``x_1 .. x_b`` is, up to constants,

    ``f(S) = logdet(S) + tr(S^{-1} C_batch)``,  ``C_batch = (1/b) sum x_i x_i^T``.

Its minimizer over the whole data set is the sample covariance ``C`` (closed form), where the full-data loss is
``logdet(C) + n``. Data: ``N`` samples of ``N(0, Sigma)`` with an ill-conditioned ``Sigma`` (eigenvalues from
0.01 to 10, random eigenvectors); start ``S = I``.

Optimizers, on the same minibatches with a cosine learning-rate decay: iMuon (:class:`imuon_manopt.optim.IMuon`:
the matrix-sign step ``S^{1/2} sign(H) S^{1/2}`` of the affine-invariant metric), geoopt ``RiemannianSGD``
(momentum 0.9) and ``RiemannianAdam``.

iMuon's spectral step is a trust region in the affine-invariant metric: one step changes ``log(S)`` by at most ``lr`` in
every eigendirection (``S^{1/2} exp(-lr sign(H)) S^{1/2}`` to first order), so going from ``I`` to eigenvalues near
0.01 takes a total ``sum_k lr_k`` of at least ``log(100) ~ 4.6``: fewer steps need a larger learning rate.

Table: training time, the excess full-data loss over the closed form, the affine-invariant distance
``||log(C^{-1/2} S C^{-1/2})||_F`` to the sample covariance, and the smallest eigenvalue of ``S`` (positivity).

Run: ``python examples/torch_spd.py`` (``--quick`` for a small version, ``--help`` for the options).
"""

from __future__ import annotations

import os
import sys

import geoopt
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _torch_common as tc  # noqa: E402

from imuon_manopt.optim import IMuon  # noqa: E402

DTYPE = torch.float64
#: Learning rates (peak of the cosine schedule), each the best of a sweep over (0.003, 0.01, 0.03, 0.1, 0.3, 1)
#: at the default size (RiemannianSGD leaves the manifold numerically at 0.3).
LRS = {"iMuon": 0.03, "RiemannianSGD": 0.01, "RiemannianAdam": 0.3}


def nll(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``logdet(S) + mean_i x_i^T S^{-1} x_i`` through a Cholesky factor of ``S``."""
    chol = torch.linalg.cholesky(s)
    z = torch.linalg.solve_triangular(chol, x.mT, upper=False)
    return 2.0 * torch.log(torch.diagonal(chol)).sum() + (z * z).sum() / x.shape[0]


def airm_distance(s: torch.Tensor, c: torch.Tensor) -> float:
    """The affine-invariant distance ``||log(C^{-1/2} S C^{-1/2})||_F``."""
    w, v = torch.linalg.eigh(c)
    c_inv_half = (v / w.sqrt()) @ v.mT
    lam = torch.linalg.eigvalsh(c_inv_half @ s.detach() @ c_inv_half)
    return float(torch.linalg.vector_norm(torch.log(lam)))


def main(argv=None) -> dict:
    args = tc.setup(__doc__.splitlines()[0], argv)
    n, samples, batch, steps = (8, 2048, 64, 250) if args.quick else (32, 8192, 64, 400)
    steps = args.steps or steps
    g = tc.generator(args.seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))[0]
    sigma = (q * torch.logspace(-2, 1, n, dtype=DTYPE)) @ q.T
    x = torch.randn(samples, n, generator=g, dtype=DTYPE) @ torch.linalg.cholesky(sigma).T
    cov = x.T @ x / samples
    best = float(torch.linalg.slogdet(cov)[1]) + n
    batches = tc.minibatches(samples, batch, steps, args.seed)
    spd = geoopt.SymmetricPositiveDefinite()

    setups = {
        "iMuon": lambda s, lr: IMuon([s], lr=lr),
        "RiemannianSGD": lambda s, lr: geoopt.optim.RiemannianSGD([s], lr=lr, momentum=0.9),
        "RiemannianAdam": lambda s, lr: geoopt.optim.RiemannianAdam([s], lr=lr),
    }
    runs = []
    for name, make_opt in setups.items():
        s = geoopt.ManifoldParameter(torch.eye(n, dtype=DTYPE), manifold=spd)
        opt = make_opt(s, LRS[name])

        def loss_fn(step, s=s):
            return nll(s, x[batches[step]])

        def evaluate(s=s):
            return {
                "excess loss": float(nll(s, x)) - best,
                "distance": airm_distance(s, cov),
                "min eigenvalue": float(torch.linalg.eigvalsh(s.detach()).min()),
            }

        runs.append(tc.train(name, opt, loss_fn, steps, evaluate=evaluate, every=max(steps // 50, 1)))

    columns = [
        ("final loss - closed form", lambda r: r.final("excess loss")),
        ("AIRM dist. to sample cov.", lambda r: r.final("distance")),
        ("min eig(S)", lambda r: r.final("min eigenvalue")),
    ]
    panels = [
        tc.Panel("excess loss", "full-data loss - closed-form optimum"),
        tc.Panel("distance", "AIRM distance to the sample covariance"),
        tc.Panel("loss", "minibatch loss (moving average)", log=False, smooth=10),
    ]
    title = f"SPD covariance MLE: n={n}, N={samples}, batch {batch}, {steps} steps (closed form: {best:.4g})"
    table, path = tc.report(title, runs, columns, panels, args.output, "torch_spd.png")
    return {"runs": {r.name: r for r in runs}, "table": table, "plot": path, "closed_form_loss": best}


if __name__ == "__main__":
    main()
