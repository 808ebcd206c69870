"""A small harness shared by the Pymanopt examples and the benchmark.

It runs several Pymanopt optimizers on one problem from one starting point and records, per run: iterations, wall
time, cost and gradient evaluations, the final cost and a problem-specific error, and the per-iteration trace of cost
and error (from Pymanopt's ``log_verbosity=1`` log, which stores the iterate of every iteration; for solvers that keep
no log, such as ``TrustRegions``, from the points at which the cost was evaluated, keeping the best so far). It prints
markdown tables, writes PNG plots (error vs iteration and vs time) and derives a short verdict from the numbers.

Errors are computed after each run from the stored iterates, so they never count in the timings.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pymanopt import Problem

ErrorFn = Callable[[Any], float]
SolverFactory = Callable[[], Any]


# ----------------------------------------------------------------------------------------------------------------------
# Threads


def add_thread_option(parser) -> None:
    """``--torch-threads`` (default 1) for an example's command line."""
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads for iMuon's directions (default 1: the matrices here are small "
        "and more threads mostly add synchronization overhead, badly so on a busy machine); "
        "0 keeps torch's default",
    )


def add_common_options(parser, output_help: str = "folder for the tables (.md) and plots (.png)") -> None:
    """``--max-time``, ``--output``, ``--seed`` and ``--torch-threads``, shared by the Pymanopt examples."""
    parser.add_argument("--max-time", type=float, default=None, help="seconds per run")
    parser.add_argument("--output", default=default_output(), help=output_help)
    parser.add_argument("--seed", type=int, default=0)
    add_thread_option(parser)


def set_torch_threads(count: int) -> int:
    """Set torch's intra-op thread count (``count > 0``); returns the count in effect."""
    import torch

    if count > 0:
        torch.set_num_threads(count)
    return torch.get_num_threads()


# ----------------------------------------------------------------------------------------------------------------------
# Solvers


def stopping(
    max_iterations: int = 1000,
    max_time: float = 10.0,
    min_gradient_norm: float = 1e-10,
    min_step_size: float = 1e-14,
    log: bool = True,
) -> dict:
    """Keyword arguments shared by every Pymanopt optimizer (silent, per-iteration log on)."""
    return dict(
        max_iterations=max_iterations,
        max_time=max_time,
        min_gradient_norm=min_gradient_norm,
        min_step_size=min_step_size,
        max_cost_evaluations=10**9,
        verbosity=0,
        log_verbosity=1 if log else 0,
    )


def imuon(norm: str = "spectral", **kwargs) -> Any:
    """An :class:`imuon_manopt.optimizers.IMuon` (imported lazily, so the baselines run without it)."""
    from imuon_manopt.optimizers import IMuon

    return IMuon(norm=norm, **kwargs)


def baseline(name: str, **kwargs) -> Any:
    """A Pymanopt optimizer by name: ``SteepestDescent``, ``ConjugateGradient`` or ``TrustRegions``."""
    import pymanopt.optimizers as opt

    return getattr(opt, name)(**kwargs)


def solver_set(names: Iterable[str], **stop) -> dict[str, SolverFactory]:
    """Factories for the named solvers, all with the same stopping criteria.

    Names: ``iMuon``/``iMuon-spectral``, ``iMuon-frobenius``, ``iMuon-nuclear``, ``SD``, ``CG``, ``TR``.
    """
    kw = stopping(**stop)
    table: dict[str, SolverFactory] = {
        "iMuon-spectral": lambda: imuon("spectral", **kw),
        "iMuon-frobenius": lambda: imuon("frobenius", **kw),
        "iMuon-nuclear": lambda: imuon("nuclear", **kw),
        "SD": lambda: baseline("SteepestDescent", **kw),
        "CG": lambda: baseline("ConjugateGradient", **kw),
        "TR": lambda: baseline("TrustRegions", **kw),
    }
    table["iMuon"] = table["iMuon-spectral"]
    return {name: table[name] for name in names}


# ----------------------------------------------------------------------------------------------------------------------
# Counting the evaluations a solver makes


class CountingProblem(Problem):
    """A view of a Pymanopt :class:`~pymanopt.Problem` that counts cost, gradient and Hessian calls.

    It shares the wrapped problem's functions (no copy of the data). A gradient call counts once whether the solver
    asks for the Euclidean or the Riemannian gradient. With ``record=True`` every cost call also stores
    ``(time, point, cost)``, which gives a trace for solvers that keep no per-iteration log.
    """

    def __init__(self, problem: Problem, *, record: bool = False) -> None:  # noqa: D107 - no super().__init__
        self.__dict__.update(problem.__dict__)
        self.counts = {"cost": 0, "gradient": 0, "hessian": 0}
        self.record = record
        self.evaluations: list[tuple[float, Any, float]] = []
        self._depth = 0

    def _counted(self, kind: str, function: Callable) -> Callable:
        def wrapper(*args):
            if self._depth == 0:
                self.counts[kind] += 1
            self._depth += 1
            try:
                return function(*args)
            finally:
                self._depth -= 1

        return wrapper

    @property
    def cost(self):
        function = Problem.cost.fget(self)

        def cost(point):
            value = function(point)
            self.counts["cost"] += 1
            if self.record:
                self.evaluations.append((time.time(), point, float(value)))
            return value

        return cost

    @property
    def euclidean_gradient(self):
        return self._counted("gradient", Problem.euclidean_gradient.fget(self))

    @property
    def riemannian_gradient(self):
        return self._counted("gradient", Problem.riemannian_gradient.fget(self))

    @property
    def euclidean_hessian(self):
        return self._counted("hessian", Problem.euclidean_hessian.fget(self))

    @property
    def riemannian_hessian(self):
        return self._counted("hessian", Problem.riemannian_hessian.fget(self))


# ----------------------------------------------------------------------------------------------------------------------
# Records


@dataclass
class Record:
    """One solver run on one problem."""

    problem: str
    solver: str
    iterations: int
    time: float
    cost: float
    error: float
    stop: str
    cost_evaluations: int
    gradient_evaluations: int
    hessian_evaluations: int = 0
    trace_step: np.ndarray = field(default_factory=lambda: np.zeros(0, int), repr=False)
    trace_time: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    trace_cost: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    trace_error: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    point: Any = field(default=None, repr=False)
    info: dict = field(default_factory=dict)

    def reached(self, tol: float) -> tuple[int | None, float | None]:
        """Iterations (steps taken) and seconds until the error first fell to ``tol``; ``(None, None)`` if never."""
        hits = np.flatnonzero(self.trace_error <= tol)
        if hits.size == 0:
            return None, None
        i = int(hits[0])
        return int(self.trace_step[i]), float(self.trace_time[i])

    @property
    def time_per_iteration(self) -> float:
        return self.time / max(self.iterations, 1)

    def summary(self) -> dict:
        """The scalar fields (for JSON or tables)."""
        return {
            k: getattr(self, k)
            for k in (
                "problem",
                "solver",
                "iterations",
                "time",
                "cost",
                "error",
                "stop",
                "cost_evaluations",
                "gradient_evaluations",
                "hessian_evaluations",
            )
        }


def _short_stop(reason: str) -> str:
    reason = (reason or "").lower()
    for key, short in (
        ("max time", "max time"),
        ("max iter", "max iters"),
        ("grad norm", "grad norm"),
        ("step_size", "step size"),
        ("step size", "step size"),
        ("cost eval", "max evals"),
    ):
        if key in reason:
            return short
    return reason[:20]


def run_solver(
    problem: Problem,
    solver: Any,
    initial_point: Any,
    error: ErrorFn,
    *,
    problem_name: str = "",
    solver_name: str | None = None,
    trace: bool = True,
    progress: Callable[[str], None] | None = None,
    keep_point: bool = False,
    final_info: Callable[[Any], dict] | None = None,
) -> Record:
    """Run one optimizer from ``initial_point`` and return its :class:`Record`.

    ``trace=False`` skips the per-iteration errors (for timing runs; set ``log_verbosity=0`` on the solver too).
    """
    name = solver_name or str(solver)
    counted = CountingProblem(problem, record=False)
    from pymanopt.optimizers import TrustRegions

    # Pymanopt's TrustRegions keeps no per-iteration log: trace it through its cost evaluations.
    logs = getattr(solver, "_log_verbosity", 0) >= 1 and not isinstance(solver, TrustRegions)
    if trace and not logs:
        counted.record = True
    with warnings.catch_warnings():
        # ConjugateGradient's beta rule divides 0 by 0 once the gradient vanishes; it recovers.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"pymanopt\.optimizers")
        t0 = time.time()
        result = solver.run(counted, initial_point=initial_point)
        wall = time.time() - t0
    final_error = float(error(result.point))
    record = Record(
        problem=problem_name,
        solver=name,
        iterations=int(result.iterations),
        time=wall,
        cost=float(result.cost),
        error=final_error,
        stop=_short_stop(result.stopping_criterion),
        cost_evaluations=counted.counts["cost"],
        gradient_evaluations=counted.counts["gradient"],
        hessian_evaluations=counted.counts["hessian"],
        point=result.point if keep_point else None,
    )
    if final_info is not None:
        record.info.update(final_info(result.point))
    if trace:
        entries = _trace_entries(result, counted)
        steps, times, costs, points = [], [], [], []
        for i, (stamp, point, cost) in enumerate(entries):
            steps.append(i)
            times.append(stamp - t0)
            costs.append(cost)
            points.append(point)
        if not points or points[-1] is not result.point:
            steps.append(max(int(result.iterations), len(points)))
            times.append(wall)
            costs.append(float(result.cost))
            points.append(result.point)
        record.trace_step = np.asarray(steps)
        record.trace_time = np.asarray(times)
        record.trace_cost = np.asarray(costs, dtype=float)
        record.trace_error = np.asarray([error(p) for p in points], dtype=float)
    if progress is not None:
        progress(
            f"  {problem_name:<34s} {name:<26s} {record.iterations:6d} it  {record.time:7.2f} s  "
            f"error {record.error:9.2e}  ({record.stop})"
        )
    return record


def _trace_entries(result, counted: CountingProblem) -> list[tuple[float, Any, float]]:
    log = getattr(result, "log", None) or {}
    iterations = log.get("iterations") if isinstance(log, dict) else None
    if iterations and iterations.get("point"):
        return list(zip(iterations["time"], iterations["point"], [float(c) for c in iterations["cost"]]))
    # No per-iteration log: keep the best point among the cost evaluations so far (for TrustRegions this is the
    # current iterate: one cost evaluation per outer iteration, accepted when the cost decreased enough).
    entries, best = [], None
    for stamp, point, cost in counted.evaluations:
        if best is None or cost < best[2]:
            best = (stamp, point, cost)
        entries.append((stamp, best[1], best[2]))
    return entries


def compare(
    problem: Problem,
    initial_point: Any,
    solvers: dict[str, SolverFactory],
    error: ErrorFn,
    *,
    problem_name: str,
    progress: Callable[[str], None] | None = print,
    copy_start: Callable | None = None,
    final_info: Callable[[Any], dict] | None = None,
) -> list[Record]:
    """Run every solver from the same start (``copy_start`` copies the point; default: deep copy)."""
    import copy

    records = []
    for name, factory in solvers.items():
        x0 = copy_start(initial_point) if copy_start else copy.deepcopy(initial_point)
        try:
            records.append(
                run_solver(
                    problem,
                    factory(),
                    x0,
                    error,
                    problem_name=problem_name,
                    solver_name=name,
                    progress=progress,
                    final_info=final_info,
                )
            )
        except Exception as exc:  # a failing solver is a result too; the other runs go on
            records.append(failed_record(problem_name, name, exc))
            if progress is not None:
                progress(f"  {problem_name:<34s} {name:<26s} FAILED: {type(exc).__name__}: {exc}")
    return records


def failed_record(problem_name: str, solver_name: str, exc: BaseException) -> Record:
    """A record for a run that raised (NaN cost and error, ``stop = "failed: <exception>"``)."""
    return Record(
        problem=problem_name,
        solver=solver_name,
        iterations=0,
        time=float("nan"),
        cost=float("nan"),
        error=float("nan"),
        stop=f"failed: {type(exc).__name__}",
        cost_evaluations=0,
        gradient_evaluations=0,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def markdown_table(
    records: Sequence[Record],
    tol: float | None = None,
    *,
    with_problem: bool = False,
    extra: Sequence[tuple[str, str, str]] = (),
) -> str:
    """A markdown table: one row per run (iterations and time to ``tol`` when given).

    ``extra``: more columns ``(header, key in Record.info, format)``.
    """
    head = (["problem"] if with_problem else []) + [
        "solver",
        "iters",
        "time [s]",
        "time/iter",
        "cost evals",
        "final cost",
        "error",
    ]
    head += [h for h, _, _ in extra]
    if tol is not None:
        head += [f"iters to {tol:g}", f"time to {tol:g} [s]"]
    head += ["stop"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in records:
        row = ([r.problem] if with_problem else []) + [
            r.solver,
            str(r.iterations),
            _fmt(r.time, ".3f"),
            _fmt(r.time_per_iteration * 1e3, ".2f") + " ms",
            str(r.cost_evaluations),
            _fmt(r.cost, ".6e"),
            _fmt(r.error, ".2e"),
        ]
        row += [_fmt(r.info.get(key), spec) for _, key, spec in extra]
        if tol is not None:
            it, sec = r.reached(tol)
            row += [_fmt(it, "d"), _fmt(sec, ".3f")]
        row += [r.stop]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdict(records: Sequence[Record], tol: float) -> str:
    """A one-paragraph verdict computed from the records (never hard-coded)."""
    if not records:
        return "no runs"
    reached = [(r, *r.reached(tol)) for r in records]
    ok = [x for x in reached if x[1] is not None]
    if not ok:
        best = min(records, key=lambda r: r.error)
        return f"no solver reached error {tol:g}; lowest final error: {best.solver} ({best.error:.2e})."
    fastest = min(ok, key=lambda x: x[2])
    fewest = min(ok, key=lambda x: x[1])
    parts = [f"to error {tol:g}: fastest {fastest[0].solver} ({fastest[2]:.3f} s, {fastest[1]} it)"]
    if fewest[0] is not fastest[0]:
        parts.append(f"fewest iterations {fewest[0].solver} ({fewest[1]} it)")
    missed = [r.solver for r, it, _ in reached if it is None]
    if missed:
        parts.append("did not reach it: " + ", ".join(missed))
    mu = [x for x in ok if x[0].solver.lower().startswith("imuon")]
    other = [x for x in ok if not x[0].solver.lower().startswith("imuon")]
    if mu and other:
        m, o = min(mu, key=lambda x: x[2]), min(other, key=lambda x: x[2])
        ratio = m[2] / max(o[2], 1e-12)
        word = "faster" if ratio < 1 else "slower"
        parts.append(
            f"best iMuon ({m[0].solver}, {m[1]} it, {m[2]:.3f} s) is {word} than the best baseline "
            f"({o[0].solver}, {o[1]} it, {o[2]:.3f} s): time ratio {ratio:.2f}"
        )
    elif other and not mu and any(r.solver.lower().startswith("imuon") for r in records):
        parts.append("iMuon did not reach it")
    return "; ".join(parts) + "."


def plot(groups: dict[str, Sequence[Record]], path: str, *, tol: float | None = None, title: str = "") -> str:
    """One row per group (a problem), two panels: error vs iteration and error vs time; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(groups), 1)
    fig, axes = plt.subplots(n, 2, figsize=(11, 3.4 * n), squeeze=False)
    for row, (name, records) in enumerate(groups.items()):
        ax_it, ax_t = axes[row]
        for r in records:
            if r.trace_error.size == 0:
                continue
            err = np.maximum(r.trace_error, 1e-16)
            style = "-" if r.solver.lower().startswith("imuon") else "--"
            ax_it.semilogy(r.trace_step, err, style, label=r.solver)
            ax_t.semilogy(r.trace_time, err, style, label=r.solver)
        for ax, xlabel in ((ax_it, "iteration"), (ax_t, "time [s]")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("error")
            ax.set_title(name, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if tol is not None:
                ax.axhline(tol, color="k", lw=0.6, ls=":")
        ax_it.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grouped_report(
    records: Sequence[Record],
    output: str | None,
    *,
    heading: str,
    tol: float,
    extra: Sequence[tuple[str, str, str]],
    stem: str,
    plot_title: str,
) -> str:
    """One table and verdict per problem (``record.problem``) as markdown; with ``output``, writes
    ``<stem>.md`` and the plot ``<stem>.png`` there. Returns the markdown."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.problem, []).append(r)
    lines = [f"## {heading}, tolerance {tol:g}", ""]
    for name, group in groups.items():
        lines += [
            f"### {name}",
            "",
            markdown_table(group, tol, extra=list(extra)),
            "",
            "Verdict: " + verdict(group, tol),
            "",
        ]
    text = "\n".join(lines)
    if output:
        write_text(os.path.join(output, f"{stem}.md"), text)
        plot(groups, os.path.join(output, f"{stem}.png"), tol=tol, title=plot_title)
    return text


def write_text(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
    return path


def default_output() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
