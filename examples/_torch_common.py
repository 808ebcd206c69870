"""The harness shared by the torch examples (``torch_*.py``): options, seeded training runs, tables and plots.

Every example builds its model and data once, then trains it from the same starting point with several
optimizers through :func:`train`, which records

- the minibatch loss of every step,
- problem-specific metrics (full-data loss, errors, feasibility) every ``every`` steps, evaluated outside the timed
  region,
- the wall time of the optimization steps alone (forward, backward, ``step``, scheduler).

:func:`report` prints the markdown table and writes one PNG with a panel per metric (matplotlib, Agg backend).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")

Metrics = Callable[[], dict[str, float]]


# ----------------------------------------------------------------------------------------------------------------------
# Options and setup


def parser(description: str) -> argparse.ArgumentParser:
    """The options every torch example understands: ``--quick``, ``--output``, ``--seed``, ``--steps``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a small version that runs in a few seconds")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="folder for the PNG plot (default: examples/output/)")
    p.add_argument("--seed", type=int, default=0, help="random seed (data, initial point, minibatches)")
    p.add_argument("--steps", type=int, default=None, help="number of optimization steps (default: by size)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: these problems are small, and extra threads only add "
        "synchronization, badly so on a shared machine)",
    )
    return p


def setup(description: str, argv=None) -> argparse.Namespace:
    """Parse the common options (plus none else) and set torch's thread count."""
    args = parser(description).parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    return args


def generator(seed: int) -> torch.Generator:
    """A seeded CPU generator; also seeds torch's global generator (module initializers use it)."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def minibatches(n_samples: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """``(steps, batch)`` sample indices, the same for every optimizer of a run (sampling without replacement
    inside a step)."""
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.stack([torch.randperm(n_samples, generator=g)[:batch] for _ in range(steps)])


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, floor: float = 0.02) -> Any:
    """Cosine decay of every group's learning rate from its initial value to ``floor`` times it."""

    def factor(k: int) -> float:
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(k, steps) / steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def stiefel_feasibility(x: torch.Tensor) -> float:
    """``||X^T X - I||_F`` (largest over a batch), the distance of ``X`` from orthonormal columns."""
    x = x.detach().to(torch.float64)
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    return float(torch.linalg.matrix_norm(x.mT @ x - eye).max())


def subspace_distance(x: torch.Tensor, q: torch.Tensor) -> float:
    """``sin`` of the largest principal angle between ``span(X)`` and ``span(Q)`` (``Q`` orthonormal, same width).

    ``X`` need not be orthonormal: its columns are orthonormalized first.
    """
    x = torch.linalg.qr(x.detach().to(torch.float64))[0]
    q = q.to(torch.float64)
    cos = torch.linalg.svdvals(q.mT @ x).clamp(max=1.0)
    return float(torch.sqrt(torch.clamp(1.0 - cos.min() ** 2, min=0.0)))


# ----------------------------------------------------------------------------------------------------------------------
# Training runs


@dataclass
class Run:
    """What one optimizer did: per-step minibatch losses, metrics every few steps, and the timed seconds."""

    name: str
    lr: float = float("nan")
    loss: list[float] = field(default_factory=list)
    at: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    style: str = "-"
    color: str | None = None

    def record(self, step: int, values: dict[str, float]) -> None:
        self.at.append(step)
        for key, value in values.items():
            self.metrics.setdefault(key, []).append(float(value))

    def final(self, key: str) -> float:
        return self.metrics[key][-1]


def train(
    name: str,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    *,
    evaluate: Metrics | None = None,
    every: int = 10,
    schedule: bool = True,
    lr: float | None = None,
) -> Run:
    """Run ``steps`` optimization steps; ``loss_fn(k)`` returns the minibatch loss of step ``k``.

    ``evaluate()`` (untimed, under ``torch.no_grad``) is called before the first step, every ``every`` steps and
    after the last one. With ``schedule`` the learning rates follow :func:`cosine_schedule`.
    """
    run = Run(name, lr=float(optimizer.param_groups[0]["lr"] if lr is None else lr))
    sched = cosine_schedule(optimizer, steps) if schedule else None

    def measure(k: int) -> None:
        if evaluate is not None:
            with torch.no_grad():
                run.record(k, evaluate())

    measure(0)
    for k in range(steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(k)
        loss.backward()
        optimizer.step()
        if sched is not None:
            sched.step()
        run.seconds += time.perf_counter() - t0
        run.loss.append(float(loss.detach()))
        if (k + 1) % every == 0 or k + 1 == steps:
            measure(k + 1)
    return run


def max_trajectory_difference(a: Run, b: Run) -> float:
    """``max_k |loss_a(k) - loss_b(k)|`` over the per-step minibatch losses of two runs on the same batches."""
    return max(abs(x - y) for x, y in zip(a.loss, b.loss, strict=True))


# ----------------------------------------------------------------------------------------------------------------------
# Reporting


def fmt(value: Any) -> str:
    """Compact number formatting for tables: 4 significant digits, scientific when small or large."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    v = float(value)
    if math.isnan(v):
        return "-"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.2e}"
    return f"{v:.4g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; numbers go through :func:`fmt`."""
    cells = [[fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


@dataclass(frozen=True)
class Panel:
    """One plot panel: a recorded metric (or ``"loss"`` for the per-step minibatch loss) against the step."""

    key: str
    label: str
    log: bool = True
    smooth: int = 1


def _moving_average(values: Sequence[float], width: int) -> list[float]:
    if width <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def plot(runs: Sequence[Run], panels: Sequence[Panel], path: str, title: str) -> str:
    """One PNG with a panel per metric, a line per run; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for run in runs:
            if panel.key == "loss":
                xs, ys = list(range(1, len(run.loss) + 1)), _moving_average(run.loss, panel.smooth)
            elif panel.key in run.metrics:
                xs, ys = run.at, run.metrics[panel.key]
            else:
                continue
            if panel.log:
                ys = [max(y, 1e-16) for y in ys]
            ax.plot(xs, ys, run.style, color=run.color, label=run.name, linewidth=1.4)
        if panel.log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(panel.label, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(
    title: str,
    runs: Sequence[Run],
    columns: Sequence[tuple[str, Callable[[Run], Any]]],
    panels: Sequence[Panel],
    output: str,
    filename: str,
) -> tuple[str, str]:
    """Print the markdown table (one row per run) and write the plot to ``output/filename``.

    ``columns`` are ``(header, run -> value)``; the optimizer name, lr and time columns come first.
    Returns ``(table, plot path)``.
    """
    header = ["optimizer", "lr", "time (s)"] + [h for h, _ in columns]
    rows = [[run.name, run.lr, run.seconds] + [fn(run) for _, fn in columns] for run in runs]
    table = markdown_table(header, rows)
    path = plot(runs, panels, os.path.join(output, filename), title)
    print(f"\n### {title}\n\n{table}\n\nplot: {path}")
    return table, path


# ----------------------------------------------------------------------------------------------------------------------
# Real data, learning-rate sweeps and seeds


def epoch_batches(n_samples: int, batch: int, epochs: int, seed: int) -> torch.Tensor:
    """``(epochs * (n_samples // batch), batch)`` sample indices: each epoch a fresh seeded permutation cut into full
    minibatches (the remainder is dropped). The same order for every optimizer of a seed."""
    if batch > n_samples:
        raise ValueError(f"batch={batch} exceeds the {n_samples} samples; pass a smaller batch")
    g = torch.Generator().manual_seed(seed + 7919)
    per_epoch = n_samples // batch
    return torch.cat(
        [torch.randperm(n_samples, generator=g)[: per_epoch * batch].view(per_epoch, batch) for _ in range(epochs)]
    )


def digits(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled handwritten digits: ``(X, y)``, ``X`` (1797, 64) pixel intensities in ``[0, 16]``
    of 8 x 8 images, ``y`` (1797,) labels 0..9. No download (the data ship with scikit-learn)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data need scikit-learn: pip install -e '.[examples]'") from exc
    data = load_digits()
    return torch.as_tensor(data.data, dtype=dtype), torch.as_tensor(data.target, dtype=torch.long)


def half_decade(j: int) -> float:
    """The ``j``-th point of the half-decade grid ``..., 0.01, 0.03, 0.1, 0.3, 1, ...`` (``j = 0`` is 1)."""
    return float(f"{3 if j % 2 else 1}e{j // 2}")  # parsed from the decimal, so 0.3 is exactly the float 0.3


def half_decade_index(value: float) -> int:
    """The index ``j`` of the half-decade point nearest to ``value`` (in log scale)."""
    if not value > 0:
        raise ValueError(f"a learning rate must be positive, got {value!r}")
    return min(range(-40, 41), key=lambda j: abs(math.log(half_decade(j) / value)))


@dataclass
class Sweep:
    """A learning-rate sweep of one optimizer: ``scores[lr]`` (lower is better; ``inf`` for a diverged run)."""

    name: str
    scores: dict[float, float]
    best: float
    inside: bool

    @property
    def grid(self) -> list[float]:
        return sorted(self.scores)

    def describe(self) -> str:
        """``"best (lo-hi, 7 points)"``, with ``"edge!"`` when the best is at an end of the grid."""
        grid = self.grid
        where = "" if self.inside else ", edge!"
        return f"{fmt(self.best)} ({fmt(grid[0])}-{fmt(grid[-1])}, {len(grid)} pts{where})"


def sweep_lr(
    name: str,
    score: Callable[[float], float],
    center: float,
    width: int = 2,
    max_extend: int = 4,
    progress: Callable[[str], None] | None = None,
) -> Sweep:
    """Tune a learning rate on the half-decade grid.

    Evaluates ``score(lr)`` at the ``2 * width + 1`` half-decade points around ``center``; while the best point is at
    an end of the grid, one more point is added beyond that end (at most ``max_extend`` times), so that the best
    point is inside the grid whenever that is reachable (``Sweep.inside`` tells). Non-finite scores count as ``inf``.
    """
    c = half_decade_index(center)
    scores: dict[float, float] = {}

    def evaluate(j: int) -> None:
        lr = half_decade(j)
        if lr not in scores:
            value = float(score(lr))
            scores[lr] = value if math.isfinite(value) else math.inf
            if progress is not None:
                progress(f"  {name:<24s} lr {fmt(lr):>7s}  score {fmt(scores[lr])}")

    lo, hi = c - width, c + width
    for j in range(lo, hi + 1):
        evaluate(j)
    for _ in range(max_extend):
        best = min(scores, key=lambda lr: (scores[lr], lr))
        if best == half_decade(lo):  # (also when every run diverged: smaller rates next)
            lo -= 1
            evaluate(lo)
        elif best == half_decade(hi):
            hi += 1
            evaluate(hi)
        else:
            break
    best = min(scores, key=lambda lr: (scores[lr], lr))
    grid = sorted(scores)
    return Sweep(name, scores, best, grid[0] < best < grid[-1])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return float(t.mean()), float(t.std()) if t.numel() > 1 else 0.0


def pm(values: Sequence[float], digits: int = 4) -> str:
    """``"mean ± std"`` of a few values (seeds), each to ``digits`` significant digits."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}g} ± {std:.2g}"


def plot_sweeps(sweeps: Sequence[Sweep], path: str, title: str, ylabel: str, log: bool = False) -> str:
    """One panel: each optimizer's sweep score against the learning rate (log axis); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for s in sweeps:
        xs = s.grid
        ys = [s.scores[x] for x in xs]
        line = ax.plot(xs, [y if math.isfinite(y) else float("nan") for y in ys], "o-", label=s.name, linewidth=1.2)
        ax.plot([s.best], [s.scores[s.best]], "*", color=line[0].get_color(), markersize=11)
    ax.set_xscale("log")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("learning rate (peak of the cosine schedule)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` (creating the folder); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
    return path


def tune_and_seed(
    names: Sequence[str],
    run: Callable[[str, float, int], Run],
    objective: Callable[[Run], float],
    centers: dict[str, float],
    seeds: Sequence[int],
    *,
    width: int = 2,
    max_extend: int = 4,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Sweep], dict[str, list[Run]]]:
    """Tune each optimizer's rate by the mean ``objective`` over ``seeds`` (:func:`sweep_lr`), keeping the runs.

    ``run(name, lr, seed)`` trains one model. Returns ``(sweeps, seeded)``: the sweep of every name and the runs
    of every seed at its best rate (already computed during the sweep).
    """
    sweeps: dict[str, Sweep] = {}
    seeded: dict[str, list[Run]] = {}
    for name in names:
        tried: dict[float, list[Run]] = {}

        def score(lr: float, name=name, tried=tried) -> float:
            tried[lr] = [run(name, lr, s) for s in seeds]
            return mean_std([objective(r) for r in tried[lr]])[0]

        sweeps[name] = sweep_lr(name, score, centers[name], width=width, max_extend=max_extend, progress=progress)
        seeded[name] = tried[sweeps[name].best]
    return sweeps, seeded


def sweep_table(sweeps: dict[str, Sweep], label: str) -> str:
    """The objective per optimizer (rows) and learning rate (columns), each row's best in bold; ``label`` heads
    the first column (e.g. ``"val cross-entropy, lr ="``)."""
    lrs = sorted({lr for s in sweeps.values() for lr in s.scores})
    rows = []
    for name, s in sweeps.items():
        cells = []
        for lr in lrs:
            value = s.scores.get(lr)
            text = "" if value is None else ("diverged" if math.isinf(value) else fmt(value))
            cells.append(f"**{text}**" if lr == s.best else text)
        rows.append([name] + cells)
    return markdown_table([label] + [fmt(lr) for lr in lrs], rows)
