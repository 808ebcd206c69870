"""Karcher (Riemannian) mean of SPD matrices: iMuon against Pymanopt's solvers.

Problem: ``N`` symmetric positive-definite ``n x n`` matrices ``A_i``; minimize over SPD ``X``

    f(X) = 1/(2N) sum_i || logm(X^{-1/2} A_i X^{-1/2}) ||_F^2,

the mean squared affine-invariant distance. Pymanopt's ``SymmetricPositiveDefinite`` uses the affine-invariant
metric, under which ``grad f(X) = -(1/N) sum_i Log_X(A_i)``; the Euclidean gradient given to Pymanopt (explicit,
numpy) is ``-(1/N) sum_i X^{-1/2} logm(X^{-1/2} A_i X^{-1/2}) X^{-1/2}``.

Error: the affine-invariant distance ``||logm(X_*^{-1/2} X X_*^{-1/2})||_F`` to the mean ``X_*``, computed to high
accuracy beforehand by the fixed-point (Karcher flow) iteration ``X <- X^{1/2} expm(mean_i logm(X^{-1/2} A_i
X^{-1/2})) X^{1/2}``; for commuting matrices the mean is the closed form ``Q diag(geometric mean) Q^T``
(:func:`commuting_mean`, used by the tests to check the fixed point).

Solvers: iMuon (spectral = matrix-sign direction, and Frobenius), SteepestDescent and ConjugateGradient.
TrustRegions is left out: it needs a Hessian, which this example does not supply.

Run: ``python examples/karcher_mean.py`` (``--quick`` for a small version).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pymanopt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _compare as cmp  # noqa: E402

SOLVERS = ("iMuon-spectral", "iMuon-frobenius", "SD", "CG")
TOL = 1e-6


def _eig_fn(x: np.ndarray, fn) -> np.ndarray:
    """``fn`` applied to the eigenvalues of symmetric ``x`` (batched over leading dims)."""
    w, q = np.linalg.eigh(x)
    return (q * fn(w)[..., None, :]) @ np.swapaxes(q, -1, -2)


def _sym(x: np.ndarray) -> np.ndarray:
    return 0.5 * (x + np.swapaxes(x, -1, -2))


def spd_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Affine-invariant distance ``||logm(x^{-1/2} y x^{-1/2})||_F``."""
    xi = _eig_fn(x, lambda w: w**-0.5)
    return float(np.sqrt(np.sum(np.log(np.linalg.eigvalsh(_sym(xi @ y @ xi))) ** 2)))


def karcher_fixed_point(
    mats: np.ndarray, x0: np.ndarray | None = None, tol: float = 1e-13, max_iterations: int = 1000
) -> np.ndarray:
    """The Karcher mean by the fixed-point iteration, until ``||mean_i logm(X^{-1/2} A_i X^{-1/2})||_F < tol`` or
    until that residual stops decreasing (rounding level)."""
    x = np.mean(mats, axis=0) if x0 is None else x0
    previous = np.inf
    for _ in range(max_iterations):
        w, q = np.linalg.eigh(x)
        root, iroot = (q * np.sqrt(w)) @ q.T, (q / np.sqrt(w)) @ q.T
        step = np.mean(_eig_fn(_sym(iroot @ mats @ iroot), np.log), axis=0)
        x = _sym(root @ _eig_fn(_sym(step), np.exp) @ root)
        residual = np.linalg.norm(step)
        if residual < tol or (residual < 1e-9 and residual > 0.5 * previous):
            break
        previous = residual
    return x


def commuting_mean(q: np.ndarray, eigenvalues: np.ndarray) -> np.ndarray:
    """Closed form for ``A_i = Q diag(d_i) Q^T``: ``Q diag(prod_i d_i^(1/N)) Q^T``."""
    return (q * np.exp(np.mean(np.log(eigenvalues), axis=0))) @ q.T


def make_data(n: int = 20, count: int = 30, spread: float = 1.0, condition: float = 10.0, seed: int = 0):
    """``A_i = P expm(spread * S_i) P^T`` with ``S_i`` symmetric Gaussian (scaled by ``1/sqrt(n)``), ``P`` of the
    given condition number: a cloud of SPD matrices around ``P P^T``."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((n, n)))[0]
    v = np.linalg.qr(rng.standard_normal((n, n)))[0]
    p = (u * np.geomspace(1.0, 1.0 / np.sqrt(condition), n)) @ v.T
    s = _sym(rng.standard_normal((count, n, n))) * (spread / np.sqrt(n))
    return _sym(p @ _eig_fn(s, np.exp) @ p.T)


def make_problem(mats: np.ndarray, mean: np.ndarray | None = None):
    """Return ``(problem, initial_point, error, final_info, mean)``; the start is the first data matrix."""
    count, n, _ = mats.shape
    if mean is None:
        mean = karcher_fixed_point(mats)
    mani = pymanopt.manifolds.SymmetricPositiveDefinite(n)

    def whitened_logs(x):
        w, q = np.linalg.eigh(_sym(x))
        iroot = (q / np.sqrt(w)) @ q.T
        ev, eq = np.linalg.eigh(_sym(iroot @ mats @ iroot))
        return iroot, ev, eq

    @pymanopt.function.numpy(mani)
    def cost(x):
        _, ev, _ = whitened_logs(x)
        return float(np.sum(np.log(ev) ** 2) / (2 * count))

    @pymanopt.function.numpy(mani)
    def egrad(x):
        iroot, ev, eq = whitened_logs(x)
        logs = np.sum((eq * np.log(ev)[..., None, :]) @ np.swapaxes(eq, -1, -2), axis=0)
        return -_sym(iroot @ logs @ iroot) / count

    problem = pymanopt.Problem(mani, cost, euclidean_gradient=egrad)
    optimum = float(cost(mean))

    def error(x):
        return spd_distance(mean, x)

    def final_info(x):
        return {"cost_gap": abs(float(cost(x)) - optimum) / max(optimum, 1e-300)}

    return problem, mats[0].copy(), error, final_info, mean


def run(
    n: int = 20,
    count: int = 30,
    spreads=(0.5, 2.0),
    condition: float = 10.0,
    solvers=SOLVERS,
    max_iterations: int = 2000,
    max_time: float = 10.0,
    min_gradient_norm: float = 1e-10,
    seed: int = 0,
    progress=print,
) -> list[cmp.Record]:
    """One problem per data spread; returns the records."""
    records = []
    for spread in spreads:
        mats = make_data(n, count, spread, condition, seed)
        problem, x0, error, final_info, _ = make_problem(mats)
        factories = cmp.solver_set(
            solvers, max_iterations=max_iterations, max_time=max_time, min_gradient_norm=min_gradient_norm
        )
        name = f"Karcher SPD({n}) N={count} spread={spread:g}"
        records += cmp.compare(
            problem, x0, factories, error, problem_name=name, progress=progress, final_info=final_info
        )
    return records


def report(records: list[cmp.Record], output: str | None, tol: float = TOL, stem: str = "karcher_mean") -> str:
    """Tables and verdicts as markdown (printed by :func:`main`); writes ``<stem>.md`` and ``<stem>.png``."""
    return cmp.grouped_report(
        records,
        output,
        heading="Karcher mean on SPD; error = affine-invariant distance to the mean",
        tol=tol,
        extra=[("rel. cost gap", "cost_gap", ".1e")],
        stem=stem,
        plot_title="Karcher mean (SPD)",
    )


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n=8, N=10, one spread, short budgets")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--count", type=int, default=None, help="number of matrices N")
    parser.add_argument("--spreads", type=float, nargs="+", default=None)
    cmp.add_common_options(parser)
    return parser.parse_args(argv)


def main(argv=None, progress=print) -> list[cmp.Record]:
    args = parse(argv)
    cmp.set_torch_threads(args.torch_threads)
    n, count, spreads, budget = (8, 10, (1.0,), 3.0) if args.quick else (20, 30, (0.5, 2.0), 10.0)
    records = run(
        n=args.n or n,
        count=args.count or count,
        spreads=tuple(args.spreads or spreads),
        max_time=args.max_time or budget,
        seed=args.seed,
        progress=progress,
    )
    print(report(records, args.output))
    if args.output:
        print(f"tables and plot written to {os.path.abspath(args.output)}")
    return records


if __name__ == "__main__":
    main()
