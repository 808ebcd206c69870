"""The main demonstration of imuon_manopt (run by ``bash scripts/demo.sh``).

1. The core: closed-form iMuon directions on a few manifolds, with the properties the method promises checked
   numerically (LMO gap, tangency, invariances), and ``examples/custom_metric.py`` (a metric plugged in by hand).
2. The Pymanopt solver ``imuon_manopt.optimizers.IMuon`` against Pymanopt's SteepestDescent, ConjugateGradient and
   TrustRegions on three problems: dominant subspace (``pca.py``), Karcher mean of SPD matrices
   (``karcher_mean.py``) and low-rank matrix completion with the factor-gauge experiment
   (``matrix_completion.py``). One progress line per run, tables on screen, tables and plots in ``--output``.
3. The torch optimizer ``imuon_manopt.optim.IMuon`` against geoopt's RiemannianSGD/RiemannianAdam, AdamW and
   torch.optim.Muon: Stiefel, SPD, Grassmann and LoRA pairs (``torch_*.py``).
4. LoRA fine-tuning of a small byte-level GPT on real text (``benchmarks/bench_lora_text.py --quick``: pretrained on
   the standard library's source, fine-tuned on ``pydoc_data.topics``), iMuon against AdamW and torch.optim.Muon,
   with the gauge experiment; its tables and plots go to ``--output``/lora_text.
5. Pretraining the same GPT from scratch (``benchmarks/bench_pretrain.py --quick``): the Muon family (iMuon, Ky Fan,
   F-Muon, MuonEq, ROOT, MiMuon, as far as this build has them) against AdamW and torch.optim.Muon on the hidden
   matrices; its tables and plots go to ``--output``/pretrain.

About 9-13 minutes on 2 CPU cores, part 5 ~2.5-3 of them (plus ~2-3 minutes the first time, to pretrain the GPT of
part 4; the checkpoint is cached under benchmarks/.cache); ``--quick`` runs a smoke version in 1-2 minutes.

Run: ``python examples/demo.py --output demo_output`` (``--quick``, ``--skip-core``, ``--skip-torch``,
``--skip-lora-text``, ``--skip-pretrain``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

# The problems here are small: one BLAS / OpenMP thread per process is faster and gives steadier timings on a shared
# machine (set before numpy and torch are imported; an explicit environment setting wins).
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _compare as cmp  # noqa: E402
import karcher_mean  # noqa: E402
import matrix_completion  # noqa: E402
import pca  # noqa: E402

# The torch examples (each takes ~10-20 s at full size on 2 CPU cores, ~2 s with --quick).
TORCH_EXAMPLES = (
    ("torch_stiefel", "a classifier with an orthonormal (Stiefel) feature map"),
    ("torch_spd", "a Gaussian covariance (SPD) by maximum likelihood"),
    ("torch_grassmann", "subspace learning on imuon_manopt.manifolds.Grassmann"),
    ("torch_lora", "LoRA factor pairs and the gauge (B M, M^-1 A)"),
)


class _Tee(io.StringIO):
    """Collects what is printed and passes it on."""

    def __init__(self, stream) -> None:
        super().__init__()
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(text)
        return super().write(text)

    def flush(self) -> None:
        self._stream.flush()


def _banner(text: str) -> None:
    print("\n" + "=" * 100 + f"\n{text}\n" + "=" * 100, flush=True)


def core_checks(seed: int = 0) -> list[tuple[str, str, float, float]]:
    """Closed-form directions from :func:`imuon_manopt.direction.intrinsic_direction`; returns rows
    ``(geometry, property, measured, tolerance)``."""
    from imuon_manopt.direction import intrinsic_direction
    from imuon_manopt.geometry import SPD, Euclidean, FixedRank, Grassmann, Stiefel

    rng = np.random.default_rng(seed)
    rows = []

    def nuclear(a):
        return float(np.linalg.svd(a, compute_uv=False).sum())

    def rel(a, b):
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))

    # Euclidean: Muon, xi = polar(E), gap = ||E||_*
    e = rng.standard_normal((30, 8))
    xi, gap = intrinsic_direction(Euclidean(), e * 0.0, e)
    u, _, vt = np.linalg.svd(e, full_matrices=False)
    rows.append(("Euclidean", "xi = polar(E) (Muon)", rel(xi, u @ vt), 1e-10))
    rows.append(("Euclidean", "gap = nuclear norm of E", abs(float(gap) - nuclear(e)) / nuclear(e), 1e-10))

    # Stiefel: tangency and first-order descent
    x = np.linalg.qr(rng.standard_normal((40, 5)))[0]
    e = rng.standard_normal((40, 5))
    xi, gap = intrinsic_direction(Stiefel(), x, e)
    rows.append(("Stiefel", "tangency |X^T xi + xi^T X|", float(np.abs(x.T @ xi + xi.T @ x).max()), 1e-10))
    rows.append(("Stiefel", "gap = <E, xi>", abs(float(gap) - float(np.sum(e * xi))) / float(gap), 1e-10))

    # Grassmann (general representative): GL(p) equivariance xi(Y M, E M^-T) = xi(Y, E) M
    y = rng.standard_normal((40, 4))
    m = rng.standard_normal((4, 4)) + 3 * np.eye(4)
    e = rng.standard_normal((40, 4))
    g = Grassmann(representative="general")
    xi1 = intrinsic_direction(g, y, e).xi
    xi2 = intrinsic_direction(g, y @ m, e @ np.linalg.inv(m).T).xi
    rows.append(("Grassmann", "equivariance xi(YM, EM^-T) = xi(Y,E) M", rel(xi2, xi1 @ m), 1e-8))

    # SPD: congruence invariance xi(P X P^T, P^-T E P^-1) = P xi(X, E) P^T
    a = rng.standard_normal((6, 6))
    xspd = a @ a.T + 6 * np.eye(6)
    e = rng.standard_normal((6, 6))
    e = 0.5 * (e + e.T)
    p = rng.standard_normal((6, 6)) + 4 * np.eye(6)
    pinv = np.linalg.inv(p)
    xi1 = intrinsic_direction(SPD(), xspd, e).xi
    xi2 = intrinsic_direction(SPD(), p @ xspd @ p.T, pinv.T @ e @ pinv).xi
    rows.append(("SPD", "congruence invariance", rel(xi2, p @ xi1 @ p.T), 1e-8))

    # Fixed rank: gauge invariance of the ambient direction for (B M, M^-1 A)
    b, a = rng.standard_normal((50, 3)), rng.standard_normal((3, 60))
    gamma = rng.standard_normal((50, 60))
    m = rng.standard_normal((3, 3)) + 2 * np.eye(3)
    minv = np.linalg.inv(m)
    xb, xa = intrinsic_direction(FixedRank(), (b, a), (gamma @ a.T, b.T @ gamma)).xi
    b2, a2 = b @ m, minv @ a
    yb, ya = intrinsic_direction(FixedRank(), (b2, a2), (gamma @ a2.T, b2.T @ gamma)).xi
    rows.append(("FixedRank", "gauge invariance of xi_B A + B xi_A", rel(yb @ a2 + b2 @ ya, xb @ a + b @ xa), 1e-8))
    # Per-factor Muon (Euclidean on each factor) is not invariant:
    mb, ma = intrinsic_direction(Euclidean(), b, gamma @ a.T).xi, intrinsic_direction(Euclidean(), a, b.T @ gamma).xi
    nb, na = (
        intrinsic_direction(Euclidean(), b2, gamma @ a2.T).xi,
        intrinsic_direction(Euclidean(), a2, b2.T @ gamma).xi,
    )
    rows.append(
        ("FixedRank", "(contrast) per-factor Muon changes by", rel(nb @ a2 + b2 @ na, mb @ a + b @ ma), float("inf"))
    )
    return rows


def core_demo() -> str:
    rows = core_checks()
    lines = [
        "## Core: closed-form iMuon directions",
        "",
        "| geometry | property | measured | tolerance | ok |",
        "|---|---|---|---|---|",
    ]
    for geometry, prop, value, tol in rows:
        ok = "yes" if value <= tol else "NO"
        tol_text = f"{tol:.0e}" if np.isfinite(tol) else "(not invariant)"
        lines.append(f"| {geometry} | {prop} | {value:.2e} | {tol_text} | {ok if np.isfinite(tol) else '-'} |")
    return "\n".join(lines)


def custom_metric_demo() -> str | None:
    """Run ``examples/custom_metric.py``'s ``main`` if it exists; returns its output."""
    path = os.path.join(HERE, "custom_metric.py")
    if not os.path.exists(path):
        return None
    import importlib

    module = importlib.import_module("custom_metric")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        module.main()
    return buffer.getvalue()


def _load_benchmark(name: str):
    """The module ``benchmarks/<name>.py``, imported under ``name`` (the benchmarks are not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(HERE), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look the module up there
    spec.loader.exec_module(bench)
    return bench


def lora_text_demo(output: str, quick: bool, threads: int) -> dict:
    """``benchmarks/bench_lora_text.py --quick`` (best rates of its full run, one seed) into ``output/lora_text``.

    With ``quick`` (the demo's smoke version) the GPT is pretrained for a few steps only and the fine-tuning is
    short, with its own checkpoint cache inside ``output``; otherwise the benchmark's cached checkpoint is used.
    """
    bench = _load_benchmark("bench_lora_text")
    argv = ["--quick", "--output", os.path.join(output, "lora_text"), "--threads", str(max(1, threads))]
    if quick:
        argv += [
            "--pretrain-steps",
            "20",
            "--steps",
            "20",
            "--batch",
            "8",
            "--final-windows",
            "128",
            "--curve-windows",
            "32",
            "--cache",
            os.path.join(output, "lora_text", "cache"),
        ]
    return bench.main(argv)


def pretrain_demo(output: str, quick: bool, threads: int) -> dict:
    """``benchmarks/bench_pretrain.py --quick`` (best rates of its full run, one seed) into ``output/pretrain``.

    With ``quick`` (the demo's smoke version) the runs are a few steps on a few windows.
    """
    bench = _load_benchmark("bench_pretrain")
    argv = ["--quick", "--output", os.path.join(output, "pretrain"), "--threads", str(max(1, threads))]
    if quick:
        argv += ["--steps", "6", "--batch", "4", "--eval-every", "3", "--curve-windows", "8", "--final-windows", "32"]
        argv += ["--cost-reps", "2"]
    return bench.main(argv)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo_output", help="folder for the tables (.md) and plots (.png)")
    parser.add_argument("--quick", action="store_true", help="a smoke version (< 1 minute)")
    parser.add_argument("--skip-core", action="store_true", help="skip the core checks (section 1)")
    parser.add_argument("--skip-torch", action="store_true", help="skip the torch/geoopt examples (section 5)")
    parser.add_argument(
        "--skip-lora-text",
        action="store_true",
        help="skip the LoRA fine-tuning on real text (section 6, benchmarks/bench_lora_text.py)",
    )
    parser.add_argument(
        "--skip-pretrain",
        action="store_true",
        help="skip the pretraining from scratch (section 7, benchmarks/bench_pretrain.py)",
    )
    cmp.add_thread_option(parser)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    start = time.time()
    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    threads = cmp.set_torch_threads(args.torch_threads)
    print(
        f"imuon_manopt demo: output folder {output}; {os.cpu_count()} CPUs, torch threads {threads}"
        f"{'; quick mode' if args.quick else ''}",
        flush=True,
    )
    sections = []

    if not args.skip_core:
        _banner("1. Core: closed-form directions")
        text = core_demo()
        print(text)
        sections.append(text)
        custom = custom_metric_demo()
        if custom is not None:
            _banner("1b. examples/custom_metric.py: a metric plugged in through MetricOperator")
            print(custom)
            sections.append("## examples/custom_metric.py\n\n```\n" + custom.rstrip() + "\n```")

    def progress(line: str) -> None:
        print(f"[{time.time() - start:6.1f} s] {line.strip()}", flush=True)

    quick = (["--quick"] if args.quick else []) + ["--torch-threads", str(args.torch_threads)]
    runs = {}
    _banner("2. Dominant subspace (PCA) on Grassmann and Stiefel")
    pca_args = quick + ["--output", output] + ([] if args.quick else ["--max-time", "5"])
    runs["pca"] = pca.main(pca_args, progress=progress)
    _banner("3. Karcher mean of SPD matrices")
    runs["karcher_mean"] = karcher_mean.main(
        quick + ["--output", output] + ([] if args.quick else ["--max-time", "5"]), progress=progress
    )
    _banner("4. Matrix completion on FixedRankEmbedded, and the gauge experiment")
    mc_args = ["--torch-threads", str(args.torch_threads)]
    mc_args += (
        ["--quick", "--max-time", "0.75"] if args.quick else ["--kappas", "1", "10", "100", "1000", "--max-time", "4"]
    )
    runs["matrix_completion"] = matrix_completion.main(mc_args + ["--output", output], progress=progress)

    for stem in ("pca", "karcher_mean", "matrix_completion"):
        path = os.path.join(output, f"{stem}.md")
        if os.path.exists(path):
            with open(path) as handle:
                sections.append(handle.read())

    if not args.skip_torch:
        _banner("5. torch / geoopt: imuon_manopt.optim.IMuon against RiemannianSGD/Adam, AdamW, Muon")
        torch_args = (["--quick"] if args.quick else []) + ["--output", output]
        for stem, title in TORCH_EXAMPLES:
            progress(f"{stem}: {title}")
            module = __import__(stem)
            buffer = _Tee(sys.stdout)
            with contextlib.redirect_stdout(buffer):
                runs[stem] = module.main(torch_args)
            sections.append(f"## examples/{stem}.py: {title}\n\n" + buffer.getvalue().strip())

    if not args.skip_lora_text:
        _banner("6. LoRA fine-tuning of a byte-level GPT on real text (benchmarks/bench_lora_text.py --quick)")
        runs["lora_text"] = lora_text_demo(output, args.quick, args.torch_threads)
        sections.append(
            "## benchmarks/bench_lora_text.py --quick: LoRA on real text\n\n"
            + runs["lora_text"]["text"].split("\n", 2)[2].strip()
        )
    if not args.skip_pretrain:
        _banner(
            "7. Pretraining the byte-level GPT from scratch: the Muon family (benchmarks/bench_pretrain.py --quick)"
        )
        runs["pretrain"] = pretrain_demo(output, args.quick, args.torch_threads)
        sections.append(
            "## benchmarks/bench_pretrain.py --quick: pretraining from scratch\n\n"
            + runs["pretrain"]["text"].split("\n", 2)[2].strip()
        )
    summary = cmp.write_text(os.path.join(output, "summary.md"), "# imuon_manopt demo\n\n" + "\n\n".join(sections))
    elapsed = time.time() - start
    files = sorted(f for f in os.listdir(output) if f.endswith((".md", ".png")))
    _banner(f"Done in {elapsed:.0f} s. Tables and plots in {output}:")
    for name in files:
        print(f"  {os.path.join(output, name)}")
    print(f"(all tables in one file: {summary})")
    return runs


if __name__ == "__main__":
    main()
