"""Benchmark: per-step time of ``imuon_manopt.optim.IMuon`` against geoopt RiemannianAdam and torch.optim.Muon.

Cases (float32 parameters, a fixed random gradient, equal shapes for every optimizer):

==============================  ======================================================================================
case                            optimizers
==============================  ======================================================================================
Stiefel 1024x64                 IMuon vs RiemannianAdam, ``geoopt.EuclideanStiefel`` (target: <= 1.5x RAdam)
Stiefel batch 32 x 256x32       IMuon vs RiemannianAdam, one batched ``EuclideanStiefel`` parameter (target: <= 1.5x)
SPD 64x64                       IMuon vs RiemannianAdam, ``geoopt.SymmetricPositiveDefinite``
Euclidean 1024x1024             IMuon vs torch.optim.Muon, both 5 Newton–Schulz steps (target: <= 1.1x Muon); torch's
                                Muon casts to bfloat16, which CPUs without native bfloat16 emulate very slowly, so the
                                reference is the same optimizer with a float32 Newton–Schulz (``MuonFloat32``); the
                                real one is timed too (1 warm-up, 2 repeats)
24 x Euclidean 1024x1024        IMuon (one group, one batched Newton–Schulz) vs MuonFloat32 (target: <= 1.05x)
LoRA pair 4096x16 / 16x4096     IMuon (``pairs=[(B, A)]``) vs torch.optim.Muon and AdamW on the two factors
GPT-2-small LoRA set            12 layers x q, k, v, o (768x768), up (3072x768), down (768x3072), r = 8: 72 pairs;
                                IMuon vs AdamW (foreach) and MuonFloat32 on every factor (targets on the CPU: <= 2.5x
                                AdamW, <= 0.4x Muon; on CUDA: <= 2x fused AdamW, with ``--graphs`` both replayed
                                from CUDA graphs)
==============================  ======================================================================================

On ``--device cuda`` the Euclidean and LoRA cases also time IMuon with a bfloat16 Newton–Schulz (``polar={"method":
"newton_schulz", "dtype": torch.bfloat16}``), and the Euclidean references are the real ``torch.optim.Muon``
(bfloat16 Newton–Schulz), whose dtype a GPU runs natively.

Timing: ``warmup`` steps of each optimizer, then ``repeats`` rounds in which every optimizer of the case does one
timed ``step()`` (interleaved, so that a change of machine load hits all of them alike); the median per optimizer
and the ratios to the references are reported, with the thread count. ``--threads 1,2`` runs every case once per
thread count. The 24-matrix case takes few repeats (each step orthogonalizes 24 large matrices).

Allocation check (exact): the LoRA pair's ``step()`` runs under a ``TorchDispatchMode`` that sees the output of
every aten operation; it fails if any output has ``numel >= m * n`` (an ``m x n`` matrix, the product ``B A``,
would have been formed). On CUDA it also reports the peak of allocated device memory during the steps, above what the
parameters, gradients and state held before them.

Usage::

    python benchmarks/bench_optim.py             # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_optim.py --quick     # smoke run on small shapes
    python benchmarks/bench_optim.py --profile   # also print torch.profiler's top operations of IMuon's steps
    python benchmarks/bench_optim.py --copies    # also count tensor copies per IMuon.step() (aten::copy_ etc.)
    python benchmarks/bench_optim.py --device cuda
    python benchmarks/bench_optim.py --threads 1,2 --only lora-set,stiefel   # a subset of the cases

The exit status is 1 when the allocation check fails (timing targets are reported, never enforced).
"""

from __future__ import annotations

import argparse
import math
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
NS = {"method": "newton_schulz", "steps": NS_STEPS}
NS_BF16 = {**NS, "dtype": torch.bfloat16}
LR = 1e-3
DTYPE = torch.float32
DEVICE = torch.device("cpu")  # set by main(--device); every parameter and gradient is made there
GRAPHS = False  # set by main(--graphs): on CUDA, also time capturable steps replayed from a CUDA graph


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
    """One benchmark case: optimizers (name -> factory over fresh parameters), references with targets."""

    key: str
    name: str
    make: dict[str, Callable[[], tuple[torch.optim.Optimizer, list[torch.Tensor]]]]
    targets: dict[str, float | None]  # reference optimizer -> target ratio of IMuon to it (None: reported only)
    slow: tuple[str, ...] = ()  # timed with 1 warm-up step and 2 repeats, after the others
    repeats: int | None = None  # overrides --repeats (expensive cases)
    times: dict[str, float] = field(default_factory=dict)


def _with_grad(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
    return p


def _imuon_vs_radam(param) -> dict:
    """Factories ``name -> () -> (optimizer, [parameter])`` for IMuon and RiemannianAdam on fresh copies
    of the same manifold parameter (``param()`` makes one, with its gradient)."""

    def imuon():
        p = param()
        return IMuon([p], lr=LR, polar=NS), [p]

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


def euclidean_case(m: int, n: int, g: torch.Generator, count: int = 1) -> dict:
    """IMuon and torch's Muon on ``count`` plain ``m x n`` matrices (IMuon stacks them into one group)."""
    x0 = [(torch.randn(m, n, generator=g, dtype=DTYPE) / n**0.5).to(DEVICE) for _ in range(count)]

    def params():
        return [_with_grad(torch.nn.Parameter(x.clone()), g) for x in x0]

    def imuon():
        ps = params()
        return IMuon(ps, lr=LR, polar=NS), ps

    def muon():
        ps = params()
        return torch.optim.Muon(ps, lr=LR, weight_decay=0.0, ns_steps=NS_STEPS), ps

    def muon32():
        ps = params()
        return MuonFloat32(ps, lr=LR, weight_decay=0.0, ns_steps=NS_STEPS), ps

    def imuon_bf16():
        ps = params()
        return IMuon(ps, lr=LR, polar=NS_BF16), ps

    if DEVICE.type == "cuda":
        return {
            "IMuon": imuon,
            "IMuon (bf16 NS)": imuon_bf16,
            "torch.optim.Muon (fp32 NS)": muon32,
            "torch.optim.Muon (bf16 NS)": muon,
        }
    makers = {"IMuon": imuon, "torch.optim.Muon (fp32 NS)": muon32}
    if count == 1:  # CPUs without bfloat16 units emulate it (~30 s per step): timed as "slow"
        makers["torch.optim.Muon (bf16 NS)"] = muon
        makers["IMuon (bf16 NS)"] = imuon_bf16
    return makers


def lora_factors(m: int, n: int, r: int, g: torch.Generator) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    b = torch.nn.Parameter((torch.randn(m, r, generator=g, dtype=DTYPE) / m**0.5).to(DEVICE))
    a = torch.nn.Parameter((torch.randn(r, n, generator=g, dtype=DTYPE) / n**0.5).to(DEVICE))
    return _with_grad(b, g), _with_grad(a, g)


def _lora_makers(shapes: list[tuple[int, int, int]], g: torch.Generator) -> dict:
    """IMuon (pairs), torch.optim.Muon (fp32 NS replica on the CPU), AdamW (foreach) on the same factor pairs."""
    init = [lora_factors(m, n, r, g) for m, r, n in shapes]

    def factors():
        pairs = []
        for b0, a0 in init:
            b, a = torch.nn.Parameter(b0.detach().clone()), torch.nn.Parameter(a0.detach().clone())
            pairs.append((_with_grad(b, g), _with_grad(a, g)))
        return pairs, [t for pair in pairs for t in pair]

    def imuon():
        pairs, ps = factors()
        return IMuon(ps, lr=LR, polar=NS, pairs=pairs), ps

    def imuon_bf16():
        pairs, ps = factors()
        return IMuon(ps, lr=LR, polar=NS_BF16, pairs=pairs), ps

    def muon():
        _, ps = factors()
        cls = torch.optim.Muon if DEVICE.type == "cuda" else MuonFloat32
        return cls(ps, lr=LR, weight_decay=0.0, ns_steps=NS_STEPS), ps

    def adamw():
        _, ps = factors()
        return torch.optim.AdamW(ps, lr=LR, weight_decay=0.0, foreach=True), ps

    makers = {"IMuon": imuon, "torch.optim.Muon": muon, "AdamW": adamw}
    if DEVICE.type == "cuda":
        makers["IMuon (bf16 NS)"] = imuon_bf16

        def adamw_fused():
            _, ps = factors()
            return torch.optim.AdamW(ps, lr=LR, weight_decay=0.0, fused=True), ps

        makers["AdamW (fused)"] = adamw_fused
        if GRAPHS:

            def imuon_graph():
                pairs, ps = factors()
                return Graphed(IMuon(ps, lr=LR, polar=NS_BF16, pairs=pairs, capturable=True)), ps

            def adamw_graph():
                _, ps = factors()
                return Graphed(torch.optim.AdamW(ps, lr=LR, weight_decay=0.0, fused=True, capturable=True)), ps

            makers["IMuon (bf16 NS, CUDA graph)"] = imuon_graph
            makers["AdamW (fused, CUDA graph)"] = adamw_graph
    return makers


class Graphed:
    """An optimizer whose ``step()`` is captured once in a CUDA graph (after warm-up steps on a side stream, as
    ``torch.cuda.graph`` requires) and replayed: the launch-free cost of a capturable step."""

    def __init__(self, opt: torch.optim.Optimizer, warmup: int = 3) -> None:
        self.opt = opt
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            opt.step()

    def step(self) -> None:
        self.graph.replay()


def lora_case(m: int, n: int, r: int, g: torch.Generator) -> dict:
    return _lora_makers([(m, r, n)], g)


def gpt2_lora_shapes(layers: int = 12, d: int = 768, ff: int = 3072, r: int = 8) -> list[tuple[int, int, int]]:
    """(m, r, n) of the LoRA pairs of a GPT-2-small-shaped adapter set: per layer q, k, v, o (d x d), up (ff x d),
    down (d x ff)."""
    return [shape for _ in range(layers) for shape in [(d, r, d)] * 4 + [(ff, r, d), (d, r, ff)]]


def parse_shape(text: str) -> list[int]:
    return [int(v) for v in text.split("x")]


def build_cases(quick: bool, g: torch.Generator) -> tuple[list[Case], tuple[int, int, int]]:
    if quick:
        st, bst, spd, eu, (m, r, n) = (128, 16), (4, 64, 8), 16, (128, 128), (512, 8, 512)
        many, lora_set = (4, 64, 64), gpt2_lora_shapes(layers=2, d=64, ff=256, r=4)
    else:
        st, bst, spd, eu, (m, r, n) = (1024, 64), (32, 256, 32), 64, (1024, 1024), (4096, 16, 4096)
        many, lora_set = (24, 1024, 1024), gpt2_lora_shapes()
    cuda = DEVICE.type == "cuda"
    muon_ref = "torch.optim.Muon (bf16 NS)" if cuda else "torch.optim.Muon (fp32 NS)"
    return [
        Case("stiefel", f"Stiefel {st[0]}x{st[1]} (EuclideanStiefel)", stiefel_case(st, g), {"RiemannianAdam": 1.5}),
        Case(
            "stiefel-batch",
            f"Stiefel batch {bst[0]} x {bst[1]}x{bst[2]}",
            stiefel_case(bst, g),
            {"RiemannianAdam": 1.5},
        ),
        Case("spd", f"SPD {spd}x{spd}", spd_case(spd, g), {"RiemannianAdam": None}),
        Case(
            "euclidean",
            f"Euclidean {eu[0]}x{eu[1]} ({NS_STEPS} NS steps)",
            euclidean_case(*eu, g),
            {muon_ref: 1.1},
            slow=() if cuda else ("torch.optim.Muon (bf16 NS)", "IMuon (bf16 NS)"),
        ),
        Case(
            "euclidean-24",
            f"{many[0]} x Euclidean {many[1]}x{many[2]}",
            euclidean_case(many[1], many[2], g, many[0]),
            {muon_ref: 1.05 if not cuda else 1.1},
            repeats=3 if not quick else None,
        ),
        Case(
            "lora-pair",
            f"LoRA pair {m}x{r} / {r}x{n}",
            lora_case(m, n, r, g),
            {"torch.optim.Muon": None, "AdamW": None},
        ),
        Case(
            "lora-set",
            f"GPT-2-small LoRA set ({len(lora_set)} pairs, r = {lora_set[0][1]})",
            _lora_makers(lora_set, g),
            {"AdamW (fused)": 2.0, "torch.optim.Muon": 0.5} if cuda else {"AdamW": 2.5, "torch.optim.Muon": 0.4},
        ),
    ], (m, r, n)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def time_case(case: Case, warmup: int, repeats: int) -> None:
    """Median seconds of one ``step()`` per optimizer, interleaved over ``repeats`` rounds."""
    repeats = case.repeats or repeats
    warmup = min(warmup, 1) if case.repeats else warmup
    opts = {}
    for name, make in case.make.items():
        if "CUDA graph" not in name:
            opts[name] = make()[0]
            continue
        try:  # a capture that fails is reported (NaN row), the rest of the case still runs
            opts[name] = make()[0]
        except Exception as err:  # noqa: BLE001
            print(f"  {case.name}: {name} failed: {type(err).__name__}: {err}", flush=True)
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
    case.times = {name: statistics.median(samples[name]) if samples.get(name) else math.nan for name in case.make}


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
    opt = IMuon([b, a], lr=LR, polar=NS, pairs=[(b, a)])
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
    return {
        "ok": mode.numel < m * n,
        "largest_numel": mode.numel,
        "largest_op": mode.op,
        "largest_shape": mode.shape,
        "limit": m * n,
        "shape": (m, r, n),
        "peak_bytes": peak,
    }


#: aten operations that write a new copy of existing data (the profiler also sees those nested in other kernels,
#: e.g. the column-major copies LAPACK-backed ``linalg_qr`` and ``linalg_solve_triangular`` make of their inputs).
COPY_OPS = ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::stack")


def count_copies(case: Case, steps: int = 3) -> dict[str, float]:
    """Per ``step()`` of IMuon on ``case`` (after one warm-up step): calls of each :data:`COPY_OPS` operation and
    the self time of ``aten::copy_`` (ms), from torch.profiler (nested calls included), and the number of all aten
    operations."""
    from torch.profiler import ProfilerActivity, profile

    opt = case.make["IMuon"]()[0]
    opt.step()
    _sync()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            opt.step()
        _sync()
    out = {name: 0.0 for name in COPY_OPS}
    out["copy_ ms"] = 0.0
    out["aten ops"] = 0.0
    for ev in prof.key_averages():
        if ev.key in out:
            out[ev.key] = ev.count / steps
        if ev.key == "aten::copy_":
            out["copy_ ms"] = ev.self_cpu_time_total / 1e3 / steps
        if ev.key.startswith("aten::"):
            out["aten ops"] += ev.count / steps
    return out


def profile_imuon(case: Case, steps: int = 5, rows: int = 12) -> str:
    """torch.profiler's table of the most expensive operations over ``steps`` of IMuon's ``step()``."""
    from torch.profiler import ProfilerActivity, profile

    opt = case.make["IMuon"]()[0]
    opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            opt.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def markdown(cases: list[Case], threads: int) -> str:
    lines = ["| threads | case | optimizer | median step (ms) | ratios | target |", "|---|---|---|---|---|---|"]
    for case in cases:
        for name, t in case.times.items():
            ratios, targets = [], []
            for ref, target in case.targets.items():
                ratio = t / case.times[ref]
                ratios.append(f"{ratio:.2f}x {ref}")
                if name.startswith("IMuon") and target is not None:
                    targets.append(f"<= {target}x {ref}: {'met' if ratio <= target else 'MISSED'}")
            lines.append(
                f"| {threads} | {case.name} | {name} | {1e3 * t:.3f} | {'; '.join(ratios)} | {'; '.join(targets)} |"
            )
    return "\n".join(lines)


def machine() -> str:
    gpu = f"{torch.cuda.get_device_name(DEVICE)}, " if DEVICE.type == "cuda" else ""
    return (
        f"{gpu}{platform.machine()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), geoopt {geoopt.__version__}, "
        f"Python {platform.python_version()}"
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke test)")
    parser.add_argument("--threads", default=None, help="torch intra-op threads, e.g. 1 or 1,2 (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per optimizer (default 30; quick 5)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", default=None, help="comma-separated case keys (default: all)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of IMuon's steps")
    parser.add_argument(
        "--copies", action="store_true", help="count tensor copies per IMuon.step() (torch.profiler, nested included)"
    )
    parser.add_argument(
        "--graphs", action="store_true", help="on CUDA: also capturable IMuon and fused AdamW replayed from CUDA graphs"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    args = parser.parse_args(argv)
    global DEVICE, GRAPHS
    DEVICE = torch.device(args.device)
    GRAPHS = bool(args.graphs) and DEVICE.type == "cuda"
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA build of torch and a GPU")
    thread_counts = [int(v) for v in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    repeats = args.repeats or (5 if args.quick else 30)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    print(f"machine: {machine()}; load average {os.getloadavg() if hasattr(os, 'getloadavg') else 'n/a'}")
    print(f"command: python benchmarks/bench_optim.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    cases, (m, r, n) = build_cases(args.quick, g)
    if args.only:
        keys = set(args.only.split(","))
        cases = [c for c in cases if c.key in keys]
    tables = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for case in cases:
            time_case(case, args.warmup, repeats)
            print(f"  timed {case.name} ({threads} threads)", flush=True)
        tables.append(markdown(cases, threads))
        if args.copies:
            for case in cases:
                c = count_copies(case)
                calls = ", ".join(f"{k} {c[k]:.0f}" for k in COPY_OPS)
                print(
                    f"  copies per IMuon.step() on {case.name} ({threads} threads): {calls}; aten::copy_ self time "
                    f"{c['copy_ ms']:.2f} ms; {c['aten ops']:.0f} aten operations"
                )
        if args.profile:
            for case in cases:
                print(f"\ntorch.profiler, IMuon.step() on {case.name}, {threads} threads:\n{profile_imuon(case)}")
    table = "\n".join([tables[0]] + [t.split("\n", 2)[2] for t in tables[1:]])
    load = os.getloadavg() if hasattr(os, "getloadavg") else "n/a"
    print(
        f"\nmedian of {repeats} interleaved steps after {args.warmup} warm-up steps (24-matrix case: 3 after 1), "
        f"float32 parameters on {DEVICE}; load average at the end {load}\n\n{table}\n"
    )

    check = pair_allocation_check(m, r, n, g)
    verdict = "PASS" if check["ok"] else "FAIL"
    print(
        f"LoRA pair {m}x{r} / {r}x{n}: largest tensor produced during IMuon.step() has {check['largest_numel']} "
        f"entries ({check['largest_op']}, shape {check['largest_shape']}); m*n = {check['limit']}: {verdict} "
        "(no m x n allocation)"
    )
    if check["peak_bytes"] is not None:
        print(
            f"  peak device memory during 2 steps, above parameters, gradients and state: "
            f"{check['peak_bytes'] / 2**20:.2f} MiB (an m x n float32 matrix: {4 * m * n / 2**20:.0f} MiB)"
        )
    return {"cases": cases, "table": table, "allocation": check, "threads": thread_counts}


if __name__ == "__main__":
    sys.exit(0 if main()["allocation"]["ok"] else 1)
