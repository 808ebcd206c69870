"""Smoke runs of the benchmark scripts (tiny shapes; checks that they run, not their timings)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
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


def test_bench_lora_text_lr_search_widens_to_an_interior_best():
    """The half-decade grid search walks from its start to the minimum of a known function (far below the start)
    and stops once the best rate has an evaluated neighbour on each side; non-finite values count as worst."""
    import math

    bench = _load("bench_lora_text")
    assert [bench.grid_lr(i) for i in (-2, -1, 0, 1, 2)] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]

    def bowl(lr: float) -> float:  # minimum at lr = 1e-5 on the log scale; "diverges" above 5e-3
        return math.nan if lr > 5e-3 else (math.log10(lr) + 5.0) ** 2

    best, grid = bench.search_lr(bowl, 1e-2)
    assert best == 1e-5
    lrs = sorted(grid)
    assert lrs[0] < best < lrs[-1]
    assert grid[3e-2] == math.inf  # the diverged start point is recorded as worst
    best_up, grid_up = bench.search_lr(lambda lr: -lr, 1e-3, highest=1.0)  # best at the upper bound: stops there
    assert best_up == 1.0 and max(grid_up) == 1.0


def test_bench_lora_text_adapters_match_peft_and_keep_the_function():
    """The hand-built adapters compute what PEFT's do (same factors, same logits); the full-rank start and the
    rescale (B M, M^-1 A) leave the model's function unchanged."""
    import pytest

    bench = _load("bench_lora_text")
    from transformers import GPT2LMHeadModel

    from imuon_manopt.optim import lora_pairs

    torch.manual_seed(0)
    base = GPT2LMHeadModel(bench.gpt_config()).eval()
    x = torch.randint(0, 256, (3, bench.MODEL["n_positions"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = base(input_ids=x).logits.to(torch.float64)
    models = {"manual": bench.add_adapters(base, "manual", torch.float64)}
    if bench.peft_available():
        models["peft"] = bench.add_adapters(base, "peft", torch.float64)
    logits = {}
    for how, model in models.items():
        assert len(lora_pairs(model)) == 8
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(trainable) == 16 and all(p.ndim == 2 for p in trainable)
        bench.init_adapters_(model, seed=3)
        assert all(torch.linalg.matrix_rank(b) == bench.RANK for b, _ in lora_pairs(model))
        with torch.no_grad():
            logits[how] = model(input_ids=x).logits
            torch.testing.assert_close(logits[how], reference, rtol=0, atol=1e-5)  # float32 base weights
            bench.rescale_(model)
            torch.testing.assert_close(model(input_ids=x).logits, logits[how], rtol=0, atol=1e-11)
    if "peft" not in models:
        pytest.skip("peft is not installed: only the hand-built adapters were checked")
    for (b1, a1), (b2, a2) in zip(lora_pairs(models["manual"]), lora_pairs(models["peft"])):
        torch.testing.assert_close(b1, b2, rtol=0, atol=0)
        torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    torch.testing.assert_close(logits["manual"], logits["peft"], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_bench_lora_text_tiny(tmp_path):
    """A tiny configuration end to end: results.md, curves and the gauge experiment. With exact polar factors in
    float64, iMuon's trajectory from the rescaled factors equals the original one to rounding (GL(r) invariance of
    the fixed-rank step); AdamW's does not."""
    bench = _load("bench_lora_text")
    threads = torch.get_num_threads()
    try:
        out = bench.main(
            [
                "--quick",
                "--pretrain-steps",
                "3",
                "--steps",
                "4",
                "--batch",
                "4",
                "--threads",
                "1",
                "--final-windows",
                "32",
                "--curve-windows",
                "8",
                "--eval-every",
                "2",
                "--fidelity-svd",
                "--adapters",
                "manual",
                "--cache",
                str(tmp_path / "cache"),
                "--output",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    for name in ("results.md", "results.json", "heldout_vs_steps.png", "heldout_vs_seconds.png"):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert set(out["summary"]) == set(bench.VARIANTS)
    for row in out["summary"].values():
        assert row["step_ms"] > 0 and row["opt_ms"] > 0 and len(row["finals"]) == 1
    exact = out["fidelity"]["iMuon (BM, M^-1A), SVD float64"]
    assert exact["heldout"] < 1e-10 and exact["minibatch"] < 1e-10
    assert out["fidelity"]["AdamW (BM, M^-1A)"]["minibatch"] > 1e-6
    text = (tmp_path / "results.md").read_text()
    assert "| optimizer | best lr |" in text and "torch.get_num_threads() = 1" in text and "load average" in text


def test_bench_pretrain_splits_hidden_matrices_from_the_rest():
    """Every block's four 2-D hidden matrices go to the compared optimizer; embeddings (the output head is tied to
    the token embedding, so it appears once), norms and biases go to AdamW; nothing is left out or counted twice."""
    bench = _load("bench_pretrain")
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(bench.lt.gpt_config())
    hidden, rest = bench.split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}  # named_parameters() lists a tied tensor once
    assert sorted(names[id(p)].split(".", 3)[-1] for p in hidden) == sorted(bench.HIDDEN * bench.lt.MODEL["n_layer"])
    assert all(p.ndim == 2 for p in hidden)
    assert model.lm_head.weight is model.transformer.wte.weight and any(p is model.lm_head.weight for p in rest)
    assert {id(p) for p in hidden}.isdisjoint({id(p) for p in rest})
    assert {id(p) for p in hidden + rest} == set(names) and len(hidden + rest) == len(names)
    width = bench.lt.MODEL["n_embd"]
    assert bench.KYFAN_K == width // 4 and min(min(p.shape) for p in hidden) == width


def test_bench_pretrain_probe_reports_what_this_build_lacks():
    """A variant whose options IMuon refuses, whose param-group option IMuon does not know (torch would keep the key
    silently and the run would be plain iMuon), or whose option changes nothing in the probe's steps, is reported
    with the reason instead of being run."""
    bench = _load("bench_pretrain")
    assert bench.unavailable(bench.VARIANTS["iMuon"]) is None
    assert bench.unavailable(bench.VARIANTS["AdamW"]) is None
    assert "norm" in bench.unavailable(bench.Variant("imuon", {"norm": ("no_such_norm", 1)}))
    assert "'no_such_option'" in bench.unavailable(bench.Variant("imuon", {"no_such_option": True}))
    # accepted but without effect on the step (a default value) is caught; an option that changes the step is not
    assert "does not use it" in bench.unavailable(bench.Variant("imuon", {"use_imuon": True}))
    assert bench.unavailable(bench.Variant("imuon", {"nesterov": False})) is None


def test_bench_pretrain_winner_and_time_budget_reading():
    """The winner statement names a tie when the best mean does not win on every seed, and a win otherwise; the
    held-out loss at a time budget is read off the curve linearly, the last value after the run's end, infinite for
    a diverged run."""
    bench = _load("bench_pretrain")
    best, text = bench.winner({"a": [1.0, 1.0, 1.0], "b": [1.01, 1.02, 1.01], "c": [2.0, 2.0, 2.0]})
    assert best == "a" and "wins on every one of 3 seeds" in text and "runner-up b" in text
    best, text = bench.winner({"a": [1.0, 1.0, 1.0], "b": [1.0005, 1.02, 1.03], "c": [float("inf")] * 3})
    assert best == "a" and "ties with b (" in text and "ties with b, c" not in text
    run = bench.Run("a", 1e-2, 0, at=[0, 10, 20], seconds_at=[0.0, 2.0, 4.0], heldout=[5.0, 3.0, 2.0])
    assert bench.loss_at_seconds(run, 1.0) == pytest.approx(4.0)
    assert bench.loss_at_seconds(run, 3.0) == pytest.approx(2.5)
    assert bench.loss_at_seconds(run, 10.0) == 2.0
    assert bench.seconds_to(run, 4.0) == pytest.approx(1.0) and bench.seconds_to(run, 2.5) == pytest.approx(3.0)
    assert bench.seconds_to(run, 6.0) == 0.0 and bench.seconds_to(run, 1.9) == float("inf")
    run.diverged = True
    assert bench.loss_at_seconds(run, 1.0) == float("inf")


def test_bench_pretrain_tiny(tmp_path):
    """A tiny configuration end to end (--quick rates, a few steps): the table, the winners, the plots; every
    variant this build has is run, the others are listed with the reason."""
    bench = _load("bench_pretrain")
    threads = torch.get_num_threads()
    try:
        out = bench.main(
            ["--quick", "--steps", "4", "--batch", "2", "--threads", "1", "--eval-every", "2"]
            + ["--curve-windows", "4", "--final-windows", "8", "--cost-reps", "2", "--output", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
    for name in ("results.md", "results.json", "heldout_vs_steps.png", "heldout_vs_seconds.png"):
        assert (tmp_path / name).is_file(), name
    assert set(out["summary"]) | set(out["missing"]) == set(bench.VARIANTS)
    assert {"AdamW", "Muon", "iMuon"} <= set(out["summary"])
    for row in out["summary"].values():
        assert row["step_ms"] > 0 and row["opt_ms"] > 0 and row["step_cost_ms"] > 0 and len(row["finals"]) == 1
        assert row["finals"][0] < 6.0  # 256 byte values: ln 256 = 5.55 at the random start, and it trains
    text = (tmp_path / "results.md").read_text()
    assert "| optimizer | best lr |" in text and "**Step budget" in text and "**Time budget" in text
    assert "torch.get_num_threads() = 1" in text and "load average" in text
    for name, why in out["missing"].items():
        assert f"- {name} (" in text and why in text


def test_bench_family_quick():
    """Randomized Ky Fan against Newton–Schulz (cost), against the exact LMO (accuracy), MiMuon's gap statistics."""
    bench = _load("bench_family")
    threads = torch.get_num_threads()
    try:
        out = bench.main(["--quick", "--shapes", "64x48", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    assert len(out["cost"]) == 3 and len(out["exact"]) == 3 and len(out["accuracy"]) == 3 and len(out["mimuon"]) == 4
    gap = float(out["accuracy"][2].split("|")[6])
    assert 0.0 <= gap <= 2e-3  # 256 x 256, spectrum i^-1, k = 32, defaults


def test_gpu_check_dry_run_writes_one_table(tmp_path):
    """benchmarks/gpu_check.sh --dry-run (CPU, tiny sizes): every part runs and lands in the one table."""
    from _multiprocess import run_command

    out = tmp_path / "gpu_check.md"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    res = run_command(  # killed with everything the script started after the timeout
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--skip", "tests", "--steps", "3", "--out", str(out)],
        timeout=240,
        cwd=root,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    text = out.read_text()
    assert "| part | quantity | value | target | verdict |" in text
    for part in ("bench_polar", "bench_optim", "fine-tune"):
        assert f"| {part} |" in text, part
    assert "FAILED" not in text
    assert "iMuon whole step" in text and "pair step forms no m x n matrix" in text


def test_bench_spd_momentum_quick(capsys):
    bench = _load("bench_spd_momentum")
    out = bench.main(["--quick"])
    (_, _, _, cells), *_ = out["constant"]
    assert all(lo > 0.0 and err < 1e-3 for lo, err in cells)
    assert [row[:2] for row in out["armijo"]] == [(0.0, True), (0.9, True), (0.9, False)]
    assert "A. constant steps" in capsys.readouterr().out


def test_bench_pretrain_runs_are_memoized_for_every_variant():
    """A (variant, lr, seed) run is computed once: the grid search and the seed runs ask for the same run again.
    MiMuon's run records its switch counts per shape and must still be stored under its own key."""
    bench = _load("bench_pretrain")
    corpus = bench.lt.as_tokens(b"def f(x):\n    return x + 1\n" * 40)
    windows = bench.lt.tiled_windows(corpus, bench.lt.MODEL["n_positions"] + 1, 4)
    ctx = bench.Context(corpus, windows, windows, steps=2, batch=2, eval_every=1)
    for name in ("MiMuon", "iMuon"):
        first = ctx.run(name, 1e-2, 0)
        assert ctx.run(name, 1e-2, 0) is first and (name, 1e-2, 0) in ctx.runs
    assert sum(n for _, n in ctx.runs[("MiMuon", 1e-2, 0)].switches.values()) == 2 * 8  # 2 checks x 8 matrices
