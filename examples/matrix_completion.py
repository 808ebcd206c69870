"""Low-rank matrix completion on ``FixedRankEmbedded``, and the factor-gauge experiment.

Problem: recover a rank-``r`` matrix ``M`` (``m x n``) from ``|Omega| = 5 r (m + n)`` entries sampled uniformly
without replacement,

    min over rank-r X:  f(X) = 1/2 || P_Omega(X - M) ||_F^2,

with ``M = U diag(sigma) V^T``, ``sigma`` geometrically spaced from ``sigma_1`` to ``sigma_1 / kappa``
(``sigma_1 = sqrt(m n / r)``, so that the entries are of order one). Error: ``||X - M||_F / ||M||_F`` on all entries.

Part 1 (``FixedRankEmbedded(m, n, r)``, point ``(u, s, vt)``): iMuon with the spectral and the Frobenius norm against
Pymanopt's SteepestDescent and ConjugateGradient, for several ``kappa``, from two starts shared by all solvers:

- *random*: random orthonormal ``u``, ``v`` and distinct singular values around ``||M||_F / sqrt(r)`` (estimated from
  the observed entries);
- *spectral*: the top-``r`` SVD of the rescaled observed matrix ``(m n / |Omega|) P_Omega(M)``.

Part 2, the gauge experiment (``kappa = 1``): the same problem written with factors,
``Product([Euclidean(m, r), Euclidean(r, n)])`` and ``f(B, A) = 1/2 ||P_Omega(B A - M)||^2``, solved by Pymanopt's
SteepestDescent / ConjugateGradient (and iMuon on the factors, i.e. Muon on each factor) from the balanced factors of
the random start, ``B = u s^{1/2}``, ``A = s^{1/2} vt``, and from the unbalanced ``(B D, D^{-1} A)`` with
``D = diag(geomspace(1, 1e3, r))`` and ``D = 100 I``. All of them represent the same matrix ``B A``. iMuon on
``FixedRankEmbedded`` sees the same point for every balance, so its run does not change.

Time budget: ``--max-time`` seconds per run (4 s by default; ``--quick`` uses small sizes and 1.5 s).
Run: ``python examples/matrix_completion.py`` (``--quick``, ``--kappas 1 100``, ``--help``).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np
import pymanopt
import scipy.sparse as sp
from pymanopt.manifolds.fixed_rank import _FixedRankPoint, _FixedRankTangentVector

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _compare as cmp  # noqa: E402

SOLVERS = ("iMuon-spectral", "iMuon-frobenius", "SD", "CG")
GAUGE_SOLVERS = ("SD", "CG", "iMuon-spectral")
TOL = 1e-3


@dataclass
class Completion:
    """A completion instance: ground truth, sample pattern (CSR order) and observed values."""

    m: int
    n: int
    r: int
    kappa: float
    truth: np.ndarray  # (m, n); small enough to form here
    rows: np.ndarray
    cols: np.ndarray
    indptr: np.ndarray
    observed: np.ndarray

    @property
    def count(self) -> int:
        return self.rows.size

    def sample(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Entries of ``left @ right`` on Omega: O(|Omega| r) gathers for large matrices; below a million entries the
        dense product (O(m n r) flops, one BLAS call) is faster."""
        if self.m * self.n <= 1_000_000:
            return (left @ right).ravel()[self.rows * self.n + self.cols]
        return np.einsum("ij,ji->i", left[self.rows], right[:, self.cols])

    def residual(self, values: np.ndarray) -> sp.csr_matrix:
        """The sparse ``P_Omega(X - M)`` from the sampled entries of ``X``."""
        return sp.csr_matrix((values - self.observed, self.cols, self.indptr), shape=(self.m, self.n))

    def error(self, product: np.ndarray) -> float:
        return float(np.linalg.norm(product - self.truth) / np.linalg.norm(self.truth))


def make_completion(
    m: int = 200, n: int = 200, r: int = 5, kappa: float = 1.0, oversampling: float = 5.0, seed: int = 0
) -> Completion:
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((m, r)))[0]
    v = np.linalg.qr(rng.standard_normal((n, r)))[0]
    sigma = np.sqrt(m * n / r) * np.geomspace(1.0, 1.0 / kappa, r)
    truth = (u * sigma) @ v.T
    count = min(int(oversampling * r * (m + n)), m * n)
    flat = np.sort(rng.choice(m * n, size=count, replace=False))  # sorted = CSR order
    rows, cols = np.divmod(flat, n)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=m))])
    return Completion(m, n, r, kappa, truth, rows, cols, indptr, truth[rows, cols])


def random_start(data: Completion, seed: int = 1) -> _FixedRankPoint:
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((data.m, data.r)))[0]
    vt = np.linalg.qr(rng.standard_normal((data.n, data.r)))[0].T
    scale = np.linalg.norm(data.observed) * np.sqrt(data.m * data.n / data.count) / np.sqrt(data.r)
    # Distinct singular values (Pymanopt's FixedRankEmbedded.euclidean_to_riemannian_gradient, used by callers that
    # pass factor gradients, returns NaN at a point with repeated singular values).
    return _FixedRankPoint(u, scale * np.linspace(1.25, 0.75, data.r), vt)


def spectral_start(data: Completion) -> _FixedRankPoint:
    rescaled = data.residual(np.zeros(data.count)) * (-data.m * data.n / data.count)  # (mn/|Omega|) P_Omega(M)
    u, s, vt = np.linalg.svd(rescaled.toarray(), full_matrices=False)
    return _FixedRankPoint(u[:, : data.r], s[: data.r], vt[: data.r])


def fixed_rank_problem(data: Completion) -> pymanopt.Problem:
    mani = pymanopt.manifolds.FixedRankEmbedded(data.m, data.n, data.r)

    @pymanopt.function.numpy(mani)
    def cost(u, s, vt):
        diff = data.sample(u * s, vt) - data.observed
        return 0.5 * float(diff @ diff)

    @pymanopt.function.numpy(mani)
    def rgrad(u, s, vt):
        # The projection of the sparse residual Gamma onto the tangent space: (Up, M, Vp) with M = U^T Gamma V,
        # Up = Gamma V - U M, Vp = Gamma^T U - V M^T. Supplied directly because Pymanopt's conversion from the
        # factor gradients (du, ds, dvt) divides by s_j^2 - s_i^2, which loses all accuracy (and gives NaN) as the
        # singular values approach each other -- they do at kappa = 1, where the solution has equal ones.
        res = data.residual(data.sample(u * s, vt))
        res_v = res @ vt.T  # (m, r)
        res_tu = res.T @ u  # (n, r)
        middle = u.T @ res_v
        return _FixedRankTangentVector(res_v - u @ middle, middle, res_tu - vt.T @ middle.T)

    return pymanopt.Problem(mani, cost, riemannian_gradient=rgrad)


def factor_problem(data: Completion) -> pymanopt.Problem:
    mani = pymanopt.manifolds.Product(
        [pymanopt.manifolds.Euclidean(data.m, data.r), pymanopt.manifolds.Euclidean(data.r, data.n)]
    )

    @pymanopt.function.numpy(mani)
    def cost(b, a):
        diff = data.sample(b, a) - data.observed
        return 0.5 * float(diff @ diff)

    @pymanopt.function.numpy(mani)
    def egrad(b, a):
        res = data.residual(data.sample(b, a))
        return res @ a.T, (res.T @ b).T

    return pymanopt.Problem(mani, cost, euclidean_gradient=egrad)


def _copy_fixed_rank(x):
    return _FixedRankPoint(x[0].copy(), x[1].copy(), x[2].copy())


def run_fixed_rank(
    data: Completion,
    starts=("random", "spectral"),
    solvers=SOLVERS,
    max_time: float = 4.0,
    max_iterations: int = 20000,
    min_gradient_norm: float = 1e-6,
    progress=print,
    seed: int = 1,
) -> list[cmp.Record]:
    problem = fixed_rank_problem(data)

    def error(x):
        return data.error((x[0] * x[1]) @ x[2])

    records = []
    for start in starts:
        x0 = random_start(data, seed) if start == "random" else spectral_start(data)
        factories = cmp.solver_set(
            solvers, max_iterations=max_iterations, max_time=max_time, min_gradient_norm=min_gradient_norm
        )
        name = f"completion kappa={data.kappa:g} {start} start"
        group = cmp.compare(
            problem, x0, factories, error, problem_name=name, progress=progress, copy_start=_copy_fixed_rank
        )
        for r in group:
            r.info.update(kappa=data.kappa, start=start, start_error=error(x0))
        records += group
    return records


def gauge_starts(x0: _FixedRankPoint) -> dict[str, list[np.ndarray]]:
    """Balanced factors of ``x0`` and two unbalanced versions ``(B D, D^{-1} A)`` of the same product."""
    u, s, vt = x0
    b, a = u * np.sqrt(s), np.sqrt(s)[:, None] * vt
    d = np.geomspace(1.0, 1e3, s.size)
    return {
        "balanced": [b, a],
        "D=diag(geomspace(1,1e3))": [b * d, a / d[:, None]],
        "D=100 I": [100.0 * b, a / 100.0],
    }


def run_gauge(
    data: Completion,
    solvers=GAUGE_SOLVERS,
    max_time: float = 4.0,
    max_iterations: int = 20000,
    min_gradient_norm: float = 1e-6,
    progress=print,
    seed: int = 1,
) -> list[cmp.Record]:
    """Factor solvers from balanced and unbalanced starts, and iMuon on FixedRankEmbedded from the same products."""
    factors = factor_problem(data)
    embedded = fixed_rank_problem(data)
    x0 = random_start(data, seed)
    factories = cmp.solver_set(
        solvers, max_iterations=max_iterations, max_time=max_time, min_gradient_norm=min_gradient_norm
    )
    imuon = cmp.solver_set(
        ["iMuon-spectral"], max_iterations=max_iterations, max_time=max_time, min_gradient_norm=min_gradient_norm
    )

    def factor_error(x):
        return data.error(x[0] @ x[1])

    def embedded_error(x):
        return data.error((x[0] * x[1]) @ x[2])

    records = []
    for label, (b, a) in gauge_starts(x0).items():
        group = cmp.compare(
            factors,
            [b, a],
            {f"{k} (factors)": f for k, f in factories.items()},
            factor_error,
            problem_name=f"gauge {label}",
            progress=progress,
            copy_start=lambda p: [p[0].copy(), p[1].copy()],
        )
        # The same matrix B A as a point of FixedRankEmbedded: its (u, s, vt) does not depend on the balance.
        qb, rb = np.linalg.qr(b)
        qa, ra = np.linalg.qr(a.T)
        w, s, zt = np.linalg.svd(rb @ ra.T)
        point = _FixedRankPoint(qb @ w, s, (qa @ zt.T).T)
        group += cmp.compare(
            embedded,
            point,
            {"iMuon-spectral (FixedRankEmbedded)": imuon["iMuon-spectral"]},
            embedded_error,
            problem_name=f"gauge {label}",
            progress=progress,
            copy_start=_copy_fixed_rank,
        )
        for r in group:
            r.info.update(balance=label, start_error=factor_error([b, a]))
        records += group
    return records


def _groups(records):
    groups: dict[str, list[cmp.Record]] = {}
    for r in records:
        groups.setdefault(r.problem, []).append(r)
    return groups


def completion_summary(records: list[cmp.Record], tol: float = TOL) -> list[str]:
    """Verdict lines per (kappa, start), computed from the records."""
    lines = []
    for name, group in _groups(records).items():
        lines.append(f"- {name}: " + cmp.verdict(group, tol))
    return lines


def gauge_summary(records: list[cmp.Record], tol: float = TOL) -> list[str]:
    """How much each solver's iterations/time to ``tol`` change between the balanced and unbalanced starts."""
    by_solver: dict[str, dict[str, cmp.Record]] = {}
    for r in records:
        by_solver.setdefault(r.solver, {})[r.info["balance"]] = r
    lines = []
    for solver, runs in by_solver.items():
        cells = []
        for label, r in runs.items():
            it, sec = r.reached(tol)
            cells.append(
                f"{label}: "
                + (
                    f"{it} it / {sec:.2f} s"
                    if it is not None
                    else f"not reached ({r.iterations} it, error {r.error:.1e})"
                )
            )
        its = [r.reached(tol)[0] for r in runs.values()]
        if all(i is not None for i in its) and max(its) == min(its):
            tag = "unaffected by the balance"
        elif any(i is None for i in its):
            tag = "slowed down by the balance: did not reach the tolerance from every start"
        else:
            tag = f"slowed down by the balance: {max(its) / max(min(its), 1):.1f}x more iterations at worst"
        lines.append(f"- {solver}: {tag} ({'; '.join(cells)})")
    return lines


def report(
    fixed: list[cmp.Record],
    gauge: list[cmp.Record],
    output: str | None,
    tol: float = TOL,
    stem: str = "matrix_completion",
) -> str:
    lines = [f"## Matrix completion on FixedRankEmbedded; error = relative Frobenius error, tolerance {tol:g}", ""]
    extra = [("start error", "start_error", ".2e")]
    for name, group in _groups(fixed).items():
        lines += [f"### {name}", "", cmp.markdown_table(group, tol, extra=extra), ""]
    if fixed:
        lines += ["Verdicts:", "", *completion_summary(fixed, tol), ""]
    if gauge:
        lines += ["## Gauge experiment (kappa = 1): factors (B D, D^-1 A) vs FixedRankEmbedded", ""]
        for name, group in _groups(gauge).items():
            lines += [f"### {name}", "", cmp.markdown_table(group, tol), ""]
        lines += ["Verdicts:", "", *gauge_summary(gauge, tol), ""]
    text = "\n".join(lines)
    if output:
        cmp.write_text(os.path.join(output, f"{stem}.md"), text)
        if fixed:
            cmp.plot(_groups(fixed), os.path.join(output, f"{stem}.png"), tol=tol, title="Matrix completion")
        if gauge:
            cmp.plot(_groups(gauge), os.path.join(output, f"{stem}_gauge.png"), tol=tol, title="Gauge experiment")
    return text


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100x100, rank 3, kappa 1 and 100, 1.5 s per run")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("M", "N"))
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--kappas", type=float, nargs="+", default=None)
    parser.add_argument("--starts", nargs="+", default=("random", "spectral"), choices=("random", "spectral"))
    parser.add_argument("--no-gauge", action="store_true", help="skip the gauge experiment")
    cmp.add_common_options(parser)
    return parser.parse_args(argv)


def main(argv=None, progress=print) -> list[cmp.Record]:
    args = parse(argv)
    cmp.set_torch_threads(args.torch_threads)
    if args.quick:
        size, rank, kappas, budget = (100, 100), 3, (1.0, 100.0), 1.5
    else:
        size, rank, kappas, budget = (200, 200), 5, (1.0, 10.0, 100.0, 1000.0), 4.0
    m, n = args.size or size
    rank = args.rank or rank
    budget = args.max_time or budget
    fixed = []
    for kappa in args.kappas or kappas:
        data = make_completion(m, n, rank, kappa, seed=args.seed)
        fixed += run_fixed_rank(data, starts=args.starts, max_time=budget, progress=progress)
    gauge = []
    if not args.no_gauge:
        gauge = run_gauge(make_completion(m, n, rank, 1.0, seed=args.seed), max_time=budget, progress=progress)
    print(report(fixed, gauge, args.output))
    if args.output:
        print(f"tables and plots written to {os.path.abspath(args.output)}")
    return fixed + gauge


if __name__ == "__main__":
    main()
