"""Streaming PCA on the Grassmann manifold: iMuon against geoopt's optimizers.

Model: a ``p``-dimensional subspace of ``R^n``, held as an orthonormal basis ``Y`` (``n x p``), a geoopt
``ManifoldParameter`` on :class:`imuon_manopt.manifolds.Grassmann`. Each step sees a fresh minibatch
``x_1 .. x_b`` of ``N(0, Sigma)`` and the loss

    ``f(Y) = -tr(Y^T C_batch Y)``,  ``C_batch = (1/b) sum x_i x_i^T``,

whose expectation is minimized by the top-``p`` eigenspace of ``Sigma``. ``Sigma`` has ``p`` leading eigenvalues
evenly in ``[1, 2]``, then an eigengap, then ``n - p`` eigenvalues evenly in ``[0.1, 0.5]`` (random eigenvectors).

Optimizers, from the same random start on the same stream, with a cosine learning-rate decay: iMuon
(:class:`imuon_manopt.optim.IMuon`, ``xi = polar((I - Y Y^T) E)``), geoopt ``RiemannianSGD`` (momentum 0.9, an
Oja-type method) and ``RiemannianAdam``.

Error: ``sin`` of the largest principal angle between ``span(Y)`` and the true top-``p`` subspace. The table also
lists the captured variance ``tr(Y^T Sigma Y) / (lambda_1 + .. + lambda_p)`` and the feasibility ``||Y^T Y - I||_F``.

Run: ``python examples/torch_grassmann.py`` (``--quick`` for a small version, ``--help`` for the options).
"""

from __future__ import annotations

import os
import sys

import geoopt
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _torch_common as tc  # noqa: E402

from imuon_manopt.manifolds import Grassmann  # noqa: E402
from imuon_manopt.optim import IMuon  # noqa: E402

DTYPE = torch.float64
#: Learning rates (peak of the cosine schedule), each the best of a sweep over (0.003, 0.01, 0.03, 0.1, 0.3, 1)
#: at the default size.
LRS = {"iMuon": 0.03, "RiemannianSGD": 0.003, "RiemannianAdam": 0.3}


def main(argv=None) -> dict:
    args = tc.setup(__doc__.splitlines()[0], argv)
    n, p, batch, steps = (48, 4, 32, 100) if args.quick else (256, 10, 32, 400)
    steps = args.steps or steps
    g = tc.generator(args.seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))[0]
    lam = torch.cat([torch.linspace(2.0, 1.0, p, dtype=DTYPE), torch.linspace(0.5, 0.1, n - p, dtype=DTYPE)])
    sigma = (q * lam) @ q.T
    top = q[:, :p]
    best = float(lam[:p].sum())
    # the stream: a fresh minibatch per step, drawn once so that every optimizer sees the same samples
    stream = (torch.randn(steps, batch, n, generator=g, dtype=DTYPE) * lam.sqrt()) @ q.T
    y0 = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=DTYPE))[0]
    grassmann = Grassmann()

    setups = {
        "iMuon": lambda y, lr: IMuon([y], lr=lr),
        "RiemannianSGD": lambda y, lr: geoopt.optim.RiemannianSGD([y], lr=lr, momentum=0.9),
        "RiemannianAdam": lambda y, lr: geoopt.optim.RiemannianAdam([y], lr=lr),
    }
    runs = []
    for name, make_opt in setups.items():
        y = geoopt.ManifoldParameter(y0.clone(), manifold=grassmann)
        opt = make_opt(y, LRS[name])

        def loss_fn(step, y=y):
            z = stream[step] @ y
            return -(z * z).sum() / batch

        def evaluate(y=y):
            return {
                "subspace distance": tc.subspace_distance(y, top),
                "captured variance": float((y * (sigma @ y)).sum()) / best,
                "feasibility": tc.stiefel_feasibility(y),
            }

        runs.append(tc.train(name, opt, loss_fn, steps, evaluate=evaluate, every=max(steps // 50, 1)))

    columns = [
        ("sin angle to top-p", lambda r: r.final("subspace distance")),
        ("captured variance", lambda r: r.final("captured variance")),
        ("\\|Y^T Y - I\\|_F", lambda r: r.final("feasibility")),
    ]
    panels = [tc.Panel("subspace distance", "sin of the largest principal angle to the top-p subspace"),
              tc.Panel("loss", "minibatch loss (moving average)", log=False, smooth=10)]
    title = f"Streaming PCA on Gr({n}, {p}): batch {batch}, {steps} steps"
    table, path = tc.report(title, runs, columns, panels, args.output, "torch_grassmann.png")
    return {"runs": {r.name: r for r in runs}, "table": table, "plot": path}


if __name__ == "__main__":
    main()
