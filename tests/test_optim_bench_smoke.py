"""Smoke run of benchmarks/bench_optim.py (tiny shapes; checks that the cases and the allocation check run, not their
timings)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_optim.py"


def test_bench_optim_quick_runs_every_case(capsys):
    spec = importlib.util.spec_from_file_location("_bench_optim_smoke", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        out = module.main(["--quick", "--threads", "1", "--repeats", "1", "--warmup", "1", "--copies"])
    finally:
        torch.set_num_threads(threads)
    assert out["allocation"]["ok"]
    keys = [case.key for case in out["cases"]]
    assert {"lora-set", "euclidean-24", "stiefel", "stiefel-batch"} <= set(keys)
    for case in out["cases"]:
        assert all(t > 0 for t in case.times.values())
    text = capsys.readouterr().out
    assert "GPT-2-small LoRA set" in text
    assert "copies per IMuon.step() on GPT-2-small LoRA set" in text
