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
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: these problems are small, and extra threads only add "
                        "synchronization, badly so on a shared machine)")
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
