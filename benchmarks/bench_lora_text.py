"""Benchmark: LoRA fine-tuning of a small byte-level GPT on real text, iMuon against AdamW and torch.optim.Muon.

Nothing is downloaded; both corpora ship with every Python installation.

1. **Pretraining** (cached): a GPT-2 (``transformers.GPT2LMHeadModel``; 2 layers, width 128, 4 heads, context 64,
   vocabulary the 256 byte values) learns the standard library's own top-level ``.py`` files (``sysconfig``'s
   ``stdlib`` folder, sorted by name, the last 2 % held out) with AdamW. The weights are stored under
   ``benchmarks/.cache/`` keyed by a hash of the configuration, the pretraining settings, the corpus bytes and the
   torch version, so a rerun skips this stage.
2. **LoRA fine-tuning** on English prose: the reference text of ``pydoc_data.topics.topics`` (topic -> text), split
   by topic (sorted names; every 5th topic, starting at the 3rd, is held out). Rank ``r = 4`` adapters
   (``lora_alpha = 8``, PEFT's layout: ``B`` (out, r), ``A`` (r, in)) on every linear map of the blocks
   (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``), built by ``peft.get_peft_model`` when the
   ``peft`` extra is installed, else by hand with PEFT's attribute names (``lora_A``, ``lora_B``, ``scaling``,
   ``base_layer``, ``fan_in_fan_out``). Only the factors train.

Start: per seed, ``A`` is drawn as PEFT does (Kaiming-uniform) and ``B = 0``; then
:func:`imuon_manopt.optim.full_rank_lora_model_init_` makes ``B`` full rank and moves ``scaling * B A`` into the
frozen base weight (the function is unchanged). Every optimizer starts from this same point and sees the same
minibatches (byte windows at offsets drawn from the seed).

Optimizers (learning rate warmed up linearly over the first 5 % of the steps, then cosine decay to 0; no weight
decay anywhere, momentum/betas at their defaults):

- ``AdamW`` on each factor;
- ``Muon``: ``torch.optim.Muon`` on each (2-D) factor, AdamW on anything else (nothing here);
- ``iMuon``: :class:`imuon_manopt.optim.IMuon` with ``pairs=lora_pairs(model)`` (the GL(r)-invariant fixed-rank
  step, Newton–Schulz polar factors, momentum on the factor gradients);
- ``iMuon ambient``: the same with ``pair_momentum="ambient"`` (only O(r)-invariant);
- ``... (BM, M^-1A)``: iMuon, AdamW and Muon started from the rescaled factors ``(B M, M^-1 A)``,
  ``M = diag(geomspace(1, 100, r))``: the same product, the same function, the same loss.

Learning rates: a half-decade grid (1e-4, 3e-4, 1e-3, ...) per optimizer on seed 0, widened until the best final
held-out loss has a neighbour on both sides (a diverged run counts as infinitely bad); then every seed at the best
rate. ``--quick`` runs the best rates of the full run (``QUICK_LRS``) on one seed.

Reported (``results.md`` in ``--output``): held-out loss (all held-out windows) after the last step, mean and
spread over seeds and per-seed differences against AdamW; ms per step for the whole step (zero_grad, forward,
backward, ``step()``, schedule) and for ``optimizer.step()`` alone (medians over all steps of the best-rate runs;
the runs are interleaved seed by seed so that a change of machine load hits every optimizer alike); the gauge
fidelity: the largest difference of the held-out loss (and of the minibatch losses) between a rescaled run and the
unrescaled run at the same rate and seed; iMuon's trajectory does not depend on the gauge up to Newton–Schulz
rounding, AdamW's and Muon's do. ``--fidelity-svd`` adds an exact check: iMuon with ``polar="svd"`` in float64.
Plots: held-out loss against steps and against seconds, and the learning-rate grids.

Usage::

    python benchmarks/bench_lora_text.py --fidelity-svd    # full run: grids, 3 seeds (43 runs of 200 steps)
    python benchmarks/bench_lora_text.py --quick           # best rates, 1 seed (7 runs)

Times on 2 CPU cores: pretraining 1500 steps ~2 min when quiet (``--threads 2``; 11 min at 1 thread under a load
of ~5), then cached. Full run: ~9-10 min estimated on a quiet machine with ``--threads 2``, 33 min measured at 1
thread under a load average of 2-6 (benchmarks/RESULTS.md); ``--quick``: ~2-3 min quiet (1 thread), 5 min
measured under load. ``--threads`` defaults to 1: on a shared, loaded machine two threads per step were several
times slower than one.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imuon_manopt.optim import IMuon, full_rank_lora_model_init_, lora_pairs  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")

DEFAULT_CACHE = ROOT / "benchmarks" / ".cache"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "output" / "lora_text"

#: The byte-level GPT: 2 blocks of width 128, context 64, the 256 byte values as vocabulary, no dropout.
MODEL = dict(
    vocab_size=256,
    n_positions=64,
    n_embd=128,
    n_layer=2,
    n_head=4,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=0,
    eos_token_id=0,
)
#: Pretraining (AdamW, linear warmup then cosine decay to 10 %, gradient clipping at 1).
PRETRAIN = dict(steps=1500, batch=32, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01, warmup=100, seed=0, holdout=0.02)
RANK, LORA_ALPHA = 4, 8
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
#: Spectral norm of the full-rank start of B (A keeps PEFT's Kaiming-uniform draw).
INIT_SCALE = 1e-2
#: Gauge of the rescaled runs: M = diag(geomspace(1, GAUGE_SPAN, r)).
GAUGE_SPAN = 100.0
HELDOUT_EVERY, HELDOUT_FIRST = 5, 2
WARMUP_FRACTION = 0.05

#: ``name -> (optimizer kind, rescaled start)``, in table order.
VARIANTS: dict[str, tuple[str, bool]] = {
    "AdamW": ("adamw", False),
    "Muon": ("muon", False),
    "iMuon": ("imuon", False),
    "iMuon ambient": ("imuon_ambient", False),
    "iMuon (BM, M^-1A)": ("imuon", True),
    "AdamW (BM, M^-1A)": ("adamw", True),
    "Muon (BM, M^-1A)": ("muon", True),
}
UNRESCALED = {"iMuon (BM, M^-1A)": "iMuon", "AdamW (BM, M^-1A)": "AdamW", "Muon (BM, M^-1A)": "Muon"}
#: Where each grid starts (its middle point); the grid widens from there.
GRID_CENTER = {"adamw": 3e-3, "muon": 1e-2, "imuon": 1e-2, "imuon_ambient": 1e-2}
#: Best rates of the full run (defaults: ``--steps 200 --batch 16``, grids on seed 0; benchmarks/RESULTS.md),
#: used by ``--quick``.
QUICK_LRS = {
    "AdamW": 1e-2,
    "Muon": 1e-2,
    "iMuon": 3e-2,
    "iMuon ambient": 1e-1,
    "iMuon (BM, M^-1A)": 3e-2,
    "AdamW (BM, M^-1A)": 1e-2,
    "Muon (BM, M^-1A)": 1e-2,
}
COLORS = {"AdamW": "C1", "Muon": "C2", "iMuon": "C0", "iMuon ambient": "C3"}


# ----------------------------------------------------------------------------------------------------------------------
# Learning-rate grid


def grid_lr(index: int) -> float:
    """The half-decade grid ``..., 1e-4, 3e-4, 1e-3, 3e-3, ...``: index 0 is 1e-3, each step is a half decade."""
    decade, half = divmod(index, 2)
    return float(f"{(3.0 if half else 1.0)}e{decade - 3}")


def grid_index(lr: float) -> int:
    """The grid index nearest to ``lr`` (inverse of :func:`grid_lr`)."""
    return round(2.0 * math.log10(lr / 1e-3))


def search_lr(
    evaluate: Callable[[float], float], center: float, *, lowest: float = 1e-6, highest: float = 1.0
) -> tuple[float, dict[float, float]]:
    """Best rate of a half-decade grid whose best point is interior.

    Starts with ``center`` and its two neighbours; while the best value sits at an edge of the evaluated grid, adds
    the next rate beyond that edge (within ``[lowest, highest]``). Non-finite values count as worst. Returns the best
    rate and ``{lr: value}`` of every evaluated rate. Ties go to the smaller rate.
    """
    lo_i, hi_i = grid_index(lowest), grid_index(highest)
    c = min(max(grid_index(center), lo_i + 1), hi_i - 1)
    values: dict[int, float] = {}

    def value(i: int) -> float:
        if i not in values:
            v = float(evaluate(grid_lr(i)))
            values[i] = v if math.isfinite(v) else math.inf
        return values[i]

    for i in (c - 1, c, c + 1):
        value(i)
    while True:
        best = min(sorted(values), key=lambda i: values[i])
        if best == min(values) and best > lo_i:
            value(best - 1)
        elif best == max(values) and best < hi_i:
            value(best + 1)
        else:
            break
    best = min(sorted(values), key=lambda i: values[i])
    return grid_lr(best), {grid_lr(i): values[i] for i in sorted(values)}


# ----------------------------------------------------------------------------------------------------------------------
# Data


def stdlib_corpus() -> tuple[bytes, list[str]]:
    """The standard library's top-level ``.py`` files, sorted by name, joined by blank lines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise RuntimeError(f"no .py files found in the standard library folder {root}")
    return b"\n\n".join(p.read_bytes() for p in files), [p.name for p in files]


def topics_corpus() -> tuple[bytes, bytes, list[str], list[str]]:
    """``pydoc_data.topics`` split by topic: ``(train bytes, held-out bytes, train names, held-out names)``."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = [n for i, n in enumerate(names) if i % HELDOUT_EVERY == HELDOUT_FIRST]
    train = [n for n in names if n not in set(held)]

    def join(keys: Sequence[str]) -> bytes:
        return "\n\n".join(topics[k].strip() for k in keys).encode("utf-8")

    return join(train), join(held), train, held


def as_tokens(data: bytes) -> torch.Tensor:
    """Bytes as a 1-D ``int64`` tensor of token ids 0..255."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def windows(tokens: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """``(len(starts), length)`` slices ``tokens[s : s + length]``."""
    return tokens[starts[:, None] + torch.arange(length)]


def tiled_windows(tokens: torch.Tensor, length: int, count: int | None = None) -> torch.Tensor:
    """Non-overlapping windows covering ``tokens`` (all of them, or ``count`` evenly spaced ones)."""
    starts = torch.arange(0, len(tokens) - length, length)
    if count is not None and count < len(starts):
        starts = starts[torch.linspace(0, len(starts) - 1, count).round().long()]
    return windows(tokens, starts, length)


def sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Model


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of ``batch`` ``(n, context + 1)``."""
    logits = model(input_ids=batch[:, :-1]).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def mean_loss(model: nn.Module, data: torch.Tensor, chunk: int = 256) -> float:
    """Token-weighted mean cross-entropy over all windows of ``data`` (every window has the same length)."""
    total = 0.0
    for i in range(0, len(data), chunk):
        part = data[i : i + chunk]
        total += float(lm_loss(model, part)) * len(part)
    return total / len(data)


def warmup_cosine(step: int, steps: int, warmup: int, floor: float = 0.0) -> float:
    """Learning-rate factor: linear warmup over ``warmup`` steps, then cosine decay from 1 to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def gpt_config():
    from transformers import GPT2Config

    return GPT2Config(**MODEL)


def pretrained_model(cache: Path, steps: int, log: Callable[[str], None]) -> tuple[nn.Module, dict]:
    """The pretrained GPT (float32, eval mode), from the cache or trained now; and what is known about it."""
    from transformers import GPT2LMHeadModel

    corpus, files = stdlib_corpus()
    settings = dict(PRETRAIN, steps=steps)
    key = sha256(json.dumps([MODEL, settings], sort_keys=True).encode(), corpus, torch.__version__.encode())[:16]
    path = cache / f"gpt_stdlib_{key}.pt"
    torch.manual_seed(settings["seed"])
    model = GPT2LMHeadModel(gpt_config())
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(blob["state"])
        info = dict(blob["info"], cached=True, path=str(path))
        log(f"pretrained model from cache {path}")
        return model.eval(), info

    tokens = as_tokens(corpus)
    n_held = int(len(tokens) * settings["holdout"])
    train, held = tokens[:-n_held], tokens[-n_held:]
    context = MODEL["n_positions"]
    held_windows = tiled_windows(held, context + 1, 256)
    gen = torch.Generator().manual_seed(settings["seed"] + 1)
    opt = torch.optim.AdamW(
        model.parameters(), lr=settings["lr"], betas=settings["betas"], weight_decay=settings["weight_decay"]
    )
    warmup = min(settings["warmup"], max(1, steps // 10))
    initial = mean_loss(model.eval(), held_windows)
    model.train()
    log(
        f"pretraining {steps} steps on {len(files)} stdlib files ({len(corpus) / 1e6:.2f} MB), held-out loss "
        f"{initial:.3f}"
    )
    t0 = time.perf_counter()
    for k in range(steps):
        for g in opt.param_groups:
            g["lr"] = settings["lr"] * warmup_cosine(k, steps, warmup, floor=0.1)
        starts = torch.randint(0, len(train) - context - 1, (settings["batch"],), generator=gen)
        loss = lm_loss(model, windows(train, starts, context + 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (k + 1) % max(1, steps // 5) == 0:
            log(
                f"  pretraining step {k + 1}/{steps}: minibatch loss {float(loss.detach()):.3f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    seconds = time.perf_counter() - t0
    model.eval()
    final = mean_loss(model, held_windows)
    info = dict(
        key=key,
        steps=steps,
        seconds=seconds,
        heldout_before=initial,
        heldout_after=final,
        corpus_bytes=len(corpus),
        corpus_files=len(files),
        corpus_sha256=sha256(corpus)[:16],
        threads=torch.get_num_threads(),
        cached=False,
        path=str(path),
    )
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "info": info}, path)
    log(f"pretrained in {seconds:.0f} s: stdlib held-out loss {initial:.3f} -> {final:.3f} nats/byte; saved {path}")
    return model, info


class LoRAConv1D(nn.Module):
    """A LoRA adapter around GPT-2's ``Conv1D`` (weight ``(in, out)``) with PEFT's attribute names.

    Computes ``base_layer(x) + scaling * lora_B(lora_A(x))``: ``lora_A["default"].weight`` is ``A`` (r, in),
    ``lora_B["default"].weight`` is ``B`` (out, r), ``fan_in_fan_out = True`` (the base weight is stored transposed),
    which is what :func:`lora_pairs` and :func:`full_rank_lora_model_init_` read.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float) -> None:
        super().__init__()
        n_in, n_out = base.weight.shape
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n_in, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, n_out, bias=False)})
        self.scaling = {"default": alpha / r}
        self.fan_in_fan_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.lora_B["default"](self.lora_A["default"](x))
        return self.base_layer(x) + self.scaling["default"] * lora


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def add_adapters(base: nn.Module, how: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``base`` in ``dtype`` with rank-``RANK`` adapters on ``TARGETS`` of every block; only the factors
    train.

    ``how`` is ``"peft"`` (``peft.get_peft_model``) or ``"manual"`` (:class:`LoRAConv1D`).
    """
    model = copy.deepcopy(base).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if how == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=RANK,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=list(TARGETS),
            fan_in_fan_out=True,
            bias="none",
        )
        model = get_peft_model(model, config)
    elif how == "manual":
        for block in model.transformer.h:
            for dotted in TARGETS:
                owner_name, attr = dotted.split(".")
                owner = getattr(block, owner_name)
                setattr(owner, attr, LoRAConv1D(getattr(owner, attr), RANK, LORA_ALPHA).to(dtype))
    else:
        raise ValueError(f"adapters must be 'peft' or 'manual', got {how!r}")
    pairs = lora_pairs(model)
    expected = MODEL["n_layer"] * len(TARGETS)
    if len(pairs) != expected:
        raise RuntimeError(f"found {len(pairs)} LoRA pairs, expected {expected} ({how} adapters)")
    return model


@torch.no_grad()
def init_adapters_(model: nn.Module, seed: int) -> None:
    """PEFT's start drawn from ``seed`` (``A`` Kaiming-uniform, ``B = 0``), then the full-rank start that keeps the
    function (the product goes into the frozen base weight)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    for b, a in lora_pairs(model):
        bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)), PEFT's default for lora_A
        a.copy_((torch.rand(a.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
        b.zero_()
    full_rank_lora_model_init_(model, init_scale=INIT_SCALE, generator=gen)


@torch.no_grad()
def rescale_(model: nn.Module) -> None:
    """``(B, A) -> (B M, M^-1 A)`` with ``M = diag(geomspace(1, GAUGE_SPAN, r))`` for every pair."""
    for b, a in lora_pairs(model):
        m = torch.logspace(0.0, math.log10(GAUGE_SPAN), b.shape[1], dtype=torch.float64)
        b.copy_(b.to(torch.float64) * m)
        a.copy_(a.to(torch.float64) / m[:, None])


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning runs


@dataclass
class Run:
    """One fine-tuning run: held-out loss curve, minibatch losses, timings."""

    variant: str
    lr: float
    seed: int
    dtype: str = "float32"
    polar: str = "newton_schulz"
    at: list[int] = field(default_factory=list)
    seconds_at: list[float] = field(default_factory=list)
    heldout: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    opt_ms: list[float] = field(default_factory=list)
    final: float = math.inf
    diverged: bool = False

    @property
    def median_step_ms(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else math.nan

    @property
    def median_opt_ms(self) -> float:
        return statistics.median(self.opt_ms) if self.opt_ms else math.nan


def make_optimizer(kind: str, model: nn.Module, lr: float, polar: str) -> list[torch.optim.Optimizer]:
    """The optimizer(s) of ``kind`` over the trainable parameters of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return [torch.optim.AdamW(params, lr=lr, weight_decay=0.0)]
    if kind == "muon":
        mats = [p for p in params if p.ndim == 2]
        rest = [p for p in params if p.ndim != 2]
        opts: list[torch.optim.Optimizer] = [torch.optim.Muon(mats, lr=lr, weight_decay=0.0)]
        if rest:
            opts.append(torch.optim.AdamW(rest, lr=lr, weight_decay=0.0))
        return opts
    if kind in ("imuon", "imuon_ambient"):
        momentum = "ambient" if kind == "imuon_ambient" else "factor"
        return [IMuon([{"params": params, "pair_momentum": momentum}], lr=lr, pairs=lora_pairs(model), polar=polar)]
    raise ValueError(f"unknown optimizer kind {kind!r}")


@dataclass
class Context:
    """Everything the runs share: data, starting points per (seed, dtype), minibatch offsets per seed."""

    base: nn.Module
    adapters: str
    train: torch.Tensor
    curve_windows: torch.Tensor
    final_windows: torch.Tensor
    steps: int
    batch: int
    eval_every: int
    starts: dict[tuple[int, str], nn.Module] = field(default_factory=dict)
    init_change: dict[tuple[int, str, bool], float] = field(default_factory=dict)
    runs: dict[tuple[str, float, int, str, str], Run] = field(default_factory=dict)
    on_run: Callable[[Run], None] | None = None

    def start(self, seed: int, dtype: torch.dtype, rescaled: bool) -> nn.Module:
        """A fresh copy of the seed's starting model (in ``dtype``, rescaled or not)."""
        name = str(dtype).removeprefix("torch.")
        if (seed, name) not in self.starts:
            model = add_adapters(self.base, self.adapters, dtype)
            init_adapters_(model, seed)
            self.starts[(seed, name)] = model
        model = copy.deepcopy(self.starts[(seed, name)])
        if rescaled:
            probe = self.curve_windows[:16, :-1]
            with torch.no_grad():
                before = model(input_ids=probe).logits
                rescale_(model)
                change = float((model(input_ids=probe).logits - before).abs().max())
            self.init_change[(seed, name, True)] = change
        return model

    def batches(self, seed: int) -> torch.Tensor:
        """``(steps, batch)`` window offsets into the training text, fixed by ``seed``."""
        gen = torch.Generator().manual_seed(20_000 + seed)
        return torch.randint(0, len(self.train) - MODEL["n_positions"] - 1, (self.steps, self.batch), generator=gen)

    def run(
        self, variant: str, lr: float, seed: int, *, dtype: torch.dtype = torch.float32, polar: str = "newton_schulz"
    ) -> Run:
        """Fine-tune from the seed's start with ``variant`` at ``lr`` (memoized)."""
        name = str(dtype).removeprefix("torch.")
        key = (variant, lr, seed, name, polar)
        if key in self.runs:
            return self.runs[key]
        kind, rescaled = VARIANTS[variant]
        model = self.start(seed, dtype, rescaled)
        opts = make_optimizer(kind, model, lr, polar)
        initial = [[g["lr"] for g in o.param_groups] for o in opts]
        curve = self.curve_windows
        final_windows = self.final_windows
        offsets = self.batches(seed)
        context = MODEL["n_positions"]
        warmup = max(1, round(WARMUP_FRACTION * self.steps))
        run = Run(variant, lr, seed, name, polar)
        elapsed = 0.0

        def record(k: int) -> None:
            with torch.no_grad():
                run.at.append(k)
                run.seconds_at.append(elapsed)
                run.heldout.append(mean_loss(model, curve))

        record(0)
        for k in range(self.steps):
            factor = warmup_cosine(k, self.steps, warmup)
            for o, lrs in zip(opts, initial):
                for g, base_lr in zip(o.param_groups, lrs):
                    g["lr"] = base_lr * factor
            batch = windows(self.train, offsets[k], context + 1)
            t0 = time.perf_counter()
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss = lm_loss(model, batch)
            loss.backward()
            t1 = time.perf_counter()
            try:
                for o in opts:
                    o.step()
            except FloatingPointError:
                run.diverged = True
            t2 = time.perf_counter()
            value = float(loss.detach())
            run.loss.append(value)
            run.step_ms.append(1e3 * (t2 - t0))
            run.opt_ms.append(1e3 * (t2 - t1))
            elapsed += t2 - t0
            if run.diverged or not math.isfinite(value):
                run.diverged = True
                break
            if (k + 1) % self.eval_every == 0 or k + 1 == self.steps:
                record(k + 1)
        if not run.diverged:
            final = mean_loss(model, final_windows)
            run.final = final if math.isfinite(final) else math.inf
            run.diverged = not math.isfinite(final)
        self.runs[key] = run
        if self.on_run is not None:
            self.on_run(run)
        return run


def max_difference(a: Run, b: Run) -> tuple[float, float]:
    """``(max |held-out loss difference| over the evaluation points, max |minibatch loss difference| over steps)``."""
    if a.diverged or b.diverged:
        return math.inf, math.inf
    return (max(abs(x - y) for x, y in zip(a.heldout, b.heldout)), max(abs(x - y) for x, y in zip(a.loss, b.loss)))


# ----------------------------------------------------------------------------------------------------------------------
# Reporting


def fmt(v: float, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "diverged"
    return format(v, spec)


def fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def host_lines(script: str, argv: Sequence[str], load_start: tuple, load_end: tuple, software: str = "") -> list[str]:
    """The machine part of a results file: the command (``python benchmarks/<script> <argv>``), CPU, load at the
    start and end, threads, and the software versions (``software`` appended after transformers')."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import transformers

    env = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ)
    return [
        f"- command: `python benchmarks/{script} {' '.join(argv)}`",
        f"- machine: {platform.node()}, {cpu}, {os.cpu_count()} CPUs, {platform.platform()}",
        f"- load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in load_start)} at the start, "
        f"{', '.join(f'{x:.2f}' for x in load_end)} at the end",
        f"- threads: torch.get_num_threads() = {torch.get_num_threads()}"
        + (f" ({env})" if env else " (no OMP/MKL environment setting)"),
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}{software}",
    ]


def machine_lines(args: argparse.Namespace, argv: Sequence[str], load_start: tuple, load_end: tuple) -> list[str]:
    peft_version = "not installed"
    if peft_available():
        import peft

        peft_version = peft.__version__
    software = f", peft {peft_version}; adapters built by {args.adapters_used}"
    return host_lines("bench_lora_text.py", argv, load_start, load_end, software)


def verdict(diffs: Sequence[float], tol: float = 1e-3) -> str:
    """Win / tie / loss from per-seed differences (negative: lower loss than the reference)."""
    if not diffs or any(not math.isfinite(d) for d in diffs):
        return "-"
    n = f" ({len(diffs)} seed{'s' if len(diffs) > 1 else ''})"
    if max(diffs) < -tol:
        return "wins" + n
    if min(diffs) > tol:
        return "loses" + n
    return "ties" + n


def grid_lines(grids: dict[str, dict[float, float]], best: dict[str, float]) -> list[str]:
    """The results file's table of learning-rate grids (final held-out loss per rate, the best in bold); nothing
    without grids."""
    if not grids:
        return []
    lines = [
        "",
        "Learning-rate grids (seed 0, final held-out loss; best in bold):",
        "",
        "| optimizer | grid |",
        "|---|---|",
    ]
    for v, grid in grids.items():
        cells = [
            ("**" if lr == best[v] else "") + f"{fmt_lr(lr)}: {fmt(val)}" + ("**" if lr == best[v] else "")
            for lr, val in grid.items()
        ]
        lines.append(f"| {v} | {', '.join(cells)} |")
    return lines


def write_results(output: Path, lines: list[str], plots: list[Path], raw: dict) -> str:
    """Write ``results.md`` (``lines`` and the plots' names) and ``results.json`` (``raw``) under ``output``, print
    the markdown and return it."""
    lines = [*lines, "", "Plots: " + ", ".join(f"`{p.name}`" for p in plots)]
    text = "\n".join(lines) + "\n"
    (output / "results.md").write_text(text)
    (output / "results.json").write_text(json.dumps(raw, indent=1, default=str))
    print(text)
    return text


def plot_curves(results: dict[str, list[Run]], output: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for xkey, xlabel, stem in (
        ("at", "step", "heldout_vs_steps.png"),
        ("seconds_at", "training seconds (eval excluded)", "heldout_vs_seconds.png"),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        for i, (variant, runs) in enumerate(results.items()):
            runs = [r for r in runs if not r.diverged]
            if not runs:
                continue
            n = min(len(r.heldout) for r in runs)
            xs = [statistics.mean(getattr(r, xkey)[j] for r in runs) for j in range(n)]
            ys = [statistics.mean(r.heldout[j] for r in runs) for j in range(n)]
            lo = [min(r.heldout[j] for r in runs) for j in range(n)]
            hi = [max(r.heldout[j] for r in runs) for j in range(n)]
            base = variant.split(" (")[0]
            color = COLORS.get(base, f"C{i + 4}")
            style = "--" if "(BM" in variant else "-"
            ax.plot(xs, ys, style, color=color, label=f"{variant} (lr {fmt_lr(runs[0].lr)})", linewidth=1.4)
            if len(runs) > 1:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.12)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
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

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, (variant, grid) in enumerate(grids.items()):
        lrs = [lr for lr in grid if math.isfinite(grid[lr])]
        color = COLORS.get(variant.split(" (")[0], f"C{i + 4}")
        ax.plot(
            lrs, [grid[lr] for lr in lrs], "--o" if "(BM" in variant else "-o", color=color, label=variant, markersize=4
        )
    finite = [val for grid in grids.values() for val in grid.values() if math.isfinite(val)]
    if finite and max(finite) > min(finite) + 0.3:  # keep the interesting part readable; worse points off the top
        ax.set_ylim(min(finite) - 0.02, min(finite) + 0.3)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final held-out loss, seed 0")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
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
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per run (default 200)")
    p.add_argument("--batch", type=int, default=16, help="fine-tuning minibatch, in windows of 64 bytes (default 16)")
    p.add_argument("--seeds", type=int, default=None, help="seeds at the best rate (default 3; 1 with --quick)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a quiet 2-core machine 2 threads run a step ~1.9x "
        "faster, but on a shared, loaded one the second thread's waits make it several times slower)",
    )
    p.add_argument("--pretrain-steps", type=int, default=PRETRAIN["steps"], help="pretraining steps (default 1500)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder of the pretrained checkpoints")
    p.add_argument(
        "--adapters",
        choices=("auto", "peft", "manual"),
        default="auto",
        help="PEFT's get_peft_model (auto: when installed) or hand-built adapters with PEFT's names",
    )
    p.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="optimizers to run (default: all)"
    )
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (default ~15)")
    p.add_argument(
        "--curve-windows",
        type=int,
        default=128,
        help="held-out windows evaluated along the curves (default 128; the final loss uses all)",
    )
    p.add_argument("--final-windows", type=int, default=None, help="cap on the held-out windows of the final loss")
    p.add_argument(
        "--fidelity-svd",
        action="store_true",
        help="also run iMuon with polar='svd' in float64 from both gauges (exact fidelity check)",
    )
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if min(args.steps, args.batch, args.seeds, args.threads, args.pretrain_steps) < 1:
        raise SystemExit("--steps, --batch, --seeds, --threads and --pretrain-steps must be positive")
    if "AdamW" not in args.variants:
        args.variants = ["AdamW", *args.variants]  # the reference of the differences
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    wall0 = time.perf_counter()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - wall0:7.1f} s] {line}", flush=True)

    args.adapters_used = ("peft" if peft_available() else "manual") if args.adapters == "auto" else args.adapters
    if args.adapters_used == "peft" and not peft_available():
        raise SystemExit("--adapters peft needs the peft extra: pip install -e '.[peft]' -c constraints.txt")
    log(
        f"bench_lora_text: torch threads {torch.get_num_threads()}, load {load_start[0]:.2f}, "
        f"adapters: {args.adapters_used}"
    )

    def progress(run: Run) -> None:
        polar = f" {run.polar}" if run.variant.startswith("iMuon") else ""
        log(
            f"{run.variant:18s} lr {fmt_lr(run.lr):>5s} seed {run.seed} {run.dtype}{polar}: "
            f"final held-out {fmt(run.final)}, {run.median_step_ms:.1f} ms/step "
            f"({run.median_opt_ms:.2f} ms step())"
        )

    base, pre = pretrained_model(Path(args.cache), args.pretrain_steps, log)
    train_bytes, held_bytes, train_topics, held_topics = topics_corpus()
    train_tokens, held_tokens = as_tokens(train_bytes), as_tokens(held_bytes)
    context = MODEL["n_positions"]
    final_windows = tiled_windows(held_tokens, context + 1, args.final_windows)
    curve_windows = tiled_windows(held_tokens, context + 1, min(args.curve_windows, len(final_windows)))
    eval_every = args.eval_every or max(1, args.steps // 20)
    ctx = Context(
        base, args.adapters_used, train_tokens, curve_windows, final_windows, args.steps, args.batch, eval_every
    )
    ctx.on_run = progress
    start_loss = mean_loss(base, final_windows)
    log(
        f"fine-tuning text: {len(train_topics)} train topics ({len(train_bytes) / 1e3:.0f} kB), {len(held_topics)} "
        f"held-out topics ({len(held_bytes) / 1e3:.0f} kB, {len(final_windows)} windows); pretrained model's "
        f"held-out loss {start_loss:.4f}"
    )

    variants = [v for v in VARIANTS if v in args.variants]
    grids: dict[str, dict[float, float]] = {}
    best: dict[str, float] = {}
    if args.quick:
        best = {v: QUICK_LRS[v] for v in variants}
    else:
        # all initial 3-point grids first (interleaved), then the widening each one needs
        for v in variants:
            c = grid_index(GRID_CENTER[VARIANTS[v][0]])
            for i in (c - 1, c, c + 1):
                ctx.run(v, grid_lr(i), 0)
        for v in variants:
            best[v], grids[v] = search_lr(lambda lr, v=v: ctx.run(v, lr, 0).final, GRID_CENTER[VARIANTS[v][0]])
            log(f"{v}: best lr {fmt_lr(best[v])} of {', '.join(fmt_lr(lr) for lr in grids[v])}")

    seeds = list(range(args.seeds))
    results: dict[str, list[Run]] = {v: [] for v in variants}
    for s in seeds:  # seed-major: every optimizer's seed-s run back to back
        for v in variants:
            results[v].append(ctx.run(v, best[v], s))

    # fidelity: the rescaled run against the unrescaled optimizer at the same rate and seed 0
    fidelity: dict[str, dict] = {}
    for v, ref in UNRESCALED.items():
        if v not in variants or ref not in variants:
            continue
        lr = best[ref]
        a, b = ctx.run(ref, lr, 0), ctx.run(v, lr, 0)
        held, mini = max_difference(a, b)
        fidelity[v] = dict(
            reference=ref,
            lr=lr,
            heldout=held,
            minibatch=mini,
            dtype="float32",
            polar="newton_schulz" if ref.startswith("iMuon") else "-",
            final=(a.final, b.final),
        )
    if args.fidelity_svd and "iMuon" in variants:
        lr = best["iMuon"]
        a = ctx.run("iMuon", lr, 0, dtype=torch.float64, polar="svd")
        b = ctx.run("iMuon (BM, M^-1A)", lr, 0, dtype=torch.float64, polar="svd")
        held, mini = max_difference(a, b)
        fidelity["iMuon (BM, M^-1A), SVD float64"] = dict(
            reference="iMuon, SVD float64",
            lr=lr,
            heldout=held,
            minibatch=mini,
            dtype="float64",
            polar="svd",
            final=(a.final, b.final),
        )
    load_end = os.getloadavg()
    wall = time.perf_counter() - wall0

    # ------------------------------------------------------------------ tables
    ref = {r.seed: r.final for r in results["AdamW"]}
    rows = []
    summary = {}
    for v in variants:
        finals = [r.final for r in results[v]]
        diffs = [r.final - ref[r.seed] for r in results[v]]
        step_ms = statistics.median([x for r in results[v] for x in r.step_ms])
        opt_ms = statistics.median([x for r in results[v] for x in r.opt_ms])
        ok = all(math.isfinite(f) for f in finals)
        mean = statistics.mean(finals) if ok else math.inf
        spread = statistics.stdev(finals) if ok and len(finals) > 1 else math.nan
        fid = fidelity.get(v, {}).get("heldout", math.nan)
        summary[v] = dict(
            lr=best[v],
            finals=finals,
            mean=mean,
            std=spread,
            diffs_vs_adamw=diffs,
            step_ms=step_ms,
            opt_ms=opt_ms,
            fidelity_heldout=fid,
            grid=grids.get(v),
        )
        diff_text = "-" if v == "AdamW" else ", ".join(f"{d:+.4f}" for d in diffs)
        rows.append(
            f"| {v} | {fmt_lr(best[v])} | {fmt(mean)}"
            + (f" ± {spread:.4f}" if math.isfinite(spread) else "")
            + f" | {diff_text} | {'reference' if v == 'AdamW' else verdict(diffs)} | {step_ms:.1f} | {opt_ms:.2f} | "
            + (f"{fid:.2e}" if math.isfinite(fid) else ("diverged" if math.isinf(fid) else "-"))
            + " |"
        )
    n_seeds = len(seeds)
    title = (
        f"LoRA r={RANK} on a {MODEL['n_layer']}x{MODEL['n_embd']} byte GPT, {args.steps} steps x batch "
        f"{args.batch}, {n_seeds} seed{'s' if n_seeds > 1 else ''}"
    )
    lines = [f"# {title}", ""]
    lines += machine_lines(args, argv, load_start, load_end)
    lines += [
        f"- wall time: {wall:.0f} s ({wall / 60:.1f} min) for this run"
        + ("" if pre["cached"] else f", including {pre['seconds']:.0f} s of pretraining"),
        f"- pretraining: {pre['steps']} steps x batch {PRETRAIN['batch']} on {pre['corpus_files']} stdlib files "
        f"({pre['corpus_bytes'] / 1e6:.2f} MB, sha256 {pre['corpus_sha256']}), stdlib held-out loss "
        f"{pre['heldout_before']:.3f} -> {pre['heldout_after']:.3f} nats/byte in {pre['seconds']:.0f} s "
        f"({'loaded from the cache' if pre['cached'] else 'trained in this run'}, key {pre['key']})",
        f"- fine-tuning text: pydoc_data.topics, {len(train_topics)} train topics ({len(train_bytes) / 1e3:.0f} kB), "
        f"{len(held_topics)} held-out topics ({len(held_bytes) / 1e3:.0f} kB, {len(final_windows)} windows of "
        f"{context} bytes); pretrained model's held-out loss {start_loss:.4f} nats/byte",
        f"- LoRA r={RANK}, alpha={LORA_ALPHA} on {', '.join(TARGETS)} ({len(TARGETS) * MODEL['n_layer']} pairs); "
        f"full-rank start with |B|_2 = {INIT_SCALE:g}; gauge M = diag(geomspace(1, {GAUGE_SPAN:g}, r)), largest "
        f"change of the logits by the rescale: "
        f"{max(ctx.init_change.values(), default=math.nan):.1e} (float32)",
        "- schedule: linear warmup over 5 % of the steps, cosine decay to 0; no weight decay; "
        + (
            "rates: QUICK_LRS (best of the full run)"
            if args.quick
            else "rates: best of a half-decade grid on seed 0 (interior), then all seeds at it"
        ),
        "",
        "Held-out loss after the last step (nats/byte, all held-out windows); Δ = this optimizer minus AdamW on the "
        "same seed (same start, same minibatches); verdict: every seed below (wins) / above (loses) AdamW by more "
        "than 1e-3, else ties. ms/step: median over all steps of the best-rate runs (forward, backward, step()); "
        "step(): optimizer.step() alone. Gauge fidelity: max |held-out loss difference| over the evaluation points "
        "between the rescaled run and the unrescaled one at the same rate, seed 0.",
        "",
        "| optimizer | best lr | held-out loss (mean ± std) | Δ vs AdamW per seed | vs AdamW | ms/step | "
        "ms step() | gauge fidelity |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if fidelity:
        lines += [
            "",
            "Gauge fidelity: rescaled start `(B M, M^-1 A)` against the original start, same rate, seed 0 "
            "(equal trajectories mean the optimizer does not see the gauge).",
            "",
            "| run | against | lr | polar, dtype | max \\|Δ held-out loss\\| | max \\|Δ minibatch loss\\| | "
            "final held-out (orig / rescaled) |",
            "|---|---|---|---|---|---|---|",
        ]
        for v, f in fidelity.items():
            lines.append(
                f"| {v} | {f['reference']} | {fmt_lr(f['lr'])} | {f['polar']}, {f['dtype']} | "
                f"{f['heldout']:.2e} | {f['minibatch']:.2e} | {fmt(f['final'][0])} / {fmt(f['final'][1])} |"
            )
    lines += grid_lines(grids, best)
    comparisons = []
    for v in variants:
        if not v.startswith("iMuon"):
            continue
        peer = "Muon (BM, M^-1A)" if "(BM" in v else "Muon"
        if peer in results:
            d = [a.final - b.final for a, b in zip(results[v], results[peer])]
            comparisons.append(f"- {v} vs {peer}: Δ per seed {', '.join(f'{x:+.4f}' for x in d)} -> {verdict(d)}")
    if comparisons:
        lines += ["", "iMuon against torch.optim.Muon in the same gauge:", "", *comparisons]
    plots = plot_curves(results, output, title)
    if grids:
        plots.append(plot_grids(grids, output))
    raw = dict(
        summary=summary,
        fidelity=fidelity,
        pretrain=pre,
        wall_seconds=wall,
        argv=argv,
        runs=[asdict(r) for r in ctx.runs.values()],
    )
    text = write_results(output, lines, plots, raw)
    log(f"done in {wall:.0f} s; results in {output / 'results.md'}")
    return dict(
        summary=summary,
        fidelity=fidelity,
        grids=grids,
        best=best,
        pretrain=pre,
        text=text,
        plots=plots,
        wall=wall,
        start_loss=start_loss,
    )


if __name__ == "__main__":
    main()
