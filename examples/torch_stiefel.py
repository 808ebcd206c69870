"""A digits classifier with an orthonormal feature map (Stiefel weight): iMuon against geoopt's optimizers and AdamW.

Data: scikit-learn's bundled handwritten digits (``load_digits``: 1797 images of 8 x 8 pixels, 10 classes; no
download). One fixed stratified split: 25% test (450 images); the other 75% split again into a fit part (1077) and a
validation part (270) for tuning. Features are standardized with the fit part's mean and standard deviation (the
deviation floored at one intensity level, so that the nearly constant border pixels are not blown up).

Model: ``logits = head(x @ W)`` with ``W`` a ``64 x k`` matrix with orthonormal columns (``k = 16``; a geoopt
``ManifoldParameter`` on the Stiefel manifold) and ``head`` an ordinary ``nn.Linear(k, 10)``.

Optimizers, from the same initial weights and on the same minibatches (per seed), with a cosine learning-rate decay:

- ``iMuon`` (:class:`imuon_manopt.optim.IMuon`) on ``W`` in ``geoopt.EuclideanStiefel`` (embedded metric) and in
  ``geoopt.CanonicalStiefel`` (what ``geoopt.Stiefel()`` returns); the head's weight gets Muon, its bias AdamW
  (learning rate 0.01 at the peak);
- geoopt ``RiemannianSGD`` (Nesterov momentum 0.9) and ``RiemannianAdam`` on every parameter (``W`` on the
  embedded Stiefel manifold);
- ``torch.optim.AdamW`` (no weight decay) on an unconstrained ``W`` (same start) with the penalty
  ``lambda ||W^T W - I||_F^2`` added to the cross-entropy (``lambda = 1`` by default, ``--penalty``).

Protocol: every run trains on the fit part; a seed fixes the initial weights and the minibatch order. Each optimizer's
peak learning rate is tuned on a half-decade grid (..., 0.01, 0.03, 0.1, ...) by the final validation cross-entropy,
averaged over 3 seeds; the grid grows until its best point is inside it. The 3 runs at the best rate give the test
numbers (the test part plays no role in the choice). Table: test accuracy and test cross-entropy (mean ± std
over the seeds), the fit-part cross-entropy, the largest orthonormality error ``||W^T W - I||_F`` over the seeds and
the optimizer time per run. The validation scores of the sweep are listed too.

Outputs (``--output``, default ``examples/output/``): ``torch_stiefel.md`` (both tables), ``torch_stiefel.png``
(curves of seed 0 at the best rates) and ``torch_stiefel_lr.png`` (the sweeps).

Run: ``python examples/torch_stiefel.py`` (``--quick`` for a small version, ``--help`` for the options).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

import geoopt
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _torch_common as tc  # noqa: E402

from imuon_manopt.optim import IMuon  # noqa: E402

DTYPE = torch.float64
#: Centers of the learning-rate grids (the grid spans two half-decades either side and grows while its best point is
#: at an end). They are the best rates of the full run, so that a default run needs no extension.
CENTERS = {
    "iMuon (embedded)": 0.1,
    "iMuon (canonical)": 0.1,
    "RiemannianSGD": 0.1,
    "RiemannianAdam": 0.1,
    "AdamW (penalty)": 0.03,
}
NAMES = tuple(CENTERS)


def load_split(dtype: torch.dtype = DTYPE) -> dict[str, torch.Tensor]:
    """The fixed stratified fit / validation / test split of the digits, standardized with the fit part's statistics.

    Returns ``x_fit`` (1077, 64), ``y_fit``, ``x_val`` (270, 64), ``y_val``, ``x_test`` (450, 64), ``y_test``.
    """
    from sklearn.model_selection import train_test_split

    x, y = tc.digits(dtype)
    index = torch.arange(len(y)).numpy()
    train, test = train_test_split(index, test_size=0.25, stratify=y.numpy(), random_state=0)
    fit, val = train_test_split(train, test_size=0.2, stratify=y.numpy()[train], random_state=0)
    fit, val, test = (torch.as_tensor(i) for i in (fit, val, test))
    mean, std = x[fit].mean(0), x[fit].std(0).clamp(min=1.0)
    z = (x - mean) / std
    return dict(x_fit=z[fit], y_fit=y[fit], x_val=z[val], y_val=y[val], x_test=z[test], y_test=y[test])


class OrthoClassifier(nn.Module):
    """``head(x @ W)`` with ``W`` on ``manifold`` (``None``: a plain, unconstrained matrix)."""

    def __init__(self, w0: torch.Tensor, head: nn.Linear, manifold: geoopt.Manifold | None) -> None:
        super().__init__()
        w = w0.clone()
        self.W = geoopt.ManifoldParameter(w, manifold=manifold) if manifold is not None else nn.Parameter(w)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x @ self.W)


def orthonormality_penalty(w: torch.Tensor) -> torch.Tensor:
    """``||W^T W - I||_F^2``."""
    eye = torch.eye(w.shape[-1], dtype=w.dtype)
    return ((w.mT @ w - eye) ** 2).sum()


def imuon(model: OrthoClassifier, lr: float, bias_lr: float = 0.01) -> IMuon:
    """iMuon on ``W`` and the head's weight (peak rate ``lr``); the head's bias (1-D) goes to iMuon's AdamW fallback
    in a group of its own with peak rate ``bias_lr`` (the schedule scales both groups alike)."""
    return IMuon([{"params": [model.W, model.head.weight]}, {"params": [model.head.bias], "lr": bias_lr}], lr=lr)


#: name -> (manifold of W or None, optimizer factory(model, lr))
SETUPS: dict[str, tuple[Callable[[], geoopt.Manifold | None], Callable[[nn.Module, float], torch.optim.Optimizer]]]
SETUPS = {
    "iMuon (embedded)": (geoopt.EuclideanStiefel, lambda m, lr: imuon(m, lr)),
    "iMuon (canonical)": (geoopt.CanonicalStiefel, lambda m, lr: imuon(m, lr)),
    "RiemannianSGD": (
        geoopt.EuclideanStiefel,
        lambda m, lr: geoopt.optim.RiemannianSGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True),
    ),
    "RiemannianAdam": (geoopt.EuclideanStiefel, lambda m, lr: geoopt.optim.RiemannianAdam(m.parameters(), lr=lr)),
    "AdamW (penalty)": (lambda: None, lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)),
}


def train_one(
    name: str,
    lr: float,
    seed: int,
    data: dict[str, torch.Tensor],
    *,
    k: int,
    batch: int,
    steps: int,
    penalty: float,
    every: int,
) -> tc.Run:
    """Train the classifier with optimizer ``name`` at peak rate ``lr`` from seed ``seed``'s start and batch order.

    Recorded every ``every`` steps: ``fit loss``, ``val loss``, ``test loss`` (cross-entropies), ``test accuracy``,
    ``feasibility`` (``||W^T W - I||_F``). A run that fails on a non-finite value records ``inf`` losses.
    """
    manifold, make_opt = SETUPS[name]
    g = tc.generator(seed)
    n, classes = data["x_fit"].shape[1], int(data["y_fit"].max()) + 1
    w0 = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=DTYPE))[0]
    model = OrthoClassifier(w0, nn.Linear(k, classes, dtype=DTYPE), manifold())
    opt = make_opt(model, lr)
    per_epoch = len(data["y_fit"]) // batch
    batches = tc.epoch_batches(len(data["y_fit"]), batch, math.ceil(steps / per_epoch), seed)[:steps]
    ce = nn.CrossEntropyLoss()
    constrained = isinstance(model.W, geoopt.ManifoldParameter)

    def loss_fn(step: int) -> torch.Tensor:
        idx = batches[step]
        loss = ce(model(data["x_fit"][idx]), data["y_fit"][idx])
        return loss if constrained else loss + penalty * orthonormality_penalty(model.W)

    def evaluate() -> dict[str, float]:
        logits = model(data["x_test"])
        return {
            "fit loss": float(ce(model(data["x_fit"]), data["y_fit"])),
            "val loss": float(ce(model(data["x_val"]), data["y_val"])),
            "test loss": float(ce(logits, data["y_test"])),
            "test accuracy": float((logits.argmax(1) == data["y_test"]).to(DTYPE).mean()),
            "feasibility": tc.stiefel_feasibility(model.W),
        }

    try:
        run = tc.train(name, opt, loss_fn, steps, evaluate=evaluate, every=every)
    except FloatingPointError:  # iMuon refuses a non-finite gradient: a diverged run
        run = tc.Run(name, lr=lr)
        run.record(
            steps,
            {key: math.inf for key in ("fit loss", "val loss", "test loss", "feasibility")} | {"test accuracy": 0.0},
        )
    if not all(math.isfinite(run.final(key)) for key in ("val loss", "test loss")):
        for key in ("fit loss", "val loss", "test loss"):
            run.metrics[key][-1] = math.inf
    return run


def main(argv=None) -> dict:
    parser = tc.parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="seeds per learning rate (default 3; 2 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30; 3 with --quick)")
    parser.add_argument("--k", type=int, default=16, help="width of the orthonormal feature map W (64 x k)")
    parser.add_argument("--batch", type=int, default=64, help="minibatch size")
    parser.add_argument("--penalty", type=float, default=1.0, help="lambda of AdamW's ||W^T W - I||_F^2 penalty")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    started = time.perf_counter()

    data = load_split()
    per_epoch = len(data["y_fit"]) // args.batch
    epochs = args.epochs or (3 if args.quick else 30)
    steps = args.steps or epochs * per_epoch
    seeds = [args.seed + i for i in range(args.seeds or (2 if args.quick else 3))]
    width, extend = (1, 0) if args.quick else (2, 4)
    every = max(steps // (8 if args.quick else 20), 1)

    def one(name: str, lr: float, seed: int) -> tc.Run:
        return train_one(
            name, lr, seed, data, k=args.k, batch=args.batch, steps=steps, penalty=args.penalty, every=every
        )

    def progress(line: str) -> None:
        if not args.quick:
            print(line, flush=True)

    sweeps, seeded = tc.tune_and_seed(
        NAMES, one, lambda r: r.final("val loss"), CENTERS, seeds, width=width, max_extend=extend, progress=progress
    )

    def finals(name: str, key: str) -> list[float]:
        return [r.final(key) for r in seeded[name]]

    header = [
        "optimizer",
        "best lr (grid)",
        "test accuracy",
        "test cross-entropy",
        "fit cross-entropy",
        "max \\|W^T W - I\\|_F",
        "s / run",
    ]
    rows = [
        [
            name,
            sweeps[name].describe(),
            tc.pm(finals(name, "test accuracy")),
            tc.pm(finals(name, "test loss")),
            tc.pm(finals(name, "fit loss")),
            max(finals(name, "feasibility")),
            sum(r.seconds for r in seeded[name]) / len(seeded[name]),
        ]
        for name in NAMES
    ]
    table = tc.markdown_table(header, rows)
    grid = tc.sweep_table(sweeps, "val cross-entropy, lr =")
    title = (
        f"Digits, Stiefel feature map W (64 x {args.k}) + linear head: batch {args.batch}, {steps} steps "
        f"({steps / per_epoch:.3g} epochs), {len(seeds)} seeds at the best rate"
    )
    note = (
        f"mean ± std over seeds {seeds}; AdamW's W is unconstrained (penalty lambda = {args.penalty:g}); "
        "the rates are tuned on the mean validation cross-entropy of the same seeds; "
        f"{time.perf_counter() - started:.0f} s in all, "
        f"{torch.get_num_threads()} torch thread(s)."
    )
    text = (
        f"### {title}\n\n{table}\n\n{note}\n\n"
        f"Learning-rate sweep (validation cross-entropy, mean over the seeds):\n\n{grid}"
    )
    print(f"\n{text}\n")

    best_runs = {name: seeded[name][0] for name in NAMES}
    panels = [
        tc.Panel("val loss", "validation cross-entropy"),
        tc.Panel("test accuracy", "test accuracy", log=False),
        tc.Panel("feasibility", "||W^T W - I||_F"),
    ]
    path = tc.plot(list(best_runs.values()), panels, os.path.join(args.output, "torch_stiefel.png"), title)
    lr_path = tc.plot_sweeps(
        list(sweeps.values()),
        os.path.join(args.output, "torch_stiefel_lr.png"),
        "digits classifier: learning-rate sweeps",
        "final validation cross-entropy (mean over seeds)",
        log=True,
    )
    md = tc.write_text(os.path.join(args.output, "torch_stiefel.md"), text + "\n")
    print(f"plots: {path}, {lr_path}; tables: {md}")
    return {
        "runs": best_runs,
        "seeds": seeded,
        "sweeps": sweeps,
        "table": table,
        "plot": path,
        "sweep_plot": lr_path,
        "markdown": md,
    }


if __name__ == "__main__":
    main()
