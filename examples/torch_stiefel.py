"""A classifier with an orthonormal projection layer (Stiefel weight): iMuon against geoopt's optimizers and AdamW.

Model: ``logits = head(x @ W)`` with ``W`` an ``n x p`` matrix with orthonormal columns (a geoopt
``ManifoldParameter`` on the Stiefel manifold) and ``head`` an ordinary ``nn.Linear(p, k)``.

Data (synthetic, seeded): ``k`` Gaussian classes whose means lie in a hidden ``p``-dimensional subspace
``span(U)`` of ``R^n``, isotropic unit noise, plus strong nuisance noise (standard deviation 4) along directions
orthogonal to ``U``. A good ``W`` spans (nearly) ``U`` and ignores the nuisance directions.

Optimizers, from the same initial weights, on the same minibatches, with a cosine learning-rate decay:

- ``iMuon`` (:class:`imuon_manopt.optim.IMuon`) on ``W`` in ``geoopt.EuclideanStiefel`` (embedded metric) and in
  ``geoopt.CanonicalStiefel`` (what ``geoopt.Stiefel()`` returns); the head's weight gets Muon, its bias AdamW;
- geoopt ``RiemannianSGD`` (Nesterov momentum 0.9) and ``RiemannianAdam`` on every parameter;
- ``torch.optim.AdamW`` on an unconstrained copy (``W`` a plain matrix: it fits, but leaves the manifold).

Table: training time, final training loss (on 2048 training samples), test accuracy, feasibility
``||W^T W - I||_F`` and the principal-angle distance between ``span(W)`` and ``span(U)``.

Run: ``python examples/torch_stiefel.py`` (``--quick`` for a small version, ``--help`` for the options).
"""

from __future__ import annotations

import os
import sys

import geoopt
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _torch_common as tc  # noqa: E402

from imuon_manopt.optim import IMuon  # noqa: E402

DTYPE = torch.float64
#: Learning rates (peak of the cosine schedule), each the best of a small sweep over (0.003, 0.01, 0.03, 0.1, 0.3)
#: at the default size.
LRS = {"iMuon (embedded)": 0.03, "iMuon (canonical)": 0.03, "RiemannianSGD": 0.1, "RiemannianAdam": 0.3,
       "AdamW (unconstrained)": 0.03}


def make_data(n: int, p: int, k: int, samples: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Gaussian classes in a hidden subspace plus nuisance noise; returns train/test tensors and ``U``."""
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))[0]
    u, nuisance = basis[:, :p], basis[:, p : p + min(16, n - p)]
    means = 1.5 * torch.randn(k, p, generator=g, dtype=DTYPE) @ u.T

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(k, (count,), generator=g)
        noise = torch.randn(count, n, generator=g, dtype=DTYPE)
        noise += 4.0 * torch.randn(count, nuisance.shape[1], generator=g, dtype=DTYPE) @ nuisance.T
        return means[y] + noise, y

    x, y = draw(samples)
    x_test, y_test = draw(min(samples // 4, 1024))
    return dict(x=x, y=y, x_test=x_test, y_test=y_test, u=u)


class OrthoClassifier(nn.Module):
    """``head(x @ W)`` with ``W`` on ``manifold`` (``None``: a plain, unconstrained matrix)."""

    def __init__(self, w0: torch.Tensor, head: nn.Linear, manifold: geoopt.Manifold | None) -> None:
        super().__init__()
        w = w0.clone()
        self.W = geoopt.ManifoldParameter(w, manifold=manifold) if manifold is not None else nn.Parameter(w)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x @ self.W)


def main(argv=None) -> dict:
    args = tc.setup(__doc__.splitlines()[0], argv)
    n, p, k, samples, batch, steps = (64, 4, 8, 2048, 128, 80) if args.quick else (256, 8, 12, 8192, 128, 400)
    steps = args.steps or steps
    g = tc.generator(args.seed)
    data = make_data(n, p, k, samples, g)
    w0 = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=DTYPE))[0]
    head0 = nn.Linear(p, k, dtype=DTYPE)
    batches = tc.minibatches(samples, batch, steps, args.seed)
    loss_of = nn.CrossEntropyLoss()

    def model_on(manifold):
        head = nn.Linear(p, k, dtype=DTYPE)
        head.load_state_dict(head0.state_dict())
        return OrthoClassifier(w0, head, manifold)

    setups = {
        "iMuon (embedded)": (geoopt.EuclideanStiefel(), lambda m, lr: IMuon(m.parameters(), lr=lr, fallback_lr=0.01)),
        "iMuon (canonical)": (geoopt.CanonicalStiefel(), lambda m, lr: IMuon(m.parameters(), lr=lr, fallback_lr=0.01)),
        "RiemannianSGD": (geoopt.EuclideanStiefel(),
                          lambda m, lr: geoopt.optim.RiemannianSGD(m.parameters(), lr=lr, momentum=0.9,
                                                                   nesterov=True)),
        "RiemannianAdam": (geoopt.EuclideanStiefel(), lambda m, lr: geoopt.optim.RiemannianAdam(m.parameters(), lr=lr)),
        "AdamW (unconstrained)": (None, lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)),
    }
    runs = []
    for name, (manifold, make_opt) in setups.items():
        model = model_on(manifold)
        opt = make_opt(model, LRS[name])

        def loss_fn(step, model=model):
            idx = batches[step]
            return loss_of(model(data["x"][idx]), data["y"][idx])

        def evaluate(model=model):
            return {
                "train loss": float(loss_of(model(data["x"][:2048]), data["y"][:2048])),
                "test accuracy": float((model(data["x_test"]).argmax(1) == data["y_test"]).to(DTYPE).mean()),
                "feasibility": tc.stiefel_feasibility(model.W),
                "subspace distance": tc.subspace_distance(model.W, data["u"]),
            }

        runs.append(tc.train(name, opt, loss_fn, steps, evaluate=evaluate, every=max(steps // 25, 1)))

    columns = [
        ("final train loss (2048 samples)", lambda r: r.final("train loss")),
        ("test accuracy", lambda r: r.final("test accuracy")),
        ("\\|W^T W - I\\|_F", lambda r: r.final("feasibility")),
        ("sin angle to span(U)", lambda r: r.final("subspace distance")),
    ]
    panels = [tc.Panel("train loss", "training cross-entropy (2048 samples)"),
              tc.Panel("subspace distance", "sin angle(W, U)"), tc.Panel("feasibility", "||W^T W - I||_F")]
    title = f"Stiefel classifier: n={n}, p={p}, k={k}, batch {batch}, {steps} steps"
    table, path = tc.report(title, runs, columns, panels, args.output, "torch_stiefel.png")
    return {"runs": {r.name: r for r in runs}, "table": table, "plot": path}


if __name__ == "__main__":
    main()
