"""Benchmark: the Pymanopt iMuon solver against Pymanopt's solvers, on the problems of the examples.

Two measurements, in one run, with the same problems and the same starting points for every solver:

A. *To a tolerance.* One traced run per (problem, solver) gives the iterations needed to reach the stated error
   tolerance (errors as in the examples: relative cost error for PCA, affine-invariant distance for the Karcher
   mean, relative Frobenius error for completion) and the cost/gradient evaluations per iteration. Then
   ``--repeats`` untraced runs (no log) stop after exactly that many iterations; the median of their wall times is
   the time to the tolerance.
B. *Per-iteration cost.* iMuon (spectral) and SteepestDescent each run a fixed number of iterations (no other
   stopping rule) on the same problem, untraced; the median time per iteration (line-search cost evaluations
   included) and the evaluations per iteration, and the ratio iMuon / SteepestDescent. With ``--thread-sweep`` this
   is repeated for each torch thread count given.

Problems: the examples' PCA, Karcher mean and completion, and a Rayleigh quotient on ``Sphere(128)`` (where a
direction is a normalized vector and the solver's own overhead decides the per-iteration cost).

Run: ``python benchmarks/bench_pymanopt.py`` (``--quick`` for a tiny smoke version, ``--output FILE.md``,
``--part B`` for the per-iteration measurement only, ``--only completion`` for some problems).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

# The problems here are small: one BLAS / OpenMP thread per process is faster and gives steadier timings on a shared
# machine (set before numpy and torch are imported; an explicit environment setting wins).
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import _compare as cmp  # noqa: E402
import karcher_mean  # noqa: E402
import matrix_completion  # noqa: E402
import pca  # noqa: E402


def sphere_problem(n: int, seed: int = 0):
    """``min -x^T C x`` on ``Sphere(n)`` (the dominant eigenvector), ``C`` with eigenvalues spread linearly over
    ``[0, 1]`` (eigengap ``1 / (n - 1)``); error = relative cost error. Euclidean gradient in closed form."""
    import pymanopt

    rng = np.random.default_rng(seed)
    lam = np.linspace(1.0, 0.0, n)
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    cov = (q * lam) @ q.T
    cov = 0.5 * (cov + cov.T)
    manifold = pymanopt.manifolds.Sphere(n)

    @pymanopt.function.numpy(manifold)
    def cost(x):
        return -float(x @ (cov @ x))

    @pymanopt.function.numpy(manifold)
    def euclidean_gradient(x):
        return -2.0 * (cov @ x)

    x0 = rng.standard_normal(n)
    x0 /= np.linalg.norm(x0)

    def error(x):
        return abs(cost(x) + 1.0)

    return pymanopt.Problem(manifold, cost, euclidean_gradient=euclidean_gradient), x0, error


def problems(quick: bool):
    """``name -> (problem, start, error, tolerance, solvers, copy)``, built lazily (each a thunk)."""
    if quick:
        n, p, gap = 100, 4, 0.05
        kn, kcount = 6, 6
        m, r = 60, 2
    else:
        n, p, gap = 1000, 10, 0.01
        kn, kcount = 20, 30
        m, r = 200, 5
    fr_copy = matrix_completion._copy_fixed_rank

    def pca_case(manifold, size=(n, p), backend="numpy"):
        def build():
            problem, x0, error, _ = pca.make_problem(*size, gap, manifold, backend=backend)
            solvers = ("iMuon-spectral", "iMuon-frobenius", "SD", "CG") + (("TR",) if backend == "numpy" else ())
            return problem, x0, error, 1e-8, solvers, None

        return build

    def karcher_case():
        problem, x0, error, _, _ = karcher_mean.make_problem(karcher_mean.make_data(kn, kcount, 1.0))
        return problem, x0, error, 1e-6, ("iMuon-spectral", "iMuon-frobenius", "SD", "CG"), None

    def completion_case(kappa, start):
        def build():
            data = matrix_completion.make_completion(m, m, r, kappa)
            problem = matrix_completion.fixed_rank_problem(data)
            x0 = matrix_completion.random_start(data) if start == "random" else matrix_completion.spectral_start(data)

            def error(x):
                return data.error((x[0] * x[1]) @ x[2])

            return problem, x0, error, 1e-3, ("iMuon-spectral", "iMuon-frobenius", "SD", "CG"), fr_copy

        return build

    def sphere_case():
        problem, x0, error = sphere_problem(32 if quick else 128)
        return problem, x0, error, 1e-8, ("iMuon-spectral", "iMuon-frobenius", "SD", "CG"), None

    small = (32, 4) if quick else (64, 10)
    return {
        **{
            f"PCA {m.capitalize()}({small[0]},{small[1]}) gap {gap:g} {backend}": pca_case(m, small, backend)
            for m in ("grassmann", "stiefel")
            for backend in ("numpy", "autograd")
        },
        f"Rayleigh quotient Sphere({32 if quick else 128})": sphere_case,
        f"PCA Grassmann({n},{p}) gap {gap:g}": pca_case("grassmann"),
        f"PCA Stiefel({n},{p}) gap {gap:g}": pca_case("stiefel"),
        f"Karcher SPD({kn}) N={kcount}": karcher_case,
        f"completion {m}x{m} r={r} kappa=1 (random start)": completion_case(1.0, "random"),
        f"completion {m}x{m} r={r} kappa=100 (spectral start)": completion_case(100.0, "spectral"),
    }


def _copy(x, copy):
    import copy as _copy_module

    return copy(x) if copy else _copy_module.deepcopy(x)


def to_tolerance(name, build, *, repeats, max_time, max_iterations, progress):
    problem, x0, error, tol, solvers, copy = build()
    rows = []
    traced = cmp.solver_set(solvers, max_iterations=max_iterations, max_time=max_time, min_gradient_norm=1e-12)
    for solver_name, factory in traced.items():
        try:
            record = cmp.run_solver(
                problem,
                factory(),
                _copy(x0, copy),
                error,
                problem_name=name,
                solver_name=solver_name,
                progress=progress,
            )
        except Exception as exc:  # report it and go on
            progress(f"  {name} {solver_name} FAILED: {type(exc).__name__}: {exc}")
            record = cmp.failed_record(name, solver_name, exc)
        steps, _ = record.reached(tol)
        times = []
        if steps is not None and steps > 0:
            for _ in range(repeats):
                solver = cmp.solver_set(
                    [solver_name],
                    max_iterations=steps,
                    max_time=10 * max_time,
                    min_gradient_norm=0.0,
                    min_step_size=0.0,
                    log=False,
                )[solver_name]()
                timed = cmp.run_solver(
                    problem, solver, _copy(x0, copy), error, problem_name=name, solver_name=solver_name, trace=False
                )
                times.append(timed.time)
        elif steps == 0:
            times = [0.0]
        iterations = max(record.iterations, 1)
        rows.append(
            {
                "problem": name,
                "solver": solver_name,
                "tol": tol,
                "iterations": steps,
                "time": statistics.median(times) if times else None,
                "final_error": record.error,
                "budget_iterations": record.iterations,
                "budget_time": record.time,
                "cost_per_it": record.cost_evaluations / iterations,
                "grad_per_it": record.gradient_evaluations / iterations,
                "hess_per_it": record.hessian_evaluations / iterations,
            }
        )
    return rows


def per_iteration(name, build, *, iterations, repeats, threads, progress, clock="wall"):
    problem, x0, error, _, _, copy = build()
    cmp.set_torch_threads(threads)
    solvers = ("iMuon-spectral", "SD")
    samples = {s: [] for s in solvers}
    records = {}
    for _ in range(repeats):  # interleaved, so that both solvers see the same machine load
        for solver_name in solvers:
            solver = cmp.solver_set(
                [solver_name],
                max_iterations=iterations,
                max_time=1e9,
                min_gradient_norm=0.0,
                min_step_size=0.0,
                log=False,
            )[solver_name]()
            start = time.process_time()
            record = cmp.run_solver(
                problem, solver, _copy(x0, copy), error, problem_name=name, solver_name=solver_name, trace=False
            )
            elapsed = time.process_time() - start if clock == "process" else record.time
            samples[solver_name].append(elapsed / max(record.iterations, 1))
            records[solver_name] = record
    out = {}
    for solver_name, record in records.items():
        out[solver_name] = {
            "time_per_it": statistics.median(samples[solver_name]),
            "iterations": record.iterations,
            "cost_per_it": record.cost_evaluations / max(record.iterations, 1),
            "grad_per_it": record.gradient_evaluations / max(record.iterations, 1),
        }
    progress(
        f"  {name:<52s} threads {threads}: iMuon {out['iMuon-spectral']['time_per_it'] * 1e3:.2f} ms/it, "
        f"SD {out['SD']['time_per_it'] * 1e3:.2f} ms/it"
    )
    return {"problem": name, "threads": threads, **{f"{k}:{s}": v for s, d in out.items() for k, v in d.items()}}


def _f(value, spec):
    return "-" if value is None else format(value, spec)


def tables(rows_a, rows_b) -> str:
    return "\n\n".join(part for part in (_table_a(rows_a), _table_b(rows_b)) if part)


def _table_a(rows_a) -> str:
    if not rows_a:
        return ""
    lines = [
        "### A. Iterations and time to the tolerance (same problem, same start)",
        "",
        "| problem | solver | tol | iters to tol | time to tol [s] (median) | cost evals/iter | grad evals/iter "
        "| hess-vec/iter | final error (budget run) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows_a:
        lines.append(
            f"| {r['problem']} | {r['solver']} | {r['tol']:g} | {_f(r['iterations'], 'd')} | "
            f"{_f(r['time'], '.3f')} | {r['cost_per_it']:.2f} | {r['grad_per_it']:.2f} | "
            f"{r['hess_per_it']:.1f} | {r['final_error']:.1e} ({r['budget_iterations']} it, "
            f"{r['budget_time']:.1f} s) |"
        )
    return "\n".join(lines)


def _table_b(rows_b) -> str:
    if not rows_b:
        return ""
    lines = [
        "### B. Cost of one iteration: iMuon (spectral) vs SteepestDescent",
        "",
        "| problem | torch threads | iMuon ms/iter | SD ms/iter | ratio | iMuon cost evals/iter "
        "| SD cost evals/iter | iMuon grad evals/iter | SD grad evals/iter |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows_b:
        mu, sd = r["time_per_it:iMuon-spectral"], r["time_per_it:SD"]
        lines.append(
            f"| {r['problem']} | {r['threads']} | {mu * 1e3:.2f} | {sd * 1e3:.2f} | {mu / sd:.2f} | "
            f"{r['cost_per_it:iMuon-spectral']:.2f} | {r['cost_per_it:SD']:.2f} | "
            f"{r['grad_per_it:iMuon-spectral']:.2f} | {r['grad_per_it:SD']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (a smoke test, < 15 s)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (median); default 3, quick 1")
    parser.add_argument("--max-time", type=float, default=None, help="budget per traced run [s]; default 20")
    parser.add_argument("--iterations", type=int, default=None, help="iterations for part B; default 50")
    parser.add_argument(
        "--thread-sweep",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts for part B (default: --torch-threads only)",
    )
    parser.add_argument("--only", nargs="+", default=None, help="substrings of the problem names to run")
    parser.add_argument(
        "--part",
        choices=("A", "B", "both"),
        default="both",
        help="A: iterations and time to the tolerance; B: cost of one iteration (default both)",
    )
    parser.add_argument("--output", default=None, help="write the tables to this markdown file")
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="part B's clock: wall time of the run (default), or the CPU time of this process (time.process_time: "
        "other jobs on a loaded machine do not count; the run is single-threaded)",
    )
    cmp.add_thread_option(parser)
    args = parser.parse_args(argv)
    threads = cmp.set_torch_threads(args.torch_threads)
    repeats = args.repeats or (1 if args.quick else 3)
    max_time = args.max_time or (2.0 if args.quick else 20.0)
    iterations = args.iterations or (5 if args.quick else 50)
    sweep = args.thread_sweep or [threads]

    import torch

    parts = ([f"part A: {threads}"] if args.part in ("A", "both") else []) + (
        [f"part B: {', '.join(map(str, sweep))}"] if args.part in ("B", "both") else []
    )
    blas = "/".join(
        os.environ.get(name, "unset") for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    )
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    command = " ".join(["benchmarks/bench_pymanopt.py", *(sys.argv[1:] if argv is None else argv)])
    header = (
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}, torch {torch.__version__}; torch intra-op threads {'; '.join(parts)}; "
        f"OPENBLAS/OMP/MKL_NUM_THREADS {blas}; load average at start {load}\ncommand: {command}"
    )
    print(header, flush=True)
    start = time.time()
    cases = problems(args.quick)
    if args.only:
        cases = {k: v for k, v in cases.items() if any(s.lower() in k.lower() for s in args.only)}
    rows_a, rows_b = [], []
    for name, build in cases.items() if args.part in ("A", "both") else ():
        cmp.set_torch_threads(threads)
        rows_a += to_tolerance(
            name, build, repeats=repeats, max_time=max_time, max_iterations=20 if args.quick else 20000, progress=print
        )
    for name, build in cases.items() if args.part in ("B", "both") else ():
        for count in sweep:
            rows_b.append(
                per_iteration(
                    name, build, iterations=iterations, repeats=repeats, threads=count, progress=print, clock=args.clock
                )
            )
    cmp.set_torch_threads(threads)
    text = header + "\n\n" + tables(rows_a, rows_b) + f"\n\n(total benchmark time {time.time() - start:.0f} s)\n"
    print(text)
    if args.output:
        cmp.write_text(args.output, text)
    return {"to_tolerance": rows_a, "per_iteration": rows_b, "text": text}


if __name__ == "__main__":
    main()
