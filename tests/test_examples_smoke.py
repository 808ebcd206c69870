"""Smoke tests of the Pymanopt examples and of benchmarks/bench_pymanopt.py (small sizes, short budgets).

Each example's ``main`` runs with ``--quick`` and must write its table and plot and reach a stated accuracy on the
easy cases.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

pytest.importorskip("matplotlib")

import _compare as cmp  # noqa: E402
import karcher_mean  # noqa: E402
import matrix_completion  # noqa: E402
import pca  # noqa: E402


def _quiet(_line: str) -> None:
    pass


def _by(records, solver, problem_contains=""):
    return [r for r in records if r.solver == solver and problem_contains in r.problem]


def _files(folder, *names):
    for name in names:
        path = os.path.join(folder, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, f"{name} was not written"


def test_pca_quick(tmp_path, capsys):
    records = pca.main(["--quick", "--max-time", "3", "--output", str(tmp_path)], progress=_quiet)
    _files(tmp_path, "pca.md", "pca.png")
    printed = capsys.readouterr().out
    assert "| iMuon-spectral |" in printed and "### PCA digits Grassmann(64,10)" in printed
    for data in ("gap=", "digits"):
        for manifold in ("Grassmann", "Stiefel"):
            group = [r for r in records if data in r.problem and manifold in r.problem]
            assert {r.solver for r in group} == set(pca.SOLVERS)
            (imuon,) = _by(group, "iMuon-spectral")
            assert imuon.error < 1e-6, (data, manifold, imuon.error)
            assert imuon.info["sin_theta"] < 1e-3
            assert abs(imuon.info["captured"] - 1.0) < 1e-6
            assert imuon.trace_error.size > 2 and imuon.trace_error[0] > imuon.trace_error[-1]
            # the same start for everyone: identical initial errors
            first = {r.trace_error[0] for r in group}
            assert max(first) - min(first) < 1e-12


def test_pca_digits_reaches_sklearn_pca_subspace():
    """iMuon on the digits' covariance finds the subspace of scikit-learn's PCA (an independent SVD of the data)."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    pixels = load_digits().data / 16.0
    reference = PCA(n_components=10, svd_solver="full").fit(pixels)
    centered = pixels - pixels.mean(axis=0)
    n = 1797  # scikit-learn's variances divide by n - 1, the example's covariance by n
    optimum = float(reference.explained_variance_.sum()) * (n - 1) / n
    for manifold in ("grassmann", "stiefel"):
        problem, x0, error, _ = pca.make_digits_problem(10, manifold)
        solver = cmp.imuon("spectral", **cmp.stopping(max_iterations=500, max_time=20.0, min_gradient_norm=1e-10))
        x = cmp.run_solver(problem, solver, x0, error, trace=False, keep_point=True).point
        assert np.allclose(x.T @ x, np.eye(10), atol=1e-10)
        cosines = np.linalg.svd(reference.components_ @ x, compute_uv=False)
        assert cosines.min() > 1 - 1e-12, manifold  # sin(theta_max) < ~1.4e-6
        captured = float(np.sum((centered @ x) ** 2)) / n  # variance of the data along span(X)
        assert abs(captured - optimum) < 1e-10 * optimum, manifold


def test_karcher_quick(tmp_path):
    records = karcher_mean.main(["--quick", "--max-time", "3", "--output", str(tmp_path)], progress=_quiet)
    _files(tmp_path, "karcher_mean.md", "karcher_mean.png")
    (imuon,) = _by(records, "iMuon-spectral")
    assert imuon.error < 1e-5, imuon.error


def test_karcher_fixed_point_matches_closed_form():
    rng = np.random.default_rng(3)
    q = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    eigenvalues = np.exp(rng.standard_normal((7, 5)))
    mats = np.einsum("ij,kj,lj->kil", q, eigenvalues, q)  # Q diag(d_k) Q^T
    mean = karcher_mean.karcher_fixed_point(mats)
    assert np.allclose(mean, karcher_mean.commuting_mean(q, eigenvalues), rtol=1e-10, atol=1e-12)


def test_matrix_completion_quick(tmp_path):
    records = matrix_completion.main(
        ["--quick", "--kappas", "1", "--no-gauge", "--max-time", "3", "--output", str(tmp_path)], progress=_quiet
    )
    _files(tmp_path, "matrix_completion.md", "matrix_completion.png")
    for start in ("random", "spectral"):
        (imuon,) = _by(records, "iMuon-spectral", f"kappa=1 {start}")
        assert imuon.error < 1e-3, (start, imuon.error)


def test_gauge_experiment_small(tmp_path):
    data = matrix_completion.make_completion(60, 60, 2, 1.0)
    records = matrix_completion.run_gauge(data, solvers=("SD",), max_time=0.3, progress=_quiet)
    text = matrix_completion.report([], records, str(tmp_path))
    _files(tmp_path, "matrix_completion.md", "matrix_completion_gauge.png")
    assert "Gauge experiment" in text
    # the embedded iMuon run does not depend on the balance of the factors (same product = same point)
    embedded = _by(records, "iMuon-spectral (FixedRankEmbedded)")
    assert len(embedded) == 3
    first = [r.trace_error[:10] for r in embedded]
    for trace in first[1:]:
        assert np.allclose(trace, first[0], rtol=1e-6, atol=1e-12)
    # SteepestDescent on the factors: the unbalanced starts are worse than the balanced one after the same budget
    sd = {r.info["balance"]: r for r in _by(records, "SD (factors)")}
    assert sd["D=100 I"].error > sd["balanced"].error


def test_gauge_starts_same_product():
    data = matrix_completion.make_completion(30, 20, 2, 1.0)
    starts = matrix_completion.gauge_starts(matrix_completion.random_start(data))
    products = [b @ a for b, a in starts.values()]
    for p in products[1:]:
        assert np.allclose(p, products[0], rtol=1e-10, atol=1e-8)


def test_markdown_table_and_verdict():
    r = cmp.Record(
        problem="p",
        solver="iMuon",
        iterations=3,
        time=0.1,
        cost=1.0,
        error=1e-9,
        stop="grad norm",
        cost_evaluations=4,
        gradient_evaluations=4,
        trace_step=np.arange(4),
        trace_time=np.array([0.0, 0.01, 0.02, 0.03]),
        trace_cost=np.ones(4),
        trace_error=np.array([1.0, 1e-2, 1e-5, 1e-9]),
    )
    assert r.reached(1e-4) == (2, 0.02)
    assert r.reached(1e-9) == (3, 0.03)
    assert r.reached(1e-12) == (None, None)
    table = cmp.markdown_table([r], 1e-4)
    assert table.count("\n") == 2 and "| iMuon | 3 |" in table
    assert "fastest iMuon" in cmp.verdict([r], 1e-4)


def test_bench_quick(tmp_path):
    import bench_pymanopt

    out = tmp_path / "bench.md"
    result = bench_pymanopt.main(["--quick", "--only", "Grassmann", "completion", "--output", str(out)])
    assert out.is_file()
    assert result["to_tolerance"] and result["per_iteration"]
    for row in result["per_iteration"]:
        assert row["time_per_it:iMuon-spectral"] > 0 and row["time_per_it:SD"] > 0


@pytest.mark.slow
def test_main_demo_quick_writes_every_table_and_plot(tmp_path, capsys):
    """The README's main job (``examples/demo.py``), in its quick form: every section runs and writes its
    outputs; the summary holds the core checks and the torch examples' tables."""
    import demo

    runs = demo.main(["--quick", "--output", str(tmp_path)])
    assert {"pca", "karcher_mean", "matrix_completion", "torch_stiefel", "torch_lora"} <= set(runs)
    _files(
        tmp_path,
        "summary.md",
        "pca.png",
        "karcher_mean.png",
        "matrix_completion.png",
        "matrix_completion_gauge.png",
        "torch_stiefel.png",
        "torch_spd.png",
        "torch_grassmann.png",
        "torch_lora.png",
    )
    summary = (tmp_path / "summary.md").read_text()
    assert "Core: closed-form iMuon directions" in summary and "| no |" not in summary
    assert "examples/torch_lora.py" in summary
    assert runs["torch_lora"]["gauge_difference"]["iMuon"] < 1e-10  # gauge invariance, exact polar factors
    assert "Done in" in capsys.readouterr().out


def test_custom_metric_example_converges_and_reports_early_stops(capsys):
    """The worked metric-operator example: the weighted metric reaches the minimizer of the
    ill-conditioned quadratic to rounding while plain Muon has not, and a run that stops before
    the last reported iteration is printed with its final error (marked), not an IndexError."""
    import custom_metric

    custom_metric.main()
    out = capsys.readouterr().out
    rows = {int(line.split()[0]): line.split()[1:] for line in out.splitlines() if line[:4].strip().isdigit()}
    assert float(rows[60][0].rstrip("*")) < 1e-12 < 0.1 < float(rows[60][1])
    assert "max difference 0.0e+00" in out or float(out.rsplit("difference", 1)[1]) < 1e-12
    assert custom_metric._at([0.5, 0.125], 2) == "1.250e-01"
    assert custom_metric._at([0.5, 0.125], 60) == "1.250e-01*"
    assert custom_metric._at([], 1) == "-"
