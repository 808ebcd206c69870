"""Benchmark: the Pymanopt iMuon solver with momentum on SymmetricPositiveDefinite (no timings, iteration counts).

Problem: ``min_{X > 0} ||X - T||_F^2`` from ``X0 = I``, optimum ``T`` (closed form), ``T`` a random SPD matrix with
log-uniform eigenvalues in ``[e^-2, e]`` and a random eigenbasis (it does not commute with the iterates).

A. *Constant steps.* ``eta = multiple * -ln(beta)`` for 250 iterations, then ``eta * 0.97^(t - 250)`` (350 more):
   the smallest eigenvalue of ``X`` over the run (against ``T``'s) and the final ``max|X - T|``. A collapse shows
   as an eigenvalue many decades below ``T``'s, a singular matrix (``LinAlgError``) or a final error near ``||T||``.
B. *Default Armijo rule.* Iterations to Pymanopt's ``min_gradient_norm`` (``1e-6``; at most 2000) per target, for
   momentum 0, 0.9 Nesterov and 0.9 heavy ball.

Run: ``python benchmarks/bench_spd_momentum.py`` (``--quick``: 2 targets, fewer cases, a smoke test).
"""

from __future__ import annotations

import argparse
import math
import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import pymanopt  # noqa: E402
from pymanopt import manifolds as pm  # noqa: E402

from imuon_manopt.optimizers import IMuon  # noqa: E402

N = 4
CONSTANT_STEPS = 250


def target(seed: int) -> np.ndarray:
    rng = np.random.default_rng(100 + seed)
    q = np.linalg.qr(rng.standard_normal((N, N)))[0]
    return (q * np.exp(rng.uniform(-2.0, 1.0, N))) @ q.T


def problem(t: np.ndarray):
    manifold = pm.SymmetricPositiveDefinite(N)

    @pymanopt.function.numpy(manifold)
    def cost(x):
        return float(np.sum((x - t) ** 2))

    @pymanopt.function.numpy(manifold)
    def egrad(x):
        return 2.0 * (x - t)

    return pymanopt.Problem(manifold, cost, euclidean_gradient=egrad)


def constant_steps(t: np.ndarray, beta: float, multiple: float, nesterov: bool) -> tuple[float, float]:
    """``(smallest eigenvalue over the run, final max|X - T|)``; ``(0, inf)`` when the run raised."""
    eta = multiple * -math.log(beta)
    opt = IMuon(
        step_size=lambda k: eta if k < CONSTANT_STEPS else eta * 0.97 ** (k - CONSTANT_STEPS),
        momentum=beta,
        nesterov=nesterov,
        max_iterations=CONSTANT_STEPS + 350,
        min_step_size=0.0,
        min_cost_change=None,
        verbosity=0,
        log_verbosity=1,
    )
    try:
        result = opt.run(problem(t), initial_point=np.eye(N))
    except np.linalg.LinAlgError:
        return 0.0, math.inf
    smallest = min(float(np.linalg.eigvalsh(p).min()) for p in result.log["iterations"]["point"])
    return smallest, float(np.abs(result.point - t).max())


def armijo_iterations(t: np.ndarray, beta: float, nesterov: bool) -> int:
    opt = IMuon(momentum=beta, nesterov=nesterov, max_iterations=2000, verbosity=0)
    return opt.run(problem(t), initial_point=np.eye(N)).iterations


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 targets, fewer cases (a smoke test)")
    args = parser.parse_args(argv)
    seeds = range(2) if args.quick else range(8)
    cases = (
        [(0.9, 1.0, True)]
        if args.quick
        else [(b, m, nv) for b in (0.8, 0.9, 0.95) for m in (1.0, 2.0) for nv in (True, False)]
    )

    rows_a = []
    print("A. constant steps multiple * -ln(beta), then decaying: smallest eigenvalue over the run / final max|X - T|")
    print("| beta | multiple | nesterov | " + " | ".join(f"T{s}" for s in seeds) + " |")
    print("|---|---|---|" + "---|" * len(seeds))
    for beta, multiple, nesterov in cases:
        cells = [constant_steps(target(s), beta, multiple, nesterov) for s in seeds]
        rows_a.append((beta, multiple, nesterov, cells))
        text = " | ".join(f"{lo:.1e} / {err:.0e}" for lo, err in cells)
        print(f"| {beta} | {multiple} | {nesterov} | {text} |")
    print("smallest eigenvalue of each T: " + ", ".join(f"{np.linalg.eigvalsh(target(s)).min():.2f}" for s in seeds))

    rows_b = []
    print("\nB. default Armijo rule: iterations to min_gradient_norm 1e-6")
    print("| momentum | " + " | ".join(f"T{s}" for s in seeds) + " | median |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for beta, nesterov in ((0.0, True), (0.9, True), (0.9, False)):
        its = [armijo_iterations(target(s), beta, nesterov) for s in seeds]
        rows_b.append((beta, nesterov, its))
        label = "0" if beta == 0.0 else f"{beta} {'Nesterov' if nesterov else 'heavy ball'}"
        print(f"| {label} | " + " | ".join(str(i) for i in its) + f" | {int(np.median(its))} |")
    return {"constant": rows_a, "armijo": rows_b}


if __name__ == "__main__":
    main()
