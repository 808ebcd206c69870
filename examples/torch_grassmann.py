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

Real data (``--data digits``; ``--data all``, the default, runs both cases): the rows of scikit-learn's bundled
handwritten digits (1797 images of 8 x 8 pixels, intensities scaled to ``[0, 1]`` and centered with the data set's
mean), streamed in shuffled minibatches (one seeded permutation per epoch, the same for every optimizer of a seed),
with the same loss and ``p = 10`` (the eigengap ``(lambda_10 - lambda_11) / lambda_10`` is 0.23; the top 10 directions
hold 74% of the variance). Reference: the exact top-``p`` subspace of the data covariance ``C = X^T X / N``
(``eigh``). Each optimizer's peak learning rate is tuned on a half-decade grid (..., 0.01, 0.03, 0.1, ...) by the final
captured-variance deficit ``1 - tr(Y^T C Y) / (lambda_1 + .. + lambda_p)``, averaged over 3 seeds (random start and
batch order); the grid grows until its best point is inside it. The 3 runs at the best rate give the table: the
captured variance and the ``sin`` of the largest principal angle to the exact subspace (mean ± std over the seeds),
the feasibility and the optimizer time per run.

Outputs (``--output``, default ``examples/output/``): ``torch_grassmann.png`` (synthetic case),
``torch_grassmann_digits.png`` and ``torch_grassmann_digits_lr.png`` (digits: curves of seed 0, sweeps) and
``torch_grassmann.md`` (the tables).

Run: ``python examples/torch_grassmann.py`` (``--quick`` for a small version, ``--help`` for the options).
"""

from __future__ import annotations

import math
import os
import sys
import time

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
#: Digits case: centers of the learning-rate grids (two half-decades either side; the grid grows while its best point
#: is at an end), the best rates of the full run.
DIGITS_CENTERS = {"iMuon": 0.03, "RiemannianSGD": 0.03, "RiemannianAdam": 0.3}
SETUPS = {
    "iMuon": lambda y, lr: IMuon([y], lr=lr),
    "RiemannianSGD": lambda y, lr: geoopt.optim.RiemannianSGD([y], lr=lr, momentum=0.9),
    "RiemannianAdam": lambda y, lr: geoopt.optim.RiemannianAdam([y], lr=lr),
}


def synthetic(args) -> dict:
    """The synthetic stream (Gaussian samples with a known covariance); returns runs, table and plot."""
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

    runs = []
    for name, make_opt in SETUPS.items():
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
    panels = [
        tc.Panel("subspace distance", "sin of the largest principal angle to the top-p subspace"),
        tc.Panel("loss", "minibatch loss (moving average)", log=False, smooth=10),
    ]
    title = f"Streaming PCA on Gr({n}, {p}): batch {batch}, {steps} steps"
    table, path = tc.report(title, runs, columns, panels, args.output, "torch_grassmann.png")
    return {"runs": {r.name: r for r in runs}, "table": table, "plot": path, "title": title}


def digits_data(dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """The digits' pixel rows scaled to ``[0, 1]`` and centered: ``(1797, 64)``."""
    x = tc.digits(dtype)[0] / 16.0
    return x - x.mean(0)


def top_subspace(x: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenvalues (descending, ``(n,)``) and the top-``p`` eigenvectors (``n x p``) of ``C = X^T X / N``
    (``eigh``)."""
    cov = x.mT @ x / x.shape[0]
    lam, vec = torch.linalg.eigh(cov)
    return lam.flip(0), vec.flip(1)[:, :p]


def stream_pca_run(
    name: str, lr: float, seed: int, x: torch.Tensor, p: int, batch: int, steps: int, every: int
) -> tc.Run:
    """Streaming PCA of the rows of ``x`` (``N x n``) on ``Gr(n, p)`` with optimizer ``name`` from seed ``seed``'s
    random start and minibatch order. Records ``captured variance``, ``subspace distance`` (``sin`` of the largest
    principal angle to the exact top-``p`` subspace) and ``feasibility``; a run that fails on a non-finite value
    records a captured variance of ``-inf``."""
    lam, top = top_subspace(x, p)
    cov, best = x.mT @ x / x.shape[0], float(lam[:p].sum())
    g = tc.generator(seed)
    y = geoopt.ManifoldParameter(
        torch.linalg.qr(torch.randn(x.shape[1], p, generator=g, dtype=DTYPE))[0], manifold=Grassmann()
    )
    opt = SETUPS[name](y, lr)
    per_epoch = x.shape[0] // batch
    batches = tc.epoch_batches(x.shape[0], batch, math.ceil(steps / per_epoch), seed)[:steps]

    def loss_fn(step: int) -> torch.Tensor:
        z = x[batches[step]] @ y
        return -(z * z).sum() / batch

    def evaluate() -> dict[str, float]:
        captured = float((y * (cov @ y)).sum()) / best
        return {
            "captured variance": captured,
            "variance deficit": 1.0 - captured,
            "subspace distance": tc.subspace_distance(y, top),
            "feasibility": tc.stiefel_feasibility(y),
        }

    try:
        run = tc.train(name, opt, loss_fn, steps, evaluate=evaluate, every=every)
    except FloatingPointError:  # iMuon refuses a non-finite gradient: a diverged run
        run = tc.Run(name, lr=lr)
        run.record(
            steps,
            {
                "captured variance": -math.inf,
                "variance deficit": math.inf,
                "subspace distance": 1.0,
                "feasibility": math.inf,
            },
        )
    if not math.isfinite(run.final("captured variance")):
        run.metrics["captured variance"][-1] = -math.inf
    return run


def digits(args) -> dict:
    """The digits stream: tuned rates, seeds; returns runs (seed 0 at the best rates), sweeps, table and plots."""
    started = time.perf_counter()
    x = digits_data()
    p, batch = args.p, args.batch
    per_epoch = x.shape[0] // batch
    steps = args.steps or (2 if args.quick else 10) * per_epoch
    seeds = [args.seed + i for i in range(args.seeds or (2 if args.quick else 3))]
    width, extend = (1, 0) if args.quick else (2, 4)
    every = max(steps // (8 if args.quick else 40), 1)
    lam = top_subspace(x, p)[0]

    def progress(line: str) -> None:
        if not args.quick:
            print(line, flush=True)

    sweeps, seeded = tc.tune_and_seed(
        SETUPS,
        lambda name, lr, seed: stream_pca_run(name, lr, seed, x, p, batch, steps, every),
        lambda r: 1.0 - r.final("captured variance"),
        DIGITS_CENTERS,
        seeds,
        width=width,
        max_extend=extend,
        progress=progress,
    )

    def finals(name: str, key: str) -> list[float]:
        return [r.final(key) for r in seeded[name]]

    header = [
        "optimizer",
        "best lr (grid)",
        "captured variance",
        "1 - captured",
        "sin angle to top-p",
        "max \\|Y^T Y - I\\|_F",
        "s / run",
    ]
    rows = [
        [
            name,
            sweeps[name].describe(),
            tc.pm(finals(name, "captured variance"), 6),
            tc.pm([1.0 - v for v in finals(name, "captured variance")], 3),
            tc.pm(finals(name, "subspace distance"), 3),
            max(finals(name, "feasibility")),
            sum(r.seconds for r in seeded[name]) / len(seeded[name]),
        ]
        for name in SETUPS
    ]
    table = tc.markdown_table(header, rows)
    grid = tc.sweep_table(sweeps, "1 - captured, lr =")
    title = (
        f"Streaming PCA of the digits on Gr({x.shape[1]}, {p}): batch {batch}, {steps} steps "
        f"({steps / per_epoch:.3g} epochs), {len(seeds)} seeds at the best rate"
    )
    note = (
        f"mean ± std over seeds {seeds}; exact top-{p} subspace by eigh of the covariance (it holds "
        f"{float(lam[:p].sum() / lam.sum()):.1%} of the variance; eigengap (lambda_{p} - lambda_{p + 1}) / "
        f"lambda_{p} = {float((lam[p - 1] - lam[p]) / lam[p - 1]):.3g}); the rates are tuned on the mean over "
        "the same seeds; "
        f"{time.perf_counter() - started:.0f} s in all, {torch.get_num_threads()} torch thread(s)."
    )
    text = (
        f"### {title}\n\n{table}\n\n{note}\n\nLearning-rate sweep (captured-variance deficit, "
        f"mean over the seeds):\n\n{grid}"
    )
    print(f"\n{text}\n")
    runs = {name: seeded[name][0] for name in SETUPS}
    panels = [
        tc.Panel("subspace distance", "sin of the largest principal angle to the exact top-p subspace"),
        tc.Panel("variance deficit", "1 - captured variance (whole data set)"),
        tc.Panel("loss", "minibatch loss (moving average)", log=False, smooth=10),
    ]
    path = tc.plot(list(runs.values()), panels, os.path.join(args.output, "torch_grassmann_digits.png"), title)
    lr_path = tc.plot_sweeps(
        list(sweeps.values()),
        os.path.join(args.output, "torch_grassmann_digits_lr.png"),
        "streaming PCA of the digits: learning-rate sweeps",
        "1 - captured variance",
        log=True,
    )
    print(f"plots: {path}, {lr_path}")
    return {
        "runs": runs,
        "seeds": seeded,
        "sweeps": sweeps,
        "table": table,
        "plot": path,
        "sweep_plot": lr_path,
        "text": text,
    }


def main(argv=None) -> dict:
    parser = tc.parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        choices=("synthetic", "digits", "all"),
        default="all",
        help="the synthetic Gaussian stream, the digits, or both (default)",
    )
    parser.add_argument("--p", type=int, default=10, help="digits: dimension of the subspace (default 10)")
    parser.add_argument("--batch", type=int, default=32, help="digits: minibatch size (default 32)")
    parser.add_argument("--seeds", type=int, default=None, help="digits: seeds per learning rate (default 3; 2 quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    cases = {}
    if args.data in ("synthetic", "all"):
        cases["synthetic"] = synthetic(args)
    if args.data in ("digits", "all"):
        cases["digits"] = digits(args)
    sections = []
    if "synthetic" in cases:
        sections.append(f"### {cases['synthetic']['title']}\n\n{cases['synthetic']['table']}")
    if "digits" in cases:
        sections.append(cases["digits"]["text"])
    md = tc.write_text(os.path.join(args.output, "torch_grassmann.md"), "\n\n".join(sections) + "\n")
    first = cases.get("synthetic") or cases["digits"]
    return {"runs": first["runs"], "table": first["table"], "plot": first["plot"], "cases": cases, "markdown": md}


if __name__ == "__main__":
    main()
