"""Benchmark: the Muon family's solvers and switches (README "Norms and variants").

1. **Step cost**: one IMuon step on a single plain matrix with the randomized Ky Fan LMO (``k = d / 8``, ``d =
   min(m, n)``; ``{"method": "randomized", "oversample": 8, "power_iters": 2}``) against the default 5-step
   Newton–Schulz step (Polar Express), interleaved in one run (median of ``--repeats``), also the LMO kernels alone.
   Target: randomized <= 0.3x Newton–Schulz on 4096 x 4096 and 8192 x 2048 in float32 and bfloat16 (bfloat16:
   bfloat16 parameters, both solvers' matmuls in bfloat16 through ``polar={"dtype": torch.bfloat16}``).
2. **Accuracy** of the randomized solver against the exact Ky Fan LMO on power-law spectra ``s_i = i^-a``
   (gradient-like; float64): ``1 - <G, Z> / KF_k(G)`` (the objective gap; target <= 1e-3) and the direction error
   ``||Z - U_k V_k^T||_F / sqrt(k)``, for several ``a`` and (oversample, power_iters).
3. **The exact Ky Fan LMO** on thin float32 blocks: the Gram/eigh path against the thin SVD.
4. **MiMuon's switch** at GPT-2-small shapes: the smallest relative singular gap ``min_i (s_i - s_{i+1}) / s_1`` of
   Gaussian and power-law matrices, and how often it reaches a threshold (the step orthogonalizes only then).

Usage::

    python benchmarks/bench_family.py --quick          # small shapes, seconds
    python benchmarks/bench_family.py                  # the targets' shapes (float32 4096^2: ~20 s per NS step)
    python benchmarks/bench_family.py --parts cost --dtypes bfloat16 --shapes 1024x1024 2048x512
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imuon_manopt.lmo import lmo  # noqa: E402
from imuon_manopt.optim import IMuon  # noqa: E402
from imuon_manopt.polar import polar  # noqa: E402
from imuon_manopt.transforms import relative_gap  # noqa: E402

RANDOMIZED = {"method": "randomized", "oversample": 8, "power_iters": 2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def power_law(m: int, n: int, a: float, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``U diag(i^-a) V^T`` with Haar-random ``U``, ``V`` (float64, then cast)."""
    g = torch.Generator().manual_seed(seed)
    d = min(m, n)
    u = torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64)).Q
    s = torch.arange(1, d + 1, dtype=torch.float64) ** -a
    return ((u * s) @ v.T).to(dtype)


def _shape(text: str) -> tuple[int, int]:
    m, n = (int(v) for v in text.split("x"))
    return m, n


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _cost_case(m: int, n: int, dt: torch.dtype, k: int, repeats: int) -> tuple[list[float], list[float]]:
    """Median seconds of (NS5 step, randomized step) and of (NS5 kernel, randomized kernel), interleaved."""
    g = power_law(m, n, 1.0, 0, dt).mul_(1e-2)
    mm = torch.bfloat16 if dt == torch.bfloat16 else None  # bfloat16: both solvers' matmuls in bfloat16
    ns = {"method": "newton_schulz", "steps": 5, "dtype": mm}
    rnd = {**RANDOMIZED, "dtype": mm}
    params, opts = [], []
    for polar_opt, norm in ((ns, "spectral"), (rnd, ("kyfan", k))):
        w = torch.nn.Parameter(torch.zeros(m, n, dtype=dt))
        params.append(w)
        opts.append(IMuon([w], lr=0.01, momentum=0.95, norm=norm, polar=polar_opt))

    def step(i: int) -> None:
        params[i].grad = g
        opts[i].step()

    for i in (0, 1):  # warm-up (first-step checks, grouping)
        step(i)
    times: list[list[float]] = [[], []]
    kern: list[list[float]] = [[], []]
    for _ in range(repeats):  # interleaved
        for i in (0, 1):
            times[i] += _time(lambda i=i: step(i), 1)
        kern[0] += _time(lambda: polar(g, method="newton_schulz", steps=5, dtype=mm), 1)
        kern[1] += _time(lambda: lmo(g, ("kyfan", k), method="randomized", dtype=mm), 1)
    return [statistics.median(t) for t in times], [statistics.median(t) for t in kern]


def part_cost(shapes: list[str], dtypes: list[str], repeats: int) -> list[str]:
    rows = [
        "| shape | dtype | k | NS5 step (s) | randomized Ky Fan step (s) | ratio | NS5 kernel (s) "
        "| randomized kernel (s) | kernel ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for text in shapes:
        m, n = _shape(text)
        k = min(m, n) // 8
        for name in dtypes:
            med, kmed = _cost_case(m, n, DTYPES[name], k, repeats)
            rows.append(
                f"| {text} | {name} | {k} | {med[0]:.3g} | {med[1]:.3g} | **{med[1] / med[0]:.3f}** | {kmed[0]:.3g} "
                f"| {kmed[1]:.3g} | {kmed[1] / kmed[0]:.3f} |"
            )
            print(rows[-1], flush=True)
    return rows


def part_exact(shapes: list[str], repeats: int) -> list[str]:
    """The exact Ky Fan LMO of a thin float32 block: the Gram/eigh path (what ``lmo`` picks on a CPU) against the
    thin SVD's ``U_k V_k^T``, interleaved; and their difference."""
    rows = [
        "| shape | k | SVD U_k V_k^T (s) | Gram/eigh (s) | ratio | max abs difference |",
        "|---|---|---|---|---|---|",
    ]
    for text in shapes:
        m, n = _shape(text)
        k = min(m, n) // 8
        g = power_law(m, n, 1.0, 2, torch.float32)

        def svd_topk(g: torch.Tensor = g, k: int = k) -> torch.Tensor:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            return u[:, :k] @ vh[:k]

        def gram(g: torch.Tensor = g, k: int = k) -> torch.Tensor:
            return lmo(g, ("kyfan", k))

        svd_topk(), gram()
        t_svd: list[float] = []
        t_gram: list[float] = []
        for _ in range(repeats):
            t_svd += _time(svd_topk, 1)
            t_gram += _time(gram, 1)
        a, b = statistics.median(t_svd), statistics.median(t_gram)
        diff = float((svd_topk() - gram()).abs().max())
        rows.append(f"| {text} | {k} | {a:.3g} | {b:.3g} | **{b / a:.3f}** | {diff:.1e} |")
        print(rows[-1], flush=True)
    return rows


def part_accuracy(shapes: list[str], exponents: list[float], settings: list[tuple[int, int]]) -> list[str]:
    rows = [
        "| shape | a (s_i = i^-a) | k | oversample | power_iters | 1 - <G,Z>/KF_k | direction error |",
        "|---|---|---|---|---|---|---|",
    ]
    for text in shapes:
        m, n = _shape(text)
        k = min(m, n) // 8
        for a in exponents:
            g = power_law(m, n, a, 1)
            u, s, vh = torch.linalg.svd(g, full_matrices=False)
            exact = u[:, :k] @ vh[:k]
            kf = float(s[:k].sum())
            for p, q in settings:
                z = lmo(g, ("kyfan", k), method="randomized", oversample=p, power_iters=q)
                gap = 1.0 - float((g * z).sum()) / kf
                err = float(torch.linalg.matrix_norm(z - exact)) / k**0.5
                rows.append(f"| {text} | {a:g} | {k} | {p} | {q} | {gap:.2e} | {err:.2e} |")
                print(rows[-1], flush=True)
    return rows


def part_mimuon(shapes: list[str], draws: int, thresholds: list[float]) -> list[str]:
    rows = [
        "| shape | matrices | min gap / s_1: min | median | max | "
        + " | ".join(f"orthogonalizes at tau={t:g}" for t in thresholds)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(thresholds),
    ]
    for text in shapes:
        m, n = _shape(text)
        for kind in ("gaussian", "power law a=1"):
            gaps = []
            for seed in range(draws):
                if kind == "gaussian":
                    h = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
                else:
                    h = power_law(m, n, 1.0, seed, torch.float32)
                gaps.append(float(relative_gap(h)))
            gaps.sort()
            rates = " | ".join(f"{sum(x >= t for x in gaps) / len(gaps):.0%}" for t in thresholds)
            rows.append(
                f"| {text} | {kind} ({draws}) | {gaps[0]:.2e} | {statistics.median(gaps):.2e} | {gaps[-1]:.2e} | "
                f"{rates} |"
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    ap.add_argument("--parts", nargs="+", default=["cost", "exact", "accuracy", "mimuon"])
    ap.add_argument("--shapes", nargs="+", default=None, help="cost shapes, e.g. 4096x4096 8192x2048")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: dict[str, list[str]] = {}
    cost_shapes = args.shapes or (["256x256", "512x128"] if args.quick else ["4096x4096", "8192x2048"])
    dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    cpu = platform.processor() or platform.machine()
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("Model name:")[1].splitlines()[0]
    except (OSError, IndexError):
        pass
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU {cpu.strip()}, load {load}")
    if "cost" in args.parts:
        out["cost"] = part_cost(cost_shapes, dtypes, args.repeats)
    if "exact" in args.parts:
        out["exact"] = part_exact(["512x64"] if args.quick else ["4096x256", "8192x512"], args.repeats)
    if "accuracy" in args.parts:
        shapes = ["256x256"] if args.quick else ["1024x1024", "2048x512"]
        settings = [(8, 2)] if args.quick else [(8, 1), (8, 2), (16, 2), (8, 3)]
        out["accuracy"] = part_accuracy(shapes, [1.0] if args.quick else [0.5, 1.0, 1.5, 2.0], settings)
    if "mimuon" in args.parts:
        shapes = ["64x64"] if args.quick else ["768x768", "768x3072", "768x2304"]
        out["mimuon"] = part_mimuon(shapes, 3 if args.quick else 10, [1e-4, 1e-3, 1e-2])
    try:
        print(f"load after: {os.getloadavg()}")
    except OSError:
        pass
    return out


if __name__ == "__main__":
    main()
