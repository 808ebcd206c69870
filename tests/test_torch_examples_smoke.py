"""Smoke tests of the torch examples (``examples/torch_*.py``) and of ``benchmarks/bench_optim.py``.

Each example's ``main`` runs with ``--quick`` into a temporary folder; the tests check the plot, the table and the
properties the example demonstrates (feasibility, positivity, LoRA gauge invariance). No wall-clock assertions.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

pytest.importorskip("matplotlib")

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


def test_torch_stiefel(tmp_path, capsys):
    runs = _run(torch_stiefel, tmp_path, capsys)["runs"]
    for name in ("iMuon (embedded)", "iMuon (canonical)", "RiemannianSGD", "RiemannianAdam"):
        assert runs[name].final("feasibility") < 1e-5, name
    assert runs["AdamW (unconstrained)"].final("feasibility") > 1e-2  # the unconstrained model leaves the manifold
    for name in ("iMuon (embedded)", "iMuon (canonical)"):
        loss = runs[name].metrics["train loss"]
        assert loss[-1] < 0.5 * loss[0], name


def test_torch_spd(tmp_path, capsys):
    out = _run(torch_spd, tmp_path, capsys)
    for name, run in out["runs"].items():
        assert min(run.metrics["min eigenvalue"]) > 0, name
        assert run.final("excess loss") >= -1e-9, name  # the closed form is the minimum
    excess = out["runs"]["iMuon"].metrics["excess loss"]
    assert excess[-1] < 0.1 * excess[0]


def test_torch_grassmann(tmp_path, capsys):
    runs = _run(torch_grassmann, tmp_path, capsys)["runs"]
    for name, run in runs.items():
        assert run.final("feasibility") < 1e-5, name
    imuon = runs["iMuon"]
    assert imuon.final("captured variance") > imuon.metrics["captured variance"][0]
    assert imuon.final("subspace distance") < imuon.metrics["subspace distance"][0]


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
