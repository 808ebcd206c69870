"""Smoke tests of the torch examples (``examples/torch_*.py``) and of ``benchmarks/bench_optim.py``.

Each example's ``main`` runs with ``--quick`` into a temporary folder; the tests check the plot, the table and the
properties the example demonstrates (feasibility, positivity, LoRA gauge invariance). No wall-clock assertions.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

pytest.importorskip("matplotlib")

import _torch_common as tc  # noqa: E402
import bench_optim  # noqa: E402
import torch_grassmann  # noqa: E402
import torch_lora  # noqa: E402
import torch_spd  # noqa: E402
import torch_stiefel  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(module, tmp_path, capsys) -> dict:
    out = module.main(["--quick", "--output", str(tmp_path)])
    printed = capsys.readouterr().out
    assert os.path.isfile(out["plot"]) and os.path.getsize(out["plot"]) > 0
    assert os.path.dirname(out["plot"]) == str(tmp_path)
    assert out["table"] in printed and out["table"].startswith("| optimizer |")
    for run in out["runs"].values():
        assert run.loss and all(map(torch.isfinite, torch.tensor(run.loss)))
    return out


def _files_written(folder, *names) -> None:
    for name in names:
        path = os.path.join(folder, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, f"{name} was not written"


def test_torch_stiefel(tmp_path, capsys):
    out = _run(torch_stiefel, tmp_path, capsys)
    runs = out["runs"]
    for name in ("iMuon (embedded)", "iMuon (canonical)", "RiemannianSGD", "RiemannianAdam"):
        for run in out["seeds"][name]:
            assert run.final("feasibility") < 1e-5, name
    assert runs["AdamW (penalty)"].final("feasibility") > 1e-4  # the penalty keeps W near, not on, the manifold
    for name in ("iMuon (embedded)", "iMuon (canonical)"):
        loss = runs[name].metrics["fit loss"]
        assert loss[-1] < 0.25 * loss[0], name
        assert runs[name].final("test accuracy") > 0.85, name  # a linear model on the digits reaches ~0.95
    for name, sweep in out["sweeps"].items():
        assert sweep.scores[sweep.best] == min(sweep.scores.values()), name
        assert len(out["seeds"][name]) == 2 and {r.lr for r in out["seeds"][name]} == {sweep.best}
    # every optimizer of a seed starts from the same point: identical initial metrics
    first = {name: round(r.metrics["test loss"][0], 12) for name, r in runs.items()}
    assert len(set(first.values())) == 1, first
    _files_written(tmp_path, "torch_stiefel.md", "torch_stiefel_lr.png")
    assert out["table"] in (tmp_path / "torch_stiefel.md").read_text()


def test_digits_split_is_stratified_and_standardized():
    data = torch_stiefel.load_split()
    sizes = [len(data[f"y_{part}"]) for part in ("fit", "val", "test")]
    assert sum(sizes) == 1797 and sizes[2] == 450
    for part in ("fit", "val", "test"):
        counts = torch.bincount(data[f"y_{part}"], minlength=10).double()
        assert counts.min() / counts.max() > 0.85, part  # the classes are balanced in each part
    x = data["x_fit"]
    assert torch.allclose(x.mean(0), torch.zeros(64, dtype=x.dtype), atol=1e-12)
    assert float(x.std(0).max()) <= 1.0 + 1e-12  # unit std, or below where the floor applied


def test_torch_spd(tmp_path, capsys):
    out = _run(torch_spd, tmp_path, capsys)
    for name, run in out["runs"].items():
        assert min(run.metrics["min eigenvalue"]) > 0, name
        assert run.final("excess loss") >= -1e-9, name  # the closed form is the minimum
    excess = out["runs"]["iMuon"].metrics["excess loss"]
    assert excess[-1] < 0.1 * excess[0]


def test_torch_grassmann(tmp_path, capsys):
    out = _run(torch_grassmann, tmp_path, capsys)
    runs = out["runs"]
    for name, run in runs.items():
        assert run.final("feasibility") < 1e-5, name
    imuon = runs["iMuon"]
    assert imuon.final("captured variance") > imuon.metrics["captured variance"][0]
    assert imuon.final("subspace distance") < imuon.metrics["subspace distance"][0]
    digits = out["cases"]["digits"]
    assert digits["table"] in capsys.readouterr().out + (tmp_path / "torch_grassmann.md").read_text()
    for name, seeded in digits["seeds"].items():
        for run in seeded:
            assert run.final("feasibility") < 1e-5, name
            assert run.final("captured variance") <= 1.0 + 1e-12, name  # the exact subspace is the maximum
    for run in digits["seeds"]["iMuon"]:
        assert run.final("captured variance") > 0.95
        assert run.final("subspace distance") < run.metrics["subspace distance"][0]
    _files_written(tmp_path, "torch_grassmann_digits.png", "torch_grassmann_digits_lr.png", "torch_grassmann.md")


def test_digits_top_subspace_matches_sklearn_pca():
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    x = torch_grassmann.digits_data()
    lam, top = torch_grassmann.top_subspace(x, 10)
    pca = PCA(n_components=10, svd_solver="full").fit(load_digits().data / 16.0)
    reference = torch.as_tensor(pca.components_.T, dtype=top.dtype)
    assert tc.subspace_distance(top, reference) < 1e-6  # sin from cos: rounding ~ sqrt(eps)
    n = x.shape[0]  # scikit-learn's variances divide by n - 1
    assert torch.allclose(lam[:10], torch.as_tensor(pca.explained_variance_) * (n - 1) / n, rtol=1e-10)


def test_sweep_lr_extends_until_the_best_rate_is_inside():
    calls = []

    def score(lr):  # minimum at lr = 0.3 on the half-decade grid
        calls.append(lr)
        return (math.log10(lr) - math.log10(0.3)) ** 2

    sweep = tc.sweep_lr("q", score, center=0.001, width=1, max_extend=10)
    assert sweep.best == 0.3 and sweep.inside
    assert sweep.grid == [0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    assert len(calls) == len(set(calls))  # no rate is evaluated twice
    capped = tc.sweep_lr("q", score, center=0.001, width=1, max_extend=2)
    assert capped.best == 0.03 and not capped.inside and capped.grid[-1] == 0.03  # two points added, both better
    diverging = tc.sweep_lr("d", lambda lr: float("nan") if lr > 0.05 else -lr, center=0.1, width=1, max_extend=3)
    assert diverging.best == 0.03 and diverging.inside and diverging.scores[0.1] == math.inf


def test_epoch_batches_are_seeded_permutations():
    batches = tc.epoch_batches(10, 3, 2, seed=5)
    assert batches.shape == (6, 3)
    for epoch in (batches[:3], batches[3:]):
        assert len(set(epoch.flatten().tolist())) == 9  # no sample twice within an epoch
    assert torch.equal(batches, tc.epoch_batches(10, 3, 2, seed=5))
    assert not torch.equal(batches, tc.epoch_batches(10, 3, 2, seed=6))
    with pytest.raises(ValueError, match="batch"):
        tc.epoch_batches(4, 5, 1, seed=0)


def test_torch_lora_gauge(tmp_path, capsys):
    out = _run(torch_lora, tmp_path, capsys)
    assert out["init_change"] < 1e-10  # the full-rank init keeps the function
    diff = out["gauge_difference"]
    assert diff["iMuon"] < 1e-6  # float64: iMuon's trajectory of B A ignores the gauge
    assert diff["AdamW"] > 1e-4 and diff["Muon"] > 1e-4  # per-factor methods do not
    loss = out["runs"]["iMuon"].metrics["train loss"]
    assert loss[-1] < 0.5 * loss[0]


def test_bench_optim_quick(capsys):
    out = bench_optim.main(["--quick", "--repeats", "2", "--warmup", "1"])
    printed = capsys.readouterr().out
    assert out["allocation"]["ok"], out["allocation"]
    assert "PASS" in printed and out["table"] in printed
    for case in out["cases"]:
        assert case.times and all(t > 0 for t in case.times.values())


def test_pair_step_never_forms_the_product():
    check = bench_optim.pair_allocation_check(512, 8, 512, torch.Generator().manual_seed(1))
    assert check["ok"], check
    assert check["largest_numel"] < 512 * 512


def test_allocation_checker_sees_a_product():
    # control: the dispatch mode does catch an m x n output
    b, a = torch.randn(512, 8), torch.randn(8, 512)
    mode = bench_optim.LargestOutput()
    with mode:
        b @ a
    assert mode.numel == 512 * 512 and mode.shape == (512, 512)
