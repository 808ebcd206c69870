"""Smoke runs of the benchmark scripts (tiny shapes; checks that they run, not their timings)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_polar_quick(capsys):
    bench = _load("bench_polar")
    threads = torch.get_num_threads()
    try:
        out = bench.main(["--quick", "--budget", "0", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert out["rows"] and out["notes"]
    for row in out["rows"]:
        rel_err = row[5]
        assert rel_err is None or rel_err < 0.5  # NS after 5 steps, or the exact SVD
    printed = capsys.readouterr().out
    assert "| shape |" in printed and "torch.get_num_threads()" in printed
