"""The prepared GPU check: everything a GPU run of issue 13 needs, in one go, written as one markdown table.

Run by ``benchmarks/gpu_check.sh`` (which bounds it to 8 minutes); by hand::

    python benchmarks/gpu_check.py                     # on a CUDA device: the full check (~5 min on one H100/H200)
    python benchmarks/gpu_check.py --dry-run           # CPU, tiny sizes, seconds (what CI runs)

Parts (each bounded; a part that fails is reported in the table and the others still run):

1. **CUDA tests**: ``pytest -m cuda tests`` (the capture-and-replay test of ``capturable=True`` among them).
2. **bench_polar** on CUDA (Newton–Schulz against ``torch.optim.Muon``'s, bfloat16 and float32).
3. **bench_optim** on CUDA with ``--graphs``: the GPT-2-small LoRA set (72 pairs) against fused AdamW and
   ``torch.optim.Muon`` (bfloat16 Newton–Schulz), eager and replayed from CUDA graphs; 24 x 1024x1024 and one
   1024x1024 against Muon; Stiefel 1024x64 and 32 x 256x32 against RiemannianAdam.
4. **GPT-2-small LoRA fine-tune**: a ``GPT2LMHeadModel`` from a ``GPT2Config`` (12 layers, width 768, 12 heads,
   byte vocabulary, context 128; random weights, nothing downloaded), PEFT LoRA (r = 8) on every linear map of the
   blocks, trained on the standard library's ``.py`` files for ``--steps`` steps with AdamW (fused), Muon (bfloat16
   Newton–Schulz on every factor) and iMuon (pairs, bfloat16 Newton–Schulz), interleaved step by step from the same
   start on the same minibatches: median whole-step time (zero_grad, forward, backward, step) and ``step()`` time,
   and the mean minibatch loss of the last 10 % of the steps.

The summary table has one row per measured quantity with its target (issue 13) and a verdict; the parts' own tables
follow it in the output file (``--out``, default ``benchmarks/gpu_check.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_optim  # noqa: E402
import bench_polar  # noqa: E402
from bench_lora_text import as_tokens, stdlib_corpus  # noqa: E402

from imuon_manopt.optim import IMuon, full_rank_lora_model_init_, lora_pairs  # noqa: E402

#: The fine-tuned model: GPT-2 small's depth and width on bytes.
GPT2_SMALL = dict(vocab_size=256, n_positions=128, n_embd=768, n_layer=12, n_head=12)
GPT2_TINY = dict(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2)
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LRS = {"AdamW": 1e-3, "Muon": 1e-2, "iMuon": 3e-2}


class Summary:
    """Rows ``(part, quantity, value, target, verdict)`` of the one table."""

    def __init__(self, dry: bool = False) -> None:
        self.dry = dry  # tiny sizes: timings are reported, never judged
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.details: list[str] = []

    def add(self, part: str, what: str, value: str, target: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("met" if ok else "MISSED")
        if self.dry and target.startswith("<="):
            verdict = "(dry run: not judged)"
        self.rows.append((part, what, value, target, verdict))

    def ratio(self, part: str, what: str, value: float, limit: float | None, ref: str) -> None:
        target = f"<= {limit}x {ref}" if limit is not None else f"(vs {ref})"
        ok = None if limit is None or not math.isfinite(value) else value <= limit
        self.add(part, what, f"{value:.2f}x", target, ok)

    def markdown(self) -> str:
        lines = ["| part | quantity | value | target | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines)


def _quiet(fn, *args):
    """``fn(*args)`` with its printing captured (returned as the second value)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = fn(*args)
    return out, buf.getvalue()


def part_tests(s: Summary, dry: bool, timeout: float) -> None:
    files = ["tests/test_cuda.py", "tests/test_optim_compiled.py"] if dry else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        tail = [line for line in res.stdout.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        s.add("CUDA tests", "pytest -m cuda", tail[0].strip("= "), "all pass", res.returncode in (0, 5))
    except subprocess.TimeoutExpired:
        s.add("CUDA tests", "pytest -m cuda", f"timed out after {timeout:.0f} s", "all pass", False)
    s.details.append(f"CUDA tests: {' '.join(cmd[2:])} ({time.perf_counter() - t0:.0f} s)")


def part_polar(s: Summary, dry: bool, device: str) -> None:
    argv = ["--quick", "--dtypes", "float32", "--no-svd"] if dry else ["--device", device]
    out, _ = _quiet(bench_polar.main, argv)
    s.add("bench_polar", "orthogonalizer timings and errors", f"{len(out['rows'])} rows (below)")
    s.details.append(f"### bench_polar {' '.join(argv)}\n\n{out['table']}")


def part_optim(s: Summary, dry: bool, device: str) -> None:
    if dry:
        argv = ["--quick", "--threads", "1", "--repeats", "1", "--warmup", "1", "--only", "lora-set,stiefel"]
    else:
        argv = ["--device", device, "--graphs", "--repeats", "20", "--only"]
        argv.append("stiefel,stiefel-batch,euclidean,euclidean-24,lora-set")
    out, printed = _quiet(bench_optim.main, argv)
    for line in printed.splitlines():
        if " failed: " in line:  # a CUDA-graph capture that failed (its row is NaN)
            s.add("bench_optim", "FAILED", line.strip().replace("|", "/")[:300], "", False)
    for case in out["cases"]:
        for name, t in case.times.items():
            if not name.startswith("IMuon"):
                continue
            s.add("bench_optim", f"{case.name}: {name}", f"{1e3 * t:.3f} ms")
            for ref, limit in case.targets.items():
                if ref in case.times:
                    s.ratio("bench_optim", f"{case.name}: {name}", t / case.times[ref], limit, ref)
        graph_ref = "AdamW (fused, CUDA graph)"
        graph_row = "IMuon (bf16 NS, CUDA graph)"
        if graph_ref in case.times and graph_row in case.times:
            ratio = case.times[graph_row] / case.times[graph_ref]
            s.ratio("bench_optim", f"{case.name}: both in CUDA graphs", ratio, 2.0, graph_ref)
    check = out["allocation"]
    s.add("bench_optim", "pair step forms no m x n matrix", str(check["largest_shape"]), "< m*n entries", check["ok"])
    s.details.append(f"### bench_optim {' '.join(argv)}\n\n{out['table']}")


def _model(config: dict, device: torch.device, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    base = GPT2LMHeadModel(GPT2Config(**config, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS), fan_in_fan_out=True)
    model = get_peft_model(base, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        full_rank_lora_model_init_(model, init_scale=1e-2, generator=gen)
    return model.to(device)


def _optimizer(kind: str, model, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    if kind == "AdamW":
        return torch.optim.AdamW(params, lr=LRS[kind], weight_decay=0.0, fused=cuda)
    if kind == "Muon":
        if cuda:
            return torch.optim.Muon(params, lr=LRS[kind], weight_decay=0.0)
        return bench_optim.MuonFloat32(params, lr=LRS[kind], weight_decay=0.0)  # CPUs emulate bfloat16
    polar = {"method": "newton_schulz", "dtype": torch.bfloat16} if cuda else "newton_schulz"
    return IMuon(params, lr=LRS[kind], pairs=lora_pairs(model), polar=polar)


def part_finetune(s: Summary, dry: bool, device: torch.device, steps: int) -> None:
    config = GPT2_TINY if dry else GPT2_SMALL
    batch, context = (2, config["n_positions"]) if dry else (16, config["n_positions"])
    tokens = as_tokens(stdlib_corpus()[0])
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(tokens) - context - 1, (steps, batch), generator=gen)
    data = tokens[starts[..., None] + torch.arange(context + 1)].to(device)
    kinds = ("AdamW", "Muon", "iMuon")
    models = {k: _model(config, device, seed=0) for k in kinds}
    opts = {k: _optimizer(k, models[k], device) for k in kinds}
    whole: dict[str, list[float]] = {k: [] for k in kinds}
    opt_ms: dict[str, list[float]] = {k: [] for k in kinds}
    losses: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in range(steps):  # interleaved: a change of load hits every optimizer alike
        x = data[step]
        for k in kinds:
            model, opt = models[k], opts[k]
            sync()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits = model(input_ids=x[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            sync()
            t1 = time.perf_counter()
            opt.step()
            sync()
            t2 = time.perf_counter()
            whole[k].append(t2 - t0)
            opt_ms[k].append(t2 - t1)
            losses[k].append(loss.detach())
    skip = min(5, steps // 2)  # warm-up steps (allocation, first-step checks) are not timed
    tail = max(1, steps // 10)
    med = {k: statistics.median(whole[k][skip:]) for k in kinds}
    label = "GPT-2-small LoRA" if not dry else "tiny GPT-2 LoRA (dry run)"
    for k in kinds:
        final = float(torch.stack(losses[k][-tail:]).mean())
        first = float(losses[k][0])
        step_med = 1e3 * statistics.median(opt_ms[k][skip:])
        value = f"{1e3 * med[k]:.1f} ms (step() {step_med:.1f} ms); loss {first:.3f} -> {final:.3f}"
        s.add("fine-tune", f"{label}, {k}, {steps} steps", value)
    s.ratio("fine-tune", f"{label}: iMuon whole step", med["iMuon"] / med["AdamW"], 1.05, "AdamW")
    s.ratio("fine-tune", f"{label}: Muon whole step", med["Muon"] / med["AdamW"], None, "AdamW")
    n_pairs = len(lora_pairs(models["iMuon"]))
    s.details.append(
        f"fine-tune: {config}, {n_pairs} LoRA pairs (r = 8), batch {batch} x {context} bytes, lrs {LRS}, "
        f"{steps} steps on {device}"
    )


def main(argv: list[str] | None = None) -> Summary:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds (the CI smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 300; dry run 4)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_check.md"))
    ap.add_argument("--skip", default="", help="comma list of parts to leave out: tests,polar,optim,finetune")
    ap.add_argument("--test-timeout", type=float, default=240.0)
    args = ap.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry-run for the CPU smoke run")
    steps = args.steps or (4 if dry else 300)
    skip = {p for p in args.skip.split(",") if p}
    threads = torch.get_num_threads()
    s = Summary(dry)
    t_start = time.perf_counter()
    parts = [
        ("tests", lambda: part_tests(s, dry, args.test_timeout)),
        ("polar", lambda: part_polar(s, dry, str(device))),
        ("optim", lambda: part_optim(s, dry, str(device))),
        ("finetune", lambda: part_finetune(s, dry, device, steps)),
    ]
    for name, run in parts:
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            run()
        except Exception as err:  # noqa: BLE001 - one failed part must not hide the others' figures
            s.add(name, "FAILED", f"{type(err).__name__}: {err}".replace("|", "/")[:300], "", False)
        finally:
            torch.set_num_threads(threads)
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (dry run on the CPU)"
    load = os.getloadavg() if hasattr(os, "getloadavg") else "n/a"
    head = (
        f"# GPU check ({'dry run' if dry else 'full'})\n\nGPU: {gpu}; torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}; {platform.machine()}, {os.cpu_count()} CPU cores, {threads} threads; load {load}; "
        f"{time.perf_counter() - t_start:.0f} s in all. Command: python benchmarks/gpu_check.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}\n"
    )
    text = head + "\n" + s.markdown() + "\n\n" + "\n\n".join(s.details) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return s


if __name__ == "__main__":
    main()
