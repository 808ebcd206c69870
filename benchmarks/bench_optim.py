"""Benchmark: per-step time of ``imuon_manopt.optim.IMuon`` against geoopt RiemannianAdam and torch.optim.Muon.

Cases (float32 parameters, a fixed random gradient, equal shapes for every optimizer):

==========================  =================================================================================
case                        optimizers
==========================  =================================================================================
Stiefel 1024x64             IMuon vs RiemannianAdam, ``geoopt.EuclideanStiefel`` (target: <= 1.3x RAdam)
Stiefel batch 32 x 256x32   IMuon vs RiemannianAdam, one batched ``EuclideanStiefel`` parameter
SPD 64x64                   IMuon vs RiemannianAdam, ``geoopt.SymmetricPositiveDefinite``
Euclidean 1024x1024         IMuon vs torch.optim.Muon, both 5 Newton–Schulz steps (target: <= 1.1x Muon); torch's
                            Muon casts to bfloat16, which CPUs without native bfloat16 emulate very slowly, so
                            the reference is the same optimizer with a float32 Newton–Schulz (``MuonFloat32``);
                            the real one is timed too (1 warm-up, 2 repeats)
LoRA pair 4096x16 / 16x4096 IMuon (``pairs=[(B, A)]``) vs torch.optim.Muon and AdamW on the two factors
==========================  =================================================================================

On ``--device cuda`` the Euclidean and LoRA cases also time ``IMuon(ns_dtype=torch.bfloat16)``, and the Euclidean
reference is the real ``torch.optim.Muon`` (bfloat16 Newton–Schulz), whose dtype a GPU runs natively.

Timing: ``warmup`` steps of each optimizer, then ``repeats`` rounds in which every optimizer of the case does one
timed ``step()`` (interleaved, so that a change of machine load hits all of them alike); the median per optimizer
and the ratios to the reference are reported, with the thread count.

Allocation check (exact): the LoRA pair's ``step()`` runs under a ``TorchDispatchMode`` that sees the output of
every aten operation; it fails if any output has ``numel >= m * n`` (an ``m x n`` matrix, the product ``B A``,
would have been formed). On CUDA it also reports the peak of allocated device memory during the steps, above what the
parameters, gradients and state held before them.

Usage::

    python benchmarks/bench_optim.py             # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_optim.py --quick     # smoke run on small shapes
    python benchmarks/bench_optim.py --profile   # also print torch.profiler's top operations of IMuon's steps
    python benchmarks/bench_optim.py --device cuda

The exit status is 1 when the allocation check fails (timing targets are reported, never enforced).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import geoopt
import torch
import torch.optim._muon as torch_muon
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_polar import muon_ns_replica  # noqa: E402

from imuon_manopt.optim import IMuon  # noqa: E402

NS_STEPS = 5
LR = 1e-3
DTYPE = torch.float32
DEVICE = torch.device("cpu")  # set by main(--device); every parameter and gradient is made there


def _ns_float32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float):
    """``torch.optim._muon._zeropower_via_newtonschulz`` without its bfloat16 cast (same operations, float32)."""
    return muon_ns_replica(grad, ns_steps, torch.float32, ns_coefficients, eps)


class MuonFloat32(torch.optim.Muon):
    """``torch.optim.Muon`` whose Newton–Schulz runs in float32: torch's CPU bfloat16 matmuls are emulated on CPUs
    without native bfloat16 (about 200x slower than float32 here), which would make the comparison meaningless."""

    def step(self, closure=None):
        original = torch_muon._zeropower_via_newtonschulz
        torch_muon._zeropower_via_newtonschulz = _ns_float32
        try:
            return super().step(closure)
        finally:
            torch_muon._zeropower_via_newtonschulz = original


@dataclass
class Case:
    """One benchmark case: optimizers (name -> factory over fresh parameters) and the reference for the ratio."""

    name: str
    make: dict[str, Callable[[], tuple[torch.optim.Optimizer, list[torch.Tensor]]]]
    reference: str
    target: float | None = None
    slow: tuple[str, ...] = ()  # timed with 1 warm-up step and 2 repeats, after the others
    times: dict[str, float] = field(default_factory=dict)


def _with_grad(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
    return p


def _imuon_vs_radam(param) -> dict:
    """Factories ``name -> () -> (optimizer, [parameter])`` for IMuon and RiemannianAdam on fresh copies
    of the same manifold parameter (``param()`` makes one, with its gradient)."""

    def imuon():
        p = param()
        return IMuon([p], lr=LR, ns_steps=NS_STEPS), [p]

    def radam():
        p = param()
        return geoopt.optim.RiemannianAdam([p], lr=LR), [p]

    return {"IMuon": imuon, "RiemannianAdam": radam}


def stiefel_case(shape: tuple[int, ...], g: torch.Generator) -> dict:
    manifold = geoopt.EuclideanStiefel()
    x0 = torch.linalg.qr(torch.randn(shape, generator=g, dtype=torch.float64))[0].to(DEVICE, DTYPE)

    def param():
        return _with_grad(geoopt.ManifoldParameter(x0.clone(), manifold=manifold), g)

    return _imuon_vs_radam(param)


def spd_case(n: int, g: torch.Generator) -> dict:
    manifold = geoopt.SymmetricPositiveDefinite()
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    x0 = (a @ a.T / n + torch.eye(n, dtype=torch.float64)).to(DEVICE, DTYPE)

    def param():
        p = geoopt.ManifoldParameter(x0.clone(), manifold=manifold)
        gr = torch.randn(n, n, generator=g, dtype=DTYPE)
        p.grad = (0.5 * (gr + gr.T)).to(DEVICE)
        return p

    return _imuon_vs_radam(param)


def euclidean_case(m: int, n: int, g: torch.Generator) -> dict:
    x0 = (torch.randn(m, n, generator=g, dtype=DTYPE) / n**0.5).to(DEVICE)

    def param():
        return _with_grad(torch.nn.Parameter(x0.clone()), g)

    def imuon():
        p = param()
        return IMuon([p], lr=LR, ns_steps=NS_STEPS), [p]

    def muon():
        p = param()
        return torch.optim.Muon([p], lr=LR, weight_decay=0.0, ns_steps=NS_STEPS), [p]

    def muon32():
        p = param()
        return MuonFloat32([p], lr=LR, weight_decay=0.0, ns_steps=NS_STEPS), [p]

    def imuon_bf16():
        p = param()
        return IMuon([p], lr=LR, ns_steps=NS_STEPS, ns_dtype=torch.bfloat16), [p]

    if DEVICE.type == "cuda":
        return {"IMuon": imuon, "IMuon (bf16 NS)": imuon_bf16, "torch.optim.Muon (fp32 NS)": muon32,
                "torch.optim.Muon (bf16 NS)": muon}
    return {"IMuon": imuon, "torch.optim.Muon (fp32 NS)": muon32, "torch.optim.Muon (bf16 NS)": muon}


def lora_factors(m: int, n: int, r: int, g: torch.Generator) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    b = torch.nn.Parameter((torch.randn(m, r, generator=g, dtype=DTYPE) / m**0.5).to(DEVICE))
    a = torch.nn.Parameter((torch.randn(r, n, generator=g, dtype=DTYPE) / n**0.5).to(DEVICE))
    return _with_grad(b, g), _with_grad(a, g)


def lora_case(m: int, n: int, r: int, g: torch.Generator) -> dict:
    def imuon():
        b, a = lora_factors(m, n, r, g)
        return IMuon([b, a], lr=LR, ns_steps=NS_STEPS, pairs=[(b, a)]), [b, a]

    def muon():
        b, a = lora_factors(m, n, r, g)
        return torch.optim.Muon([b, a], lr=LR, weight_decay=0.0, ns_steps=NS_STEPS), [b, a]

    def adamw():
        b, a = lora_factors(m, n, r, g)
        return torch.optim.AdamW([b, a], lr=LR, weight_decay=0.0), [b, a]

    def imuon_bf16():
        b, a = lora_factors(m, n, r, g)
        return IMuon([b, a], lr=LR, ns_steps=NS_STEPS, pairs=[(b, a)], ns_dtype=torch.bfloat16), [b, a]

    makers = {"IMuon": imuon, "torch.optim.Muon": muon, "AdamW": adamw}
    if DEVICE.type == "cuda":
        makers["IMuon (bf16 NS)"] = imuon_bf16
    return makers


def parse_shape(text: str) -> list[int]:
    return [int(v) for v in text.split("x")]


def build_cases(quick: bool, g: torch.Generator) -> tuple[list[Case], tuple[int, int, int]]:
    if quick:
        st, bst, spd, eu, (m, r, n) = (128, 16), (4, 64, 8), 16, (128, 128), (512, 8, 512)
    else:
        st, bst, spd, eu, (m, r, n) = (1024, 64), (32, 256, 32), 64, (1024, 1024), (4096, 16, 4096)
    cases = [
        Case(f"Stiefel {st[0]}x{st[1]} (EuclideanStiefel)", stiefel_case(st, g), "RiemannianAdam", 1.3),
        Case(f"Stiefel batch {bst[0]} x {bst[1]}x{bst[2]}", stiefel_case(bst, g), "RiemannianAdam"),
        Case(f"SPD {spd}x{spd}", spd_case(spd, g), "RiemannianAdam"),
        Case(f"Euclidean {eu[0]}x{eu[1]} ({NS_STEPS} NS steps)", euclidean_case(*eu, g), "torch.optim.Muon (fp32 NS)",
             1.1, slow=("torch.optim.Muon (bf16 NS)",)),
    ]
    if DEVICE.type == "cuda":  # bfloat16 is native there: the real Muon is the reference, and nothing is slow
        cases[-1].reference, cases[-1].slow = "torch.optim.Muon (bf16 NS)", ()
    cases += [
        Case(f"LoRA pair {m}x{r} / {r}x{n}", lora_case(m, n, r, g), "torch.optim.Muon"),
    ]
    return cases, (m, r, n)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def time_case(case: Case, warmup: int, repeats: int) -> None:
    """Median seconds of one ``step()`` per optimizer, interleaved over ``repeats`` rounds."""
    opts = {name: make()[0] for name, make in case.make.items()}
    samples: dict[str, list[float]] = {name: [] for name in opts}

    def rounds(names: list[str], count: int) -> None:
        for _ in range(count):
            for name in names:
                _sync()
                t0 = time.perf_counter()
                opts[name].step()
                _sync()
                samples[name].append(time.perf_counter() - t0)

    fast = [name for name in opts if name not in case.slow]
    for name in fast:
        for _ in range(warmup):
            opts[name].step()
    _sync()
    rounds(fast, repeats)
    for name in case.slow:
        opts[name].step()
        rounds([name], min(2, repeats))
    case.times = {name: statistics.median(samples[name]) for name in case.make}


class LargestOutput(TorchDispatchMode):
    """Records the largest output (by ``numel``) of any aten operation run under it, and that operation."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.op = ""
        self.shape: tuple[int, ...] = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op, self.shape = t.numel(), str(func), tuple(t.shape)
        return out


def pair_allocation_check(m: int, r: int, n: int, g: torch.Generator, steps: int = 2) -> dict:
    """Run IMuon's pair ``step()`` under :class:`LargestOutput`; ``ok`` when no output has ``m * n`` entries."""
    b, a = lora_factors(m, n, r, g)
    opt = IMuon([b, a], lr=LR, ns_steps=NS_STEPS, pairs=[(b, a)])
    mode = LargestOutput()
    cuda = DEVICE.type == "cuda"
    if cuda:
        opt.step()  # state allocated before the measured steps
        torch.cuda.synchronize(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
    with mode:
        for _ in range(steps):  # without CUDA: the first step creates the momentum buffers, the second uses them
            opt.step()
    peak = torch.cuda.max_memory_allocated(DEVICE) - base if cuda else None
    return {"ok": mode.numel < m * n, "largest_numel": mode.numel, "largest_op": mode.op,
            "largest_shape": mode.shape, "limit": m * n, "shape": (m, r, n), "peak_bytes": peak}


def profile_imuon(case: Case, steps: int = 5, rows: int = 12) -> str:
    """torch.profiler's table of the most expensive operations over ``steps`` of IMuon's ``step()``."""
    from torch.profiler import ProfilerActivity, profile

    opt = case.make["IMuon"]()[0]
    opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            opt.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def markdown(cases: list[Case]) -> str:
    lines = ["| case | optimizer | median step (ms) | ratio to reference | target |", "|---|---|---|---|---|"]
    for case in cases:
        ref = case.times[case.reference]
        for name, t in case.times.items():
            ratio = t / ref
            target = ""
            if name.startswith("IMuon") and case.target is not None:
                target = f"<= {case.target}x: {'met' if ratio <= case.target else 'MISSED'}"
            lines.append(f"| {case.name} | {name} | {1e3 * t:.3f} | {ratio:.2f}x {case.reference} | {target} |")
    return "\n".join(lines)


def machine() -> str:
    gpu = f"{torch.cuda.get_device_name(DEVICE)}, " if DEVICE.type == "cuda" else ""
    return (f"{gpu}{platform.machine()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads), geoopt {geoopt.__version__}, "
            f"Python {platform.python_version()}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per optimizer (default 30; quick 5)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of IMuon's steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA build of torch and a GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 30)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    print(f"machine: {machine()}")
    print(f"command: python benchmarks/bench_optim.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    cases, (m, r, n) = build_cases(args.quick, g)
    for case in cases:
        time_case(case, args.warmup, repeats)
        print(f"  timed {case.name}", flush=True)
    table = markdown(cases)
    print(f"\nmedian of {repeats} interleaved steps after {args.warmup} warm-up steps, float32 parameters on "
          f"{DEVICE}\n\n{table}\n")

    check = pair_allocation_check(m, r, n, g)
    verdict = "PASS" if check["ok"] else "FAIL"
    print(f"LoRA pair {m}x{r} / {r}x{n}: largest tensor produced during IMuon.step() has {check['largest_numel']} "
          f"entries ({check['largest_op']}, shape {check['largest_shape']}); m*n = {check['limit']}: {verdict} "
          "(no m x n allocation)")
    if check["peak_bytes"] is not None:
        print(f"  peak device memory during 2 steps, above parameters, gradients and state: "
              f"{check['peak_bytes'] / 2**20:.2f} MiB (an m x n float32 matrix: {4 * m * n / 2**20:.0f} MiB)")
    if args.profile:
        for case in cases:
            print(f"\ntorch.profiler, IMuon.step() on {case.name}:\n{profile_imuon(case)}")
    return {"cases": cases, "table": table, "allocation": check, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    sys.exit(0 if main()["allocation"]["ok"] else 1)
