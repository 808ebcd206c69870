"""Benchmark: pretraining a small byte-level GPT from scratch, the Muon family against AdamW and torch.optim.Muon.

Nothing is downloaded. The model, the data and the learning-rate search are those of ``bench_lora_text.py``
(imported, not copied): a GPT-2 (``transformers.GPT2LMHeadModel``; 2 layers, width 128, 4 heads, context 64,
vocabulary the 256 byte values, no dropout) learns the standard library's own top-level ``.py`` files (sorted by
name, the last 2 % held out), here from a random start for a fixed budget of steps.

Every 2-D hidden matrix (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj`` of each block; GPT-2's
``Conv1D`` stores them as ``(in, out)``) is under the optimizer being compared; the embeddings (token, tied with the
output head, and position), the layer norms and the biases are on AdamW with one fixed setting shared by every run
(``REST``), as Muon users do. What is compared, each one line of configuration (``VARIANTS``):

- ``AdamW`` on the hidden matrices too;
- ``Muon``: ``torch.optim.Muon`` (Keller's Newton–Schulz, momentum 0.95, Nesterov);
- ``iMuon``: :class:`imuon_manopt.optim.IMuon`, the spectral LMO (Polar Express Newton–Schulz);
- ``Ky Fan d/4``: ``norm=("kyfan", 32)`` (Fanion-k, the top-k singular pairs ``U_k V_k^T``; exact by SVD) and the
  same with the randomized range finder (``polar={"method": "randomized", "oversample": 8, "power_iters": 2}``,
  low-rank orthogonalization), each with and without Dion's error feedback (``error_feedback=True``);
- ``F-Muon``: ``norm=("fmuon", 0.5)``, the LMO ``alpha polar(H) + (1 - alpha) H / ||H||_F``;
- ``MuonEq-R``: the spectral LMO after row equilibration of the momentum. The paper's rows are the output features of
  an ``nn.Linear`` weight ``(out, in)``; GPT-2's ``Conv1D`` stores ``(in, out)``, so that is
  ``input_transform="muoneq_col"`` here;
- ``ROOT clip``: the spectral LMO after clipping the momentum at its 90th percentile of ``|entries|``
  (``input_transform=("root_clip", 0.9)``);
- ``MiMuon``: the momentum itself where the singular values are not well separated, else the spectral LMO
  (``input_transform=("mimuon", threshold)``).

A variant whose options this build of the package does not accept (say, a norm not yet implemented) is reported as
"not available" with the error, not run. Every iMuon variant and Muon use ``adjust_lr_fn="original"``
(``lr * sqrt(max(1, a / b))`` on the stored shape), torch.optim.Muon's default; no weight decay anywhere.

Schedule: linear warmup over the first 5 % of the steps, then cosine decay to 0, for the hidden matrices and the
rest alike. Per seed, every optimizer starts from the same random model and sees the same minibatches.

Learning rates: the half-decade grid of ``bench_lora_text.py`` per variant on seed 0, widened until the best final
held-out loss has a neighbour on both sides (a diverged run counts as infinitely bad); then every seed at the best
rate. ``--quick`` runs the best rates of the full run (``QUICK_LRS``) on one seed.

Reported (``results.md``, ``results.json`` in ``--output``): held-out loss after the last step (mean, spread, per
seed against AdamW and against Muon), ms per step (zero_grad, forward, backward, both optimizers' ``step()``) and
ms per ``step()`` of the hidden-matrix optimizer alone (medians over the best-rate runs, which are interleaved seed
by seed so that a change of machine load hits every variant alike), a winner per budget: the step budget (final
held-out loss) and a time budget (held-out loss reached within the training seconds of the fastest variant's whole
run, read off each curve); plots of the held-out loss against steps and against seconds, and of the grids.

Usage::

    python benchmarks/bench_pretrain.py            # full run: grids on seed 0, 3 seeds at the best rates
    python benchmarks/bench_pretrain.py --quick    # best rates of the full run, 1 seed

Times on 2 CPU cores at 1 thread: see benchmarks/RESULTS.md ("Pretraining from scratch").
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_lora_text as lt  # noqa: E402 - the model, the data and the grid search live there

from imuon_manopt.optim import IMuon  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")

DEFAULT_OUTPUT = ROOT / "benchmarks" / "output" / "pretrain"
#: The hidden matrices of every block (the rest, embeddings, norms and biases, are on AdamW).
HIDDEN = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
#: Ky Fan k = d / 4 with d the model width (the smaller side of every hidden matrix).
KYFAN_K = lt.MODEL["n_embd"] // 4
RANDOMIZED = {"method": "randomized", "oversample": 8, "power_iters": 2}
FMUON_ALPHA = 0.5
ROOT_PERCENTILE = 0.9
MIMUON_THRESHOLD = 1e-3
#: AdamW on the embeddings, norms and biases: the same for every run (its lr follows the schedule).
REST = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class Variant:
    """One compared optimizer of the hidden matrices: ``kind`` ``adamw``, ``muon`` or ``imuon`` with the IMuon
    options (constructor keywords and param-group options), where its grid starts, the paper it stands for, what
    it is in the iMuon template, and its one line of configuration."""

    kind: str
    options: dict = field(default_factory=dict)
    center: float = 1e-2
    paper: str = ""
    what: str = ""
    config: str = ""


_KF = f'norm=("kyfan", {KYFAN_K})'
_RAND = 'polar={"method": "randomized", "oversample": 8, "power_iters": 2}'
VARIANTS: dict[str, Variant] = {
    "AdamW": Variant(
        "adamw", {}, 3e-3, "AdamW (Loshchilov, Hutter)", "reference: elementwise, no norm", "torch.optim.AdamW"
    ),
    "Muon": Variant(
        "muon",
        {},
        3e-2,
        "Muon (Jordan et al.), torch.optim.Muon",
        "spectral LMO, Euclidean; Keller's Newton–Schulz in bfloat16",
        "torch.optim.Muon",
    ),
    "iMuon": Variant(
        "imuon",
        {},
        3e-2,
        "iMuon (arXiv 2605.09238)",
        "intrinsic LMO of the spectral norm (Euclidean metric on plain matrices)",
        "IMuon(params, lr)",
    ),
    "Ky Fan d/4": Variant(
        "imuon",
        {"norm": ("kyfan", KYFAN_K), "polar": "svd"},
        1e-1,
        "Fanion-k / Ky Fan norms (Kravatskiy et al., arXiv 2512.09678)",
        "intrinsic LMO of a norm: the dual Ky Fan k-ball, U_k V_k^T (exact, SVD)",
        f'{_KF}, polar="svd"',
    ),
    "Ky Fan d/4 randomized": Variant(
        "imuon",
        {"norm": ("kyfan", KYFAN_K), "polar": RANDOMIZED},
        1e-1,
        "low-rank orthogonalization (He, Deng, Lu, arXiv 2509.11983)",
        "solver of the Ky Fan LMO: range finder, then the exact LMO of Q^T H (always feasible)",
        f"{_KF}, {_RAND}",
    ),
    "Ky Fan d/4 + EF": Variant(
        "imuon",
        {"norm": ("kyfan", KYFAN_K), "polar": "svd", "error_feedback": True},
        1e-1,
        "Dion's error feedback (Ahn et al., arXiv 2504.05295) on the exact Ky Fan LMO",
        "momentum rule: the part the low-rank step leaves out stays in the buffer",
        f'{_KF}, polar="svd", error_feedback=True',
    ),
    "Ky Fan d/4 randomized + EF": Variant(
        "imuon",
        {"norm": ("kyfan", KYFAN_K), "polar": RANDOMIZED, "error_feedback": True},
        1e-1,
        "Dion-like: randomized low-rank LMO with error feedback",
        "solver of the Ky Fan LMO + error feedback",
        f"{_KF}, {_RAND}, error_feedback=True",
    ),
    "F-Muon": Variant(
        "imuon",
        {"norm": ("fmuon", FMUON_ALPHA)},
        3e-2,
        "F-Muon (Kravatskiy et al., arXiv 2512.09678)",
        "intrinsic LMO of a norm: alpha polar(H) + (1 - alpha) H / ‖H‖_F",
        f'norm=("fmuon", {FMUON_ALPHA})',
    ),
    "MuonEq-R": Variant(
        "imuon",
        {"input_transform": "muoneq_col"},
        3e-2,
        "MuonEq-R (Chang et al., arXiv 2603.28254)",
        "input transform, not a norm: output rows equilibrated before the spectral LMO",
        'input_transform="muoneq_col" (GPT-2 stores (in, out): its output rows are columns)',
    ),
    "ROOT clip": Variant(
        "imuon",
        {"input_transform": ("root_clip", ROOT_PERCENTILE)},
        3e-2,
        "ROOT's outlier clipping (He et al., arXiv 2511.20626)",
        "input transform, not a norm: entries clipped at the 90th percentile of their absolute values",
        f'input_transform=("root_clip", {ROOT_PERCENTILE:g})',
    ),
    "MiMuon": Variant(
        "imuon",
        {"input_transform": ("mimuon", MIMUON_THRESHOLD)},
        1e-1,
        "MiMuon (Huang, Luo, Chen, arXiv 2605.19619)",
        "switch, not a norm: the momentum itself unless the relative singular gap exceeds the threshold",
        f'input_transform=("mimuon", {MIMUON_THRESHOLD:g})',
    ),
}
#: IMuon keywords that are constructor options (the rest are param-group options).
CONSTRUCTOR_KEYS = ("norm", "polar")
#: Best rates of the full run (defaults: 150 steps x batch 16, grids on seed 0; benchmarks/RESULTS.md), used by
#: ``--quick``.
QUICK_LRS: dict[str, float] = {
    "AdamW": 3e-4,
    "Muon": 3e-2,
    "iMuon": 3e-2,
    "Ky Fan d/4": 3e-2,
    "Ky Fan d/4 randomized": 3e-2,
    "Ky Fan d/4 + EF": 3e-2,
    "Ky Fan d/4 randomized + EF": 3e-2,
    "F-Muon": 3e-2,
    "MuonEq-R": 3e-2,
    "ROOT clip": 3e-2,
    "MiMuon": 1e-2,
}
COLORS = {name: f"C{i}" if i < 10 else "black" for i, name in enumerate(VARIANTS)}  # 10 colors in the cycle


# ----------------------------------------------------------------------------------------------------------------------
# Model and optimizers


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(hidden, rest)``: the 2-D hidden matrices of the blocks, and everything else (embeddings, head, norms,
    biases), each parameter once (the output head is tied to the token embedding)."""
    hidden, rest, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (hidden if name.endswith(HIDDEN) and ".h." in f".{name}" and p.ndim == 2 else rest).append(p)
    expected = lt.MODEL["n_layer"] * len(HIDDEN)
    if len(hidden) != expected:
        raise RuntimeError(f"found {len(hidden)} hidden matrices, expected {expected}")
    return hidden, rest


def imuon_arguments(options: dict) -> tuple[dict, dict]:
    """``(constructor keywords, param-group options)`` of a variant's IMuon options."""
    ctor = {k: v for k, v in options.items() if k in CONSTRUCTOR_KEYS}
    group = {k: v for k, v in options.items() if k not in CONSTRUCTOR_KEYS}
    return ctor, group


def make_optimizers(
    variant: Variant, model: nn.Module, lr: float
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """``(optimizer of the hidden matrices at lr, AdamW of the rest at REST)``."""
    hidden, rest = split_parameters(model)
    rest_opt = torch.optim.AdamW(rest, lr=REST["lr"], betas=REST["betas"], weight_decay=REST["weight_decay"])
    return _hidden_optimizer(variant, hidden, lr), rest_opt


def _hidden_optimizer(variant: Variant, hidden: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if variant.kind == "adamw":
        return torch.optim.AdamW(hidden, lr=lr, betas=REST["betas"], weight_decay=0.0)
    if variant.kind == "muon":
        return torch.optim.Muon(hidden, lr=lr, weight_decay=0.0, adjust_lr_fn="original")
    if variant.kind == "imuon":
        ctor, group = imuon_arguments(variant.options)
        return IMuon([{"params": hidden, **group}], lr=lr, adjust_lr_fn="original", **ctor)
    raise ValueError(f"unknown optimizer kind {variant.kind!r}")


def _probe_gradients(steps: int = 3) -> list[torch.Tensor]:
    """Gradients for the probe: 48 x 40 matrices ``U diag(s) V^T`` with random ``U`` (uneven row norms), a spread
    spectrum and a tied top singular value, so that MuonEq, ROOT's clip and MiMuon's switch each change the step and
    a rank-8 Ky Fan step leaves a residual for error feedback."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        u = torch.linalg.qr(torch.randn(48, 40, generator=gen, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64)).Q
        sv = torch.linspace(3.0, 0.1, 40, dtype=torch.float64)
        sv[1] = sv[0]
        out.append(((u * sv) @ v.T).float())
    return out


def _probe(ctor: dict, group: dict) -> torch.Tensor:
    w = nn.Parameter(torch.randn(48, 40, generator=torch.Generator().manual_seed(0)))
    opt = IMuon([{"params": [w], **group}], lr=1e-2, **ctor)
    unknown = sorted(k for k in group if k not in opt.defaults)
    if unknown:  # torch keeps unknown param-group keys without a word: the run would be plain iMuon
        raise KeyError(f"IMuon has no param-group option {', '.join(map(repr, unknown))}")
    for g in _probe_gradients():
        w.grad = g.clone()
        opt.step()
    return w.detach().clone()


def unavailable(variant: Variant) -> str | None:
    """Why this build cannot run ``variant``, or ``None``: the error of a three-step probe on a small matrix, or
    that a param-group option is accepted but changes nothing (the probe's steps equal those without it, on
    gradients where the option must matter: Ky Fan k = 8 for error feedback)."""
    if variant.kind != "imuon":
        return None
    ctor, group = imuon_arguments(variant.options)
    if isinstance(ctor.get("norm"), tuple) and ctor["norm"][0] == "kyfan":
        ctor = dict(ctor, norm=("kyfan", 8))
    try:
        w = _probe(ctor, group)
        plain = _probe(ctor, {}) if group else None
    except KeyError as err:
        return str(err.args[0])
    except (ValueError, TypeError, NotImplementedError) as err:
        return f"{type(err).__name__}: {err}"
    if not torch.isfinite(w).all():
        return "the probe step gave non-finite values"
    if plain is not None and torch.equal(w, plain):
        return f"IMuon accepts {', '.join(map(repr, sorted(group)))} but its step does not use it in this build"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Run:
    """One pretraining run: held-out loss curve, minibatch losses, timings."""

    variant: str
    lr: float
    seed: int
    at: list[int] = field(default_factory=list)
    seconds_at: list[float] = field(default_factory=list)
    heldout: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    opt_ms: list[float] = field(default_factory=list)
    final: float = math.inf
    diverged: bool = False
    #: Randomized Ky Fan runs: accuracy of the solver on this run's own gradients (see :func:`solver_accuracy`).
    accuracy: dict[str, float] = field(default_factory=dict)
    #: MiMuon runs: per hidden-matrix shape, how often its switch orthogonalizes (see :func:`mimuon_switches`).
    switches: dict[str, list[int]] = field(default_factory=dict)


def mimuon_switches(opt: torch.optim.Optimizer, threshold: float) -> dict[str, tuple[int, int]] | None:
    """``{shape: (orthogonalized, matrices)}`` for the step ``opt`` is about to take: MiMuon orthogonalizes a matrix
    when the relative singular gap (:func:`imuon_manopt.transforms.relative_gap`) of its Nesterov input ``E + beta
    (beta buf + E)`` reaches ``threshold``. ``None`` if this build has no ``relative_gap``."""
    try:
        from imuon_manopt.transforms import relative_gap
    except ImportError:
        return None
    out: dict[str, tuple[int, int]] = {}
    for group in opt.param_groups:
        beta = group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad.detach().float()
            buf = opt.state.get(p, {}).get("momentum_buffer")
            e = g + beta * (beta * buf.float() + g) if buf is not None else (1.0 + beta) * g
            key = "x".join(map(str, p.shape))
            hit, n = out.get(key, (0, 0))
            out[key] = (hit + int(float(relative_gap(e)) >= threshold), n + 1)
    return out


def solver_accuracy(grads: Sequence[torch.Tensor]) -> dict[str, float]:
    """How well the randomized Ky Fan solver (``RANDOMIZED``, the package's core :func:`imuon_manopt.lmo.lmo`) does
    on these matrices against the exact LMO (SVD, float64): the objective ratio ``<G, Z_rand> / <G, Z_exact>``
    (1 is optimal; ``<G, Z_exact> = KF_k(G)``) and the direction error ``||Z_rand - Z_exact||_F / sqrt(k)``, worst
    and median over the matrices. Empty if this build's core has no randomized Ky Fan solver."""
    from imuon_manopt.lmo import lmo

    ratios, errors = [], []
    opts = {k: v for k, v in RANDOMIZED.items() if k != "method"}
    for g in grads:
        g64 = g.detach().to(torch.float64)
        try:
            exact = lmo(g64, ("kyfan", KYFAN_K), method="svd")
            approx = lmo(g64, ("kyfan", KYFAN_K), method="randomized", **opts)
        except (TypeError, ValueError):
            return {}
        best = float((g64 * exact).sum())
        if best > 0:
            ratios.append(float((g64 * approx).sum()) / best)
            errors.append(float(torch.linalg.norm(approx - exact)) / math.sqrt(KYFAN_K))
    if not ratios:
        return {}
    return dict(
        ratio_min=min(ratios),
        ratio_median=statistics.median(ratios),
        direction_error_max=max(errors),
        direction_error_median=statistics.median(errors),
        matrices=len(ratios),
    )


@dataclass
class Context:
    """What the runs share: data, the random start per seed, minibatch offsets per seed."""

    train: torch.Tensor
    curve_windows: torch.Tensor
    final_windows: torch.Tensor
    steps: int
    batch: int
    eval_every: int
    starts: dict[int, nn.Module] = field(default_factory=dict)
    runs: dict[tuple[str, float, int], Run] = field(default_factory=dict)
    on_run: Callable[[Run], None] | None = None

    def start(self, seed: int) -> nn.Module:
        """A fresh copy of the seed's random model (GPT-2's own initialization under ``torch.manual_seed``)."""
        if seed not in self.starts:
            from transformers import GPT2LMHeadModel

            torch.manual_seed(30_000 + seed)
            self.starts[seed] = GPT2LMHeadModel(lt.gpt_config()).train()
        return copy.deepcopy(self.starts[seed])

    def batches(self, seed: int) -> torch.Tensor:
        """``(steps, batch)`` window offsets into the training bytes, fixed by ``seed``."""
        gen = torch.Generator().manual_seed(40_000 + seed)
        return torch.randint(0, len(self.train) - lt.MODEL["n_positions"] - 1, (self.steps, self.batch), generator=gen)

    def run(self, name: str, lr: float, seed: int) -> Run:
        """Pretrain from the seed's start with ``name`` at ``lr`` (memoized)."""
        key = (name, lr, seed)
        if key in self.runs:
            return self.runs[key]
        model = self.start(seed)
        hidden_opt, rest_opt = make_optimizers(VARIANTS[name], model, lr)
        opts = (hidden_opt, rest_opt)
        initial = [[g["lr"] for g in o.param_groups] for o in opts]
        offsets = self.batches(seed)
        context = lt.MODEL["n_positions"]
        warmup = max(1, round(WARMUP_FRACTION * self.steps))
        run = Run(name, lr, seed)
        elapsed = 0.0
        variant = VARIANTS[name]
        measure = (
            isinstance(variant.options.get("polar"), dict) and variant.options["polar"].get("method") == "randomized"
        )
        accuracy: list[dict[str, float]] = []
        transform = variant.options.get("input_transform")
        mimuon = transform[1] if isinstance(transform, tuple) and transform[0] == "mimuon" else None

        def record(k: int) -> None:
            model.eval()
            run.at.append(k)
            run.seconds_at.append(elapsed)
            run.heldout.append(lt.mean_loss(model, self.curve_windows))
            model.train()

        record(0)
        for k in range(self.steps):
            factor = lt.warmup_cosine(k, self.steps, warmup)
            for o, lrs in zip(opts, initial):
                for g, base_lr in zip(o.param_groups, lrs):
                    g["lr"] = base_lr * factor
            batch = lt.windows(self.train, offsets[k], context + 1)
            t0 = time.perf_counter()
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss = lt.lm_loss(model, batch)
            loss.backward()
            t1 = time.perf_counter()
            if measure and k + 1 in (self.steps // 2, self.steps):  # not part of the step: kept out of its time
                accuracy.append(solver_accuracy([p.grad for p in hidden_opt.param_groups[0]["params"]]))
                t0 += time.perf_counter() - t1
                t1 = time.perf_counter()
            if mimuon is not None and k % self.eval_every == 0:
                for shape, (hit, n) in (mimuon_switches(hidden_opt, mimuon) or {}).items():
                    counts = run.switches.setdefault(shape, [0, 0])
                    counts[0], counts[1] = counts[0] + hit, counts[1] + n
                t0 += time.perf_counter() - t1
                t1 = time.perf_counter()
            try:
                hidden_opt.step()
            except FloatingPointError:
                run.diverged = True
            t2 = time.perf_counter()
            if not run.diverged:
                rest_opt.step()
            t3 = time.perf_counter()
            value = float(loss.detach())
            run.loss.append(value)
            run.step_ms.append(1e3 * (t3 - t0))
            run.opt_ms.append(1e3 * (t2 - t1))
            elapsed += t3 - t0
            if run.diverged or not math.isfinite(value):
                run.diverged = True
                break
            if (k + 1) % self.eval_every == 0 or k + 1 == self.steps:
                record(k + 1)
        if accuracy and all(accuracy):  # worst and median over both measuring points
            run.accuracy = dict(
                ratio_min=min(a["ratio_min"] for a in accuracy),
                ratio_median=statistics.median(a["ratio_median"] for a in accuracy),
                direction_error_max=max(a["direction_error_max"] for a in accuracy),
                direction_error_median=statistics.median(a["direction_error_median"] for a in accuracy),
            )
        if not run.diverged:
            model.eval()
            final = lt.mean_loss(model, self.final_windows)
            run.final = final if math.isfinite(final) else math.inf
            run.diverged = not math.isfinite(final)
        self.runs[key] = run
        if self.on_run is not None:
            self.on_run(run)
        return run


def step_costs(variants: Sequence[str], reps: int, seed: int = 0) -> dict[str, float]:
    """Median ms of one ``step()`` of each variant's hidden-matrix optimizer, measured interleaved (round robin over
    the variants, ``reps`` rounds, after one warm-up step each) on copies of a random model's hidden matrices with
    one fixed gradient (that of a real minibatch), so that a change of machine load hits every variant alike. Each
    optimizer is stepped at a tiny rate from its own copy (the matrices barely move)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(30_000 + seed)
    model = GPT2LMHeadModel(lt.gpt_config()).train()
    corpus, _ = lt.stdlib_corpus()
    tokens = lt.as_tokens(corpus[:200_000])
    starts = torch.randint(0, len(tokens) - lt.MODEL["n_positions"] - 1, (16,), generator=torch.Generator())
    lt.lm_loss(model, lt.windows(tokens, starts, lt.MODEL["n_positions"] + 1)).backward()
    hidden, _ = split_parameters(model)
    grads = [p.grad.detach().clone() for p in hidden]
    opts, params = {}, {}
    for v in variants:
        copies = [nn.Parameter(p.detach().clone()) for p in hidden]
        opts[v] = _hidden_optimizer(VARIANTS[v], copies, 1e-6)
        params[v] = copies
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(reps + 1):
        for v in variants:
            for p, g in zip(params[v], grads):
                p.grad = g.clone()
            t0 = time.perf_counter()
            opts[v].step()
            if r:  # the first round warms up (buffers, caches)
                times[v].append(1e3 * (time.perf_counter() - t0))
    return {v: statistics.median(ts) for v, ts in times.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Reporting


def seconds_to(run: Run, target: float) -> float:
    """Training seconds ``run`` took to bring its held-out curve down to ``target`` (linear between evaluation
    points; ``inf`` if it never did)."""
    xs, ys = run.seconds_at, run.heldout
    for j, y in enumerate(ys):
        if y <= target:
            if j == 0:
                return xs[0]
            t = (ys[j - 1] - target) / max(ys[j - 1] - y, 1e-12)
            return xs[j - 1] + t * (xs[j] - xs[j - 1])
    return math.inf


def loss_at_seconds(run: Run, seconds: float) -> float:
    """Held-out loss of ``run`` at ``seconds`` of training, linear between evaluation points (``inf`` after a
    divergence; the last value once the run is over)."""
    if run.diverged:
        return math.inf
    xs, ys = run.seconds_at, run.heldout
    if seconds >= xs[-1]:
        return ys[-1]
    for j in range(1, len(xs)):
        if seconds <= xs[j]:
            t = (seconds - xs[j - 1]) / max(xs[j] - xs[j - 1], 1e-12)
            return ys[j - 1] + t * (ys[j] - ys[j - 1])
    return ys[-1]


def winner(values: dict[str, list[float]], tol: float = 1e-3) -> tuple[str, str]:
    """``(best variant by mean, statement)``: the best mean against the runner-up, per seed (wins only if it is lower
    on every seed by more than ``tol``, else a tie is stated with every variant it does not beat that way)."""
    finite = {v: xs for v, xs in values.items() if xs and all(math.isfinite(x) for x in xs)}
    if not finite:
        return "-", "no variant finished"
    order = sorted(finite, key=lambda v: statistics.mean(finite[v]))
    best = order[0]
    ties = [
        v for v in order[1:] if not lt.verdict([a - b for a, b in zip(finite[best], finite[v])], tol).startswith("wins")
    ]
    mean = statistics.mean(finite[best])
    if ties:
        return (
            best,
            f"{best} ({mean:.4f}) has the best mean but ties with {', '.join(ties)} (not lower on every seed by "
            f"more than {tol:g})",
        )
    runner = order[1] if len(order) > 1 else None
    gap = "" if runner is None else f"; runner-up {runner} ({statistics.mean(finite[runner]):.4f})"
    n = len(finite[best])
    return best, f"{best} ({mean:.4f}) wins on {'every one of ' if n > 1 else ''}{n} seed{'s' if n > 1 else ''}{gap}"


def plot_curves(results: dict[str, list[Run]], output: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for xkey, xlabel, stem in (
        ("at", "step", "heldout_vs_steps.png"),
        ("seconds_at", "training seconds (evaluation excluded)", "heldout_vs_seconds.png"),
    ):
        fig, ax = plt.subplots(figsize=(8.0, 5.0))
        finals = []
        for variant, runs in results.items():
            runs = [r for r in runs if not r.diverged]
            if not runs:
                continue
            n = min(len(r.heldout) for r in runs)
            xs = [statistics.mean(getattr(r, xkey)[j] for r in runs) for j in range(n)]
            ys = [statistics.mean(r.heldout[j] for r in runs) for j in range(n)]
            finals.append(ys[-1])
            style = (
                "--" if "randomized" in variant else ("-." if variant in ("MuonEq-R", "ROOT clip", "MiMuon") else "-")
            )
            ax.plot(xs, ys, style, color=COLORS.get(variant), label=f"{variant} (lr {lt.fmt_lr(runs[0].lr)})", lw=1.3)
            if len(runs) > 1:
                lo = [min(r.heldout[j] for r in runs) for j in range(n)]
                hi = [max(r.heldout[j] for r in runs) for j in range(n)]
                ax.fill_between(xs, lo, hi, color=COLORS.get(variant), alpha=0.10)
        if finals:  # the end of the curves readable; the first steps off the top
            ax.set_ylim(min(finals) - 0.05, max(finals) + 0.6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = output / stem
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_grids(grids: dict[str, dict[float, float]], output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    for variant, grid in grids.items():
        lrs = [lr for lr in grid if math.isfinite(grid[lr])]
        ax.plot(lrs, [grid[lr] for lr in lrs], "-o", color=COLORS.get(variant), label=variant, markersize=4)
    finite = [val for grid in grids.values() for val in grid.values() if math.isfinite(val)]
    if finite and max(finite) > min(finite) + 0.5:
        ax.set_ylim(min(finite) - 0.02, min(finite) + 0.5)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate of the hidden matrices")
    ax.set_ylabel("final held-out loss, seed 0")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = output / "lr_grids.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Main


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="best rates of the full run (QUICK_LRS), one seed")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT), help="folder for results.md, results.json and the PNGs")
    p.add_argument("--steps", type=int, default=150, help="pretraining steps per run (default 150)")
    p.add_argument("--batch", type=int, default=16, help="minibatch, in windows of 64 bytes (default 16)")
    p.add_argument("--seeds", type=int, default=None, help="seeds at the best rate (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see bench_lora_text)")
    p.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="optimizers to run (default: all)"
    )
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (default ~10 %)")
    p.add_argument("--curve-windows", type=int, default=64, help="held-out windows along the curves (default 64)")
    p.add_argument("--final-windows", type=int, default=512, help="held-out windows of the final loss (default 512)")
    p.add_argument(
        "--cost-reps", type=int, default=30, help="interleaved rounds of the step-cost measurement (default 30)"
    )
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if min(args.steps, args.batch, args.seeds, args.threads, args.curve_windows, args.final_windows) < 1:
        raise SystemExit("--steps, --batch, --seeds, --threads and the window counts must be positive")
    if "AdamW" not in args.variants:
        args.variants = ["AdamW", *args.variants]  # the reference of the differences
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    wall0 = time.perf_counter()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - wall0:7.1f} s] {line}", flush=True)

    log(f"bench_pretrain: torch threads {torch.get_num_threads()}, load {load_start[0]:.2f}")
    missing = {}
    for name in args.variants:
        why = unavailable(VARIANTS[name])
        if why is not None:
            missing[name] = why
            log(f"{name}: not available in this build ({why})")
    variants = [v for v in VARIANTS if v in args.variants and v not in missing]

    corpus, files = lt.stdlib_corpus()
    tokens = lt.as_tokens(corpus)
    n_held = int(len(tokens) * lt.PRETRAIN["holdout"])
    train, held = tokens[:-n_held], tokens[-n_held:]
    context = lt.MODEL["n_positions"]
    final_windows = lt.tiled_windows(held, context + 1, args.final_windows)
    curve_windows = lt.tiled_windows(held, context + 1, min(args.curve_windows, len(final_windows)))
    ctx = Context(
        train, curve_windows, final_windows, args.steps, args.batch, args.eval_every or max(1, args.steps // 10)
    )

    def progress(run: Run) -> None:
        log(
            f"{run.variant:27s} lr {lt.fmt_lr(run.lr):>5s} seed {run.seed}: final held-out {lt.fmt(run.final)}, "
            f"{statistics.median(run.step_ms):.1f} ms/step ({statistics.median(run.opt_ms):.2f} ms step())"
        )

    ctx.on_run = progress
    log(
        f"corpus: {len(files)} stdlib files ({len(corpus) / 1e6:.2f} MB), {len(final_windows)} held-out windows; "
        f"{args.steps} steps x batch {args.batch}; variants: {', '.join(variants)}"
    )

    grids: dict[str, dict[float, float]] = {}
    best: dict[str, float] = {}
    if args.quick:
        best = {v: QUICK_LRS[v] for v in variants}
    else:
        for v in variants:  # all initial 3-point grids first (interleaved), then the widening each one needs
            c = lt.grid_index(VARIANTS[v].center)
            for i in (c - 1, c, c + 1):
                ctx.run(v, lt.grid_lr(i), 0)
        for v in variants:
            best[v], grids[v] = lt.search_lr(lambda lr, v=v: ctx.run(v, lr, 0).final, VARIANTS[v].center)
            log(f"{v}: best lr {lt.fmt_lr(best[v])} of {', '.join(lt.fmt_lr(lr) for lr in grids[v])}")

    seeds = list(range(args.seeds))
    results: dict[str, list[Run]] = {v: [] for v in variants}
    for s in seeds:  # seed-major: every variant's seed-s run back to back
        for v in variants:
            results[v].append(ctx.run(v, best[v], s))
    costs = step_costs(variants, args.cost_reps)
    log("step cost (interleaved): " + ", ".join(f"{v} {ms:.2f} ms" for v, ms in costs.items()))
    load_end = os.getloadavg()
    wall = time.perf_counter() - wall0

    # ------------------------------------------------------------------ tables
    summary: dict[str, dict[str, Any]] = {}
    ref = {r.seed: r.final for r in results["AdamW"]} if "AdamW" in results else {}
    muon = {r.seed: r.final for r in results["Muon"]} if "Muon" in results else {}
    rows = []
    adamw_runs = [r for r in results.get("AdamW", []) if not r.diverged]
    target = statistics.mean(r.heldout[-1] for r in adamw_runs) if adamw_runs else math.nan
    for v in variants:
        finals = [r.final for r in results[v]]
        ok = all(math.isfinite(f) for f in finals)
        mean = statistics.mean(finals) if ok else math.inf
        spread = statistics.stdev(finals) if ok and len(finals) > 1 else math.nan
        d_adamw = [r.final - ref[r.seed] for r in results[v]] if ref else []
        d_muon = [r.final - muon[r.seed] for r in results[v]] if muon else []
        step_ms = statistics.median([x for r in results[v] for x in r.step_ms])
        opt_ms = statistics.median([x for r in results[v] for x in r.opt_ms])
        to_target = statistics.median(seconds_to(r, target) for r in results[v]) if math.isfinite(target) else math.nan
        grid = grids.get(v)
        edge = bool(grid) and best[v] in (min(grid), max(grid))
        summary[v] = dict(
            lr=best[v],
            paper=VARIANTS[v].paper,
            finals=finals,
            mean=mean,
            std=spread,
            diffs_vs_adamw=d_adamw,
            diffs_vs_muon=d_muon,
            step_ms=step_ms,
            opt_ms=opt_ms,
            seconds_to_adamw_final=to_target,
            step_cost_ms=costs[v],
            grid=grid,
            best_at_grid_edge=edge,
            config=VARIANTS[v].config,
            what=VARIANTS[v].what,
        )
        rows.append(
            f"| {v} | {lt.fmt_lr(best[v])}{' (edge)' if edge else ''} | {lt.fmt(mean)}"
            + (f" ± {spread:.4f}" if math.isfinite(spread) else "")
            + f" | {'reference' if v == 'AdamW' else lt.verdict(d_adamw)} | "
            + f"{'-' if v == 'Muon' or not d_muon else lt.verdict(d_muon)} | {step_ms:.1f} | {opt_ms:.2f} | "
            + ("never" if math.isinf(to_target) else f"{to_target:.1f}")
            + f" | {costs[v]:.2f}"
            + (f" ({costs[v] / costs['Muon']:.2f}x)" if "Muon" in costs else "")
            + " |"
        )
    step_winner = winner({v: summary[v]["finals"] for v in variants})
    fastest = min(
        variants,
        key=lambda v: (
            statistics.mean(r.seconds_at[-1] for r in results[v] if not r.diverged)
            if any(not r.diverged for r in results[v])
            else math.inf
        ),
    )
    budget_s = statistics.mean(r.seconds_at[-1] for r in results[fastest] if not r.diverged)
    at_budget = {v: [loss_at_seconds(r, budget_s) for r in results[v]] for v in variants}
    time_winner = winner(at_budget)
    for v in variants:
        summary[v]["heldout_at_time_budget"] = at_budget[v]

    n_seeds = len(seeds)
    title = (
        f"Pretraining a {lt.MODEL['n_layer']}x{lt.MODEL['n_embd']} byte GPT from scratch, {args.steps} steps x batch "
        f"{args.batch}, {n_seeds} seed{'s' if n_seeds > 1 else ''}"
    )
    lines = [f"# {title}", ""]
    lines += lt.host_lines("bench_pretrain.py", argv, load_start, load_end)
    lines += [
        f"- wall time: {wall:.0f} s ({wall / 60:.1f} min)",
        f"- data: {len(files)} stdlib files ({len(corpus) / 1e6:.2f} MB), last {lt.PRETRAIN['holdout']:.0%} held out "
        f"({len(final_windows)} windows of {context} bytes for the final loss, {len(curve_windows)} along the curves)",
        f"- hidden matrices: {', '.join(HIDDEN)} of {lt.MODEL['n_layer']} blocks; the rest on AdamW (lr "
        f"{REST['lr']:g}, betas {REST['betas']}); Ky Fan k = {KYFAN_K}",
        "- schedule: linear warmup over 5 % of the steps, cosine decay to 0; no weight decay; "
        + (
            "rates: QUICK_LRS (best of the full run)"
            if args.quick
            else "rates: best of a half-decade grid on seed 0, then all seeds at it"
        ),
        "",
        "Held-out loss after the last step (nats/byte); verdicts per seed against AdamW and against Muon (wins / "
        "loses: lower / higher on every seed by more than 1e-3, else ties). ms/step: median over every step of the "
        "best-rate runs (zero_grad, forward, backward, both optimizers); step(): the hidden-matrix optimizer's "
        "step() alone (both in the training runs, so they follow the machine's load at the time). Step cost, "
        "interleaved: median ms of the hidden-matrix optimizer's step() on one fixed gradient, the variants "
        f"stepped round robin ({args.cost_reps} rounds), so that load hits them alike. s to AdamW's loss: training "
        "seconds until the held-out curve first reaches AdamW's final "
        f"curve value ({target:.4f}), median over seeds. `(edge)`: the best rate is at the edge of its grid.",
        "",
        "| optimizer | best lr | held-out loss (mean ± std) | vs AdamW | vs Muon | ms/step | ms step() | "
        "s to AdamW's loss | step() cost, interleaved (vs Muon) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"**Step budget ({args.steps} steps):** {step_winner[1]}.",
        "",
        f"**Time budget ({budget_s:.1f} s of training, the whole run of the fastest, {fastest}):** {time_winner[1]}. "
        "(Held-out loss each run had reached by then, read off its curve; the slower runs' schedules were not "
        "shortened to this budget, so this favours the fast ones only as far as their speed does.)",
    ]
    lines += [
        "",
        "Each paper as one line of configuration of `imuon_manopt.optim.IMuon` (hidden matrices; Δ: held-out loss "
        "minus Muon's, mean over seeds):",
        "",
        "| paper | configuration | what it is | held-out loss | Δ vs Muon | step() ms (interleaved) |",
        "|---|---|---|---|---|---|",
    ]
    muon_mean = summary["Muon"]["mean"] if "Muon" in summary else math.nan
    for v, var in VARIANTS.items():
        if v in summary:
            row = summary[v]
            delta = "-" if v == "Muon" or not math.isfinite(muon_mean) else f"{row['mean'] - muon_mean:+.4f}"
            result = f"{lt.fmt(row['mean'])} | {delta} | {row['step_cost_ms']:.2f}"
        elif v in missing:
            result = "not available in this build | - | -"
        else:
            continue
        lines.append(f"| {var.paper} | `{var.config}` | {var.what} | {result} |")
    acc = {v: [r.accuracy for r in results[v] if r.accuracy] for v in variants}
    acc = {v: a for v, a in acc.items() if a}
    if acc:
        lines += [
            "",
            f"Randomized Ky Fan solver on the runs' own hidden-matrix gradients (at the middle and the last step of "
            f"every best-rate run; against the exact LMO in float64; k = {KYFAN_K}): objective ratio "
            "<G, Z_rand> / KF_k(G) and direction error ||Z_rand - U_k V_k^T||_F / sqrt(k).",
            "",
            "| variant | objective ratio (min / median) | direction error (median / max) |",
            "|---|---|---|",
        ]
        for v, a in acc.items():
            summary[v]["solver_accuracy"] = a
            lines.append(
                f"| {v} | {min(x['ratio_min'] for x in a):.4f} / {statistics.median(x['ratio_median'] for x in a):.4f}"
                f" | {statistics.median(x['direction_error_median'] for x in a):.3f} / "
                f"{max(x['direction_error_max'] for x in a):.3f} |"
            )
    for v in variants:
        counts: dict[str, list[int]] = {}
        for r in results[v]:
            for key, (hit, n) in r.switches.items():
                c = counts.setdefault(key, [0, 0])
                c[0], c[1] = c[0] + hit, c[1] + n
        if counts:
            summary[v]["switch_rate"] = {key: hit / n for key, (hit, n) in counts.items()}
            rates = ", ".join(f"{key}: {hit}/{n}" for key, (hit, n) in counts.items())
            lines += [
                "",
                f"{v}: orthogonalized steps per hidden-matrix shape (relative singular gap of the Nesterov input >= "
                f"the threshold, checked every {ctx.eval_every} steps of the best-rate runs; otherwise the step is the "
                f"momentum scaled to spectral norm 1): {rates}.",
            ]
    if missing:
        lines += ["", "Not available in this build (not run):", ""]
        lines += [f"- {v} (`{VARIANTS[v].config}`): {why}" for v, why in missing.items()]
    lines += lt.grid_lines(grids, best)
    plots = plot_curves(results, output, title)
    if grids:
        plots.append(plot_grids(grids, output))
    raw = dict(
        summary=summary,
        missing=missing,
        step_winner=step_winner,
        time_winner=time_winner,
        time_budget_seconds=budget_s,
        wall_seconds=wall,
        argv=argv,
        runs=[asdict(r) for r in ctx.runs.values()],
    )
    text = lt.write_results(output, lines, plots, raw)
    log(f"done in {wall:.0f} s; results in {output / 'results.md'}")
    return dict(
        summary=summary,
        missing=missing,
        grids=grids,
        best=best,
        step_winner=step_winner,
        time_winner=time_winner,
        text=text,
        plots=plots,
        wall=wall,
    )


if __name__ == "__main__":
    main()
