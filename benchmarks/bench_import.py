"""Benchmark: the cost of importing the package, against the host libraries it sits on.

Each measurement is a fresh interpreter (``python -X importtime`` is not used: it adds its own overhead) that times
one import statement with ``time.perf_counter`` around it; the cases are interleaved round by round so that load
changes hit all of them alike, and the median over rounds is reported.

- ``torch + geoopt``: ``import torch, geoopt`` (the floor: the torch adapter cannot be cheaper);
- ``imuon_manopt.optim``: ``import imuon_manopt.optim`` (torch, geoopt and the adapter);
- ``imuon_manopt.optimizers``: the Pymanopt adapter (torch and pymanopt);
- ``imuon_manopt``: the top-level package (the version only);
- ``optim after torch + geoopt``: in one interpreter, ``import torch, geoopt`` first, then only
  ``import imuon_manopt.optim`` is timed: the adapter's own cost, paired, so less noisy than the difference of
  the first two rows.

Target (issue 16): ``import imuon_manopt.optim`` <= ``import torch, geoopt`` + 0.15 s.

Usage::

    python benchmarks/bench_import.py              # 15 rounds
    python benchmarks/bench_import.py --rounds 3   # quick
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_EXTRA_S = 0.15
CASES: dict[str, str | tuple[str, str]] = {
    "torch + geoopt": "import torch, geoopt",
    "imuon_manopt.optim": "import imuon_manopt.optim",
    "imuon_manopt.optimizers": "import imuon_manopt.optimizers",
    "imuon_manopt": "import imuon_manopt",
    "optim after torch + geoopt": ("import torch, geoopt", "import imuon_manopt.optim"),
}


def time_import(statement: str | tuple[str, str]) -> float:
    """Seconds one fresh interpreter spends on ``statement`` (a pair: the second, after the first untimed)."""
    setup, timed = statement if isinstance(statement, tuple) else ("", statement)
    code = f"import time\n{setup}\nt0 = time.perf_counter()\n{timed}\nprint(time.perf_counter() - t0)"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=300)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="fresh interpreters per case (interleaved)")
    args = parser.parse_args(argv)

    for statement in CASES.values():  # warm the file cache once, unmeasured
        time_import(statement)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, statement in CASES.items():
            times[name].append(time_import(statement))
    median = {name: statistics.median(ts) for name, ts in times.items()}

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, load {load[0]:.2f}")
    print(f"{args.rounds} rounds, fresh interpreter each, interleaved; median seconds\n")
    print("| import | median s | min s | max s |")
    print("|---|---|---|---|")
    for name in CASES:
        print(f"| `{name}` | {median[name]:.3f} | {min(times[name]):.3f} | {max(times[name]):.3f} |")
    extra = median["imuon_manopt.optim"] - median["torch + geoopt"]
    paired = median["optim after torch + geoopt"]
    for what, value in (("difference of medians", extra), ("paired, same interpreter", paired)):
        verdict = "met" if value <= TARGET_EXTRA_S else "MISSED"
        print(f"imuon_manopt.optim beyond torch + geoopt, {what}: {value:+.3f} s (<= {TARGET_EXTRA_S}: {verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
