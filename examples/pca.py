"""Dominant subspace (PCA) on the Grassmann and Stiefel manifolds: iMuon against Pymanopt's solvers.

Problem: ``min_X f(X) = -tr(X^T C X)`` over ``n x p`` matrices with orthonormal columns, for a covariance
``C = Q diag(lambda) Q^T`` with a known spectrum: the top ``p`` eigenvalues span ``[0.5, 1]`` and the eigengap
``lambda_p - lambda_{p+1}`` is ``gap``. The minimum is ``-(lambda_1 + ... + lambda_p)``, attained on the dominant
subspace ``span(Q[:, :p])``.

Errors: the relative cost error ``|sum_{i<=p} lambda_i + f(X)| / sum_{i<=p} lambda_i`` (the traced error) and the
principal-angle distance ``sin(theta_max)`` between ``span(X)`` and the dominant subspace (final points).

Real data: ``C`` the covariance of scikit-learn's bundled handwritten digits (1797 images of 8 x 8 pixels,
intensities scaled to ``[0, 1]``, centered), ``n = 64``, ``p = 10`` by default (eigengap
``(lambda_10 - lambda_11) / lambda_10 = 0.23``; the top 10 directions hold 74% of the variance). The reference is the
exact top-``p`` eigenspace of ``C`` (``eigh``); the table adds the captured variance ``tr(X^T C X) / sum_{i<=p}
lambda_i`` (one minus the traced error).

Solvers (same start, same stopping rules): iMuon (spectral and Frobenius), SteepestDescent, ConjugateGradient and
TrustRegions (``C`` gives the Hessian ``-2 C U`` in closed form).

Run: ``python examples/pca.py`` (``--quick`` for a small version, ``--help`` for the options).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np
import pymanopt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _compare as cmp  # noqa: E402

SOLVERS = ("iMuon-spectral", "iMuon-frobenius", "SD", "CG", "TR")
TOL = 1e-8


def spectrum(n: int, p: int, gap: float) -> np.ndarray:
    """Eigenvalues: ``p`` of them evenly in ``[0.5, 1]``, then ``n - p`` evenly in ``[0, 0.5 - gap]``."""
    return np.concatenate([np.linspace(1.0, 0.5, p), np.linspace(0.5 - gap, 0.0, n - p)])


@functools.lru_cache(maxsize=2)
def covariance(n: int, p: int, gap: float, seed: int = 0):
    """``(C, Q[:, :p], optimum, X0)``: the covariance, its dominant subspace, ``sum_{i<=p} lambda_i`` and a start."""
    rng = np.random.default_rng(seed)
    lam = spectrum(n, p, gap)
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    cov = (q * lam) @ q.T
    cov = 0.5 * (cov + cov.T)
    x0 = np.linalg.qr(rng.standard_normal((n, p)))[0]
    return cov, q[:, :p].copy(), float(lam[:p].sum()), x0


@functools.lru_cache(maxsize=2)
def digits_covariance(p: int = 10, seed: int = 0):
    """``(C, top, optimum, X0)`` for the digits: the ``64 x 64`` covariance of the centered pixel rows (scaled to
    ``[0, 1]``), its exact top-``p`` eigenvectors (``eigh``), ``sum_{i<=p} lambda_i`` and a random orthonormal start."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits case needs scikit-learn: pip install -e '.[examples]'") from exc
    x = load_digits().data / 16.0
    x = x - x.mean(axis=0)
    cov = x.T @ x / x.shape[0]
    cov = 0.5 * (cov + cov.T)
    lam, vec = np.linalg.eigh(cov)
    lam, vec = lam[::-1], vec[:, ::-1]
    if not 0 < p < cov.shape[0]:
        raise ValueError(f"p={p} must lie in 1..{cov.shape[0] - 1} for the 64-pixel digits")
    x0 = np.linalg.qr(np.random.default_rng(seed).standard_normal((cov.shape[0], p)))[0]
    return cov, vec[:, :p].copy(), float(lam[:p].sum()), x0


def make_problem(
    n: int = 1000, p: int = 10, gap: float = 0.01, manifold: str = "grassmann", seed: int = 0, backend: str = "numpy"
):
    """Return ``(problem, initial_point, error, final_info)`` for one manifold (``"grassmann"`` or ``"stiefel"``);
    ``backend="autograd"`` differentiates the cost with autograd instead of the explicit gradient."""
    return problem_for(*covariance(n, p, gap, seed), manifold, backend=backend)


def make_digits_problem(p: int = 10, manifold: str = "grassmann", seed: int = 0):
    """:func:`make_problem` for the covariance of the digits (:func:`digits_covariance`)."""
    return problem_for(*digits_covariance(p, seed), manifold)


def problem_for(
    cov: np.ndarray, top: np.ndarray, optimum: float, x0: np.ndarray, manifold: str, backend: str = "numpy"
):
    """``(problem, initial_point, error, final_info)`` of ``min -tr(X^T C X)`` on ``manifold`` (``"grassmann"`` or
    ``"stiefel"``) for ``C`` (``n x n``) with dominant subspace ``span(top)`` (``n x p``) and optimum ``-optimum``.
    ``final_info`` gives ``sin_theta`` (largest principal angle to ``span(top)``) and ``captured``
    (``tr(X^T C X) / optimum``). ``backend``: ``"numpy"`` (explicit gradient and Hessian) or ``"autograd"`` (the
    cost only, differentiated by autograd)."""
    n, p = top.shape
    x0 = x0.copy()

    if manifold == "grassmann":
        mani = pymanopt.manifolds.Grassmann(n, p)
    elif manifold == "stiefel":
        mani = pymanopt.manifolds.Stiefel(n, p)
    else:
        raise ValueError(f"unknown manifold {manifold!r}")

    @pymanopt.function.numpy(mani)
    def cost(x):
        return -np.sum(x * (cov @ x))

    @pymanopt.function.numpy(mani)
    def egrad(x):
        return -2.0 * (cov @ x)

    @pymanopt.function.numpy(mani)
    def ehess(x, u):
        return -2.0 * (cov @ u)

    if backend == "autograd":
        import autograd.numpy as anp

        @pymanopt.function.autograd(mani)
        def autograd_cost(x):
            return -anp.sum(x * (cov @ x))

        problem = pymanopt.Problem(mani, autograd_cost)
    elif backend == "numpy":
        problem = pymanopt.Problem(mani, cost, euclidean_gradient=egrad, euclidean_hessian=ehess)
    else:
        raise ValueError(f"unknown backend {backend!r}; expected 'numpy' or 'autograd'")

    def error(x):
        return abs(optimum - float(np.sum(x * (cov @ x)))) / optimum

    def final_info(x):
        qx = np.linalg.qr(x)[0]
        cosines = np.clip(np.linalg.svd(top.T @ qx, compute_uv=False), 0.0, 1.0)
        return {
            "sin_theta": float(np.sqrt(max(0.0, 1.0 - cosines.min() ** 2))),
            "captured": float(np.sum(x * (cov @ x))) / optimum,
        }

    return problem, x0, error, final_info


def run(
    n: int = 1000,
    p: int = 10,
    gap: float = 0.01,
    manifolds=("grassmann", "stiefel"),
    solvers=SOLVERS,
    max_iterations: int = 3000,
    max_time: float = 10.0,
    min_gradient_norm: float = 1e-9,
    seed: int = 0,
    progress=print,
    data: str = "synthetic",
) -> list[cmp.Record]:
    """Run every solver on every manifold; returns the records (``record.problem`` names the data and manifold).

    ``data="synthetic"``: the covariance with the known spectrum (``n``, ``p``, ``gap``); ``data="digits"``: the
    digits' covariance (``n = 64``; ``p`` as given, ``gap`` unused).
    """
    if data not in ("synthetic", "digits"):
        raise ValueError(f"unknown data {data!r}; expected 'synthetic' or 'digits'")
    records = []
    for manifold in manifolds:
        if data == "digits":
            problem, x0, error, final_info = make_digits_problem(p, manifold, seed)
            name = f"PCA digits {manifold.capitalize()}(64,{p})"
        else:
            problem, x0, error, final_info = make_problem(n, p, gap, manifold, seed)
            name = f"PCA {manifold.capitalize()}({n},{p}) gap={gap:g}"
        factories = cmp.solver_set(
            solvers, max_iterations=max_iterations, max_time=max_time, min_gradient_norm=min_gradient_norm
        )
        records += cmp.compare(
            problem, x0, factories, error, problem_name=name, progress=progress, final_info=final_info
        )
    return records


def report(records: list[cmp.Record], output: str | None, tol: float = TOL, stem: str = "pca") -> str:
    """Tables and verdicts as markdown (printed by :func:`main`); writes ``<stem>.md`` and ``<stem>.png``."""
    return cmp.grouped_report(
        records,
        output,
        heading="Dominant subspace (PCA); error = relative cost error",
        tol=tol,
        extra=[("sin theta", "sin_theta", ".1e"), ("captured var.", "captured", ".10f")],
        stem=stem,
        plot_title="Dominant subspace (PCA)",
    )


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (n=200, p=5, gap 0.05), short budgets")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--p", type=int, default=None)
    parser.add_argument("--gap", type=float, default=None)
    parser.add_argument(
        "--data",
        choices=("synthetic", "digits", "all"),
        default="all",
        help="the synthetic covariance, the digits' covariance, or both (default)",
    )
    parser.add_argument("--digits-p", type=int, default=10, help="subspace dimension for the digits (default 10)")
    cmp.add_common_options(parser, output_help="folder for pca.md / pca.png")
    return parser.parse_args(argv)


def main(argv=None, progress=print) -> list[cmp.Record]:
    args = parse(argv)
    cmp.set_torch_threads(args.torch_threads)
    n, p, gap, budget = (200, 5, 0.05, 3.0) if args.quick else (1000, 10, 0.01, 10.0)
    records = []
    if args.data in ("synthetic", "all"):
        records += run(
            n=args.n or n,
            p=args.p or p,
            gap=args.gap or gap,
            max_time=args.max_time or budget,
            seed=args.seed,
            progress=progress,
        )
    if args.data in ("digits", "all"):
        records += run(
            p=args.digits_p, max_time=args.max_time or budget, seed=args.seed, progress=progress, data="digits"
        )
    print(report(records, args.output))
    if args.output:
        print(f"tables and plot written to {os.path.abspath(args.output)}")
    return records


if __name__ == "__main__":
    main()
