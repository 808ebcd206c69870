"""Options of :class:`~imuon_manopt.optim.IMuon`: defaults, normalization, validation, pairs.

One spelling per option: the constructor's keywords and the param-group keys are the same, and a param group stores
each option under its own name, as given (``state_dict()`` holds exactly what the user wrote):

- ``lr momentum nesterov weight_decay adjust_lr_fn use_imuon pair_momentum error_feedback input_transform flatten``;
- ``norm``: a name or a ``(name, parameter)`` pair (:func:`imuon_manopt.lmo.resolve_norm`);
- ``polar``: a name or a dict ``{"method": "newton_schulz", "steps": 5, "dtype": torch.bfloat16, "oversample": 8,
  "power_iters": 2}`` (:func:`imuon_manopt.lmo.resolve_polar`; read through :func:`polar_spec`);
- ``fallback``: ``"adamw"``, ``"sgd"`` or a dict ``{"name": "adamw", "lr": 1e-3, "betas": (0.9, 0.999), "eps":
  1e-8}`` (read through :func:`fallback_spec`). The AdamW betas are nested there on purpose: torch's schedulers
  that cycle momentum (``OneCycleLR``, ``CyclicLR``) cycle a group's ``betas[0]`` when the optimizer's defaults have
  ``betas``, else its ``momentum`` — iMuon's.
- ``adjust_lr_fn``: ``None``, a built-in name or a name registered with :func:`register_adjust_lr_fn` (a name, not
  a callable, so that ``param_groups`` and ``state_dict()`` pickle).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..lmo import PolarSpec, resolve_norm, resolve_polar
from ..transforms import resolve_input_transform
from . import _dispatch
from ._lr import adjust_lr_names

POLARS = ("svd", "newton_schulz", "randomized")
FALLBACKS = ("adamw", "sgd")
PAIR_MOMENTUM = ("factor", "ambient")
NONFINITE = ("raise", "skip")

#: Stored group options and their defaults (besides ``lr``, which has none).
GROUP_DEFAULTS: dict[str, Any] = dict(
    momentum=0.95,
    nesterov=True,
    weight_decay=0.0,
    norm="spectral",
    polar="newton_schulz",
    adjust_lr_fn=None,
    pair_momentum="factor",
    fallback="adamw",
    use_imuon=True,
    error_feedback=False,
    input_transform=None,
    flatten=True,
)

#: Keys of earlier layouts -> the one spelling that replaces them (refused with that advice).
REMOVED_KEYS = {
    "p": "norm=('schatten', p)",
    "ns_steps": "polar={'method': 'newton_schulz', 'steps': ...}",
    "ns_dtype": "polar={'method': 'newton_schulz', 'dtype': ...}",
    "oversample": "polar={'method': 'randomized', 'oversample': ...}",
    "power_iters": "polar={'method': 'randomized', 'power_iters': ...}",
    "fallback_lr": "fallback={'name': ..., 'lr': ...}",
    "betas": "fallback={'name': 'adamw', 'betas': ...}",
    "eps": "fallback={'name': 'adamw', 'eps': ...}",
}

FALLBACK_KEYS = ("name", "lr", "betas", "eps")
#: AdamW's betas and eps where ``fallback`` does not set them (torch's defaults).
FALLBACK_DEFAULTS: dict[str, Any] = {"betas": (0.9, 0.999), "eps": 1e-8}


def check_removed(opts: dict[str, Any], where: str = "") -> None:
    """``TypeError`` for a key of an earlier layout, naming the spelling that replaces it."""
    old = sorted(set(opts) & set(REMOVED_KEYS))
    if old:
        advice = "; ".join(f"{k} -> {REMOVED_KEYS[k]}" for k in old)
        raise TypeError(f"{where}IMuon option(s) {old} no longer exist: use {advice}")


def fold(opts: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Normalize the options of a param group (in a copy): pairs and dicts as hashable, picklable copies."""
    check_removed(opts, where)
    opts = dict(opts)
    for key in ("norm", "input_transform"):
        if isinstance(opts.get(key), list):
            opts[key] = tuple(opts[key])  # hashable, as the grouping needs
    if isinstance(opts.get("polar"), dict):
        opts["polar"] = dict(opts["polar"])
    fallback = opts.get("fallback")
    if isinstance(fallback, dict):
        fallback = dict(fallback)
        if isinstance(fallback.get("betas"), list):
            fallback["betas"] = tuple(fallback["betas"])
        opts["fallback"] = fallback
    return opts


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_options(opts: dict[str, Any], where: str = "") -> None:
    """``ValueError`` naming the bad value for every stored option of a param group."""
    lr = opts["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}lr must be a float or a 1-element tensor, got shape {tuple(lr.shape)}")
        lr = float(lr)
    if not _real(lr) or not lr >= 0.0 or not math.isfinite(lr):
        raise ValueError(f"{where}invalid learning rate: lr={opts['lr']!r} (must be finite and >= 0)")
    mom = opts["momentum"]
    if not _real(mom) or not 0.0 <= mom < 1.0:
        raise ValueError(f"{where}invalid momentum: {mom!r} (must be in [0, 1))")
    wd = opts["weight_decay"]
    if not _real(wd) or not wd >= 0.0 or not math.isfinite(wd):
        raise ValueError(f"{where}invalid weight_decay: {wd!r} (must be finite and >= 0)")
    if not isinstance(opts["nesterov"], bool):
        raise ValueError(f"{where}nesterov must be a bool, got {opts['nesterov']!r}")
    try:
        nrm = resolve_norm(opts["norm"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}invalid norm={opts['norm']!r}: {err}") from err
    try:
        spec = resolve_polar(opts["polar"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}invalid polar={opts['polar']!r}: {err}") from err
    if spec.method not in POLARS:
        raise ValueError(f"{where}unknown polar method {spec.method!r}; expected one of {POLARS}")
    if spec.method == "randomized" and nrm.name not in ("kyfan", "nuclear"):
        raise ValueError(
            f"{where}polar='randomized' solves the Ky Fan LMO (a range finder selects the top k singular pairs); "
            f"with norm={opts['norm']!r} use polar='newton_schulz' or 'svd', or set norm=('kyfan', k)"
        )
    if spec.steps is not None and spec.steps >= 100:
        raise ValueError(f"{where}invalid polar 'steps': {spec.steps!r} (must be an int in [1, 100))")
    fn = opts["adjust_lr_fn"]
    if callable(fn):
        raise TypeError(
            f"{where}adjust_lr_fn must be a name, not a callable (param_groups and state_dict() must pickle): "
            "register the function once with imuon_manopt.optim.register_adjust_lr_fn('my_rule', fn) and pass "
            "adjust_lr_fn='my_rule'"
        )
    if fn is not None and fn not in adjust_lr_names():
        raise ValueError(
            f"{where}unknown adjust_lr_fn={fn!r}; expected None or one of {adjust_lr_names()} (more with "
            "imuon_manopt.optim.register_adjust_lr_fn)"
        )
    if opts["pair_momentum"] not in PAIR_MOMENTUM:
        raise ValueError(f"{where}unknown pair_momentum={opts['pair_momentum']!r}; expected one of {PAIR_MOMENTUM}")
    fallback_spec(opts, where)
    if not isinstance(opts["use_imuon"], bool):
        raise ValueError(f"{where}use_imuon must be a bool, got {opts['use_imuon']!r}")
    if not isinstance(opts["flatten"], bool):
        raise ValueError(
            f"{where}flatten must be a bool (True: one LMO per tensor on its (shape[0], -1) view; False: one LMO per "
            f"trailing (m, n) slice), got {opts['flatten']!r}"
        )
    check_family_options(opts, nrm, where)


def polar_spec(group: dict[str, Any]) -> PolarSpec:
    """The group's LMO solver as the core's :class:`~imuon_manopt.lmo.PolarSpec` (``steps`` only for Newton–Schulz,
    ``dtype`` not for the exact SVD)."""
    spec = resolve_polar(group["polar"])
    return replace(
        spec,
        steps=spec.steps if spec.method == "newton_schulz" else None,
        dtype=spec.dtype if spec.method != "svd" else None,
    )


@dataclass(frozen=True)
class FallbackSpec:
    """A group's fallback: ``name`` (``"adamw"`` or ``"sgd"``), ``lr`` (``None``: the group's), AdamW's ``betas``
    and ``eps``."""

    name: str
    lr: float | None
    betas: tuple[float, float]
    eps: float


def fallback_spec(group: dict[str, Any], where: str = "") -> FallbackSpec:
    """The group's ``fallback`` option resolved and checked (``ValueError`` naming a bad value)."""
    fb = group["fallback"]
    if isinstance(fb, str):
        fb = {"name": fb}
    if not isinstance(fb, dict) or "name" not in fb or set(fb) - set(FALLBACK_KEYS):
        raise ValueError(
            f"{where}invalid fallback={group['fallback']!r}: expected 'adamw', 'sgd' or a dict with 'name' and "
            "optionally 'lr', 'betas', 'eps'"
        )
    if fb["name"] not in FALLBACKS:
        raise ValueError(f"{where}unknown fallback={fb['name']!r}; expected one of {FALLBACKS}")
    flr = fb.get("lr")
    if flr is not None and (not _real(flr) or not flr >= 0.0 or not math.isfinite(flr)):
        raise ValueError(f"{where}invalid fallback 'lr': {flr!r} (must be None or finite and >= 0)")
    betas = fb.get("betas", FALLBACK_DEFAULTS["betas"])
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_real(b) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{where}invalid fallback 'betas': {betas!r} (must be two numbers in [0, 1))")
    eps = fb.get("eps", FALLBACK_DEFAULTS["eps"])
    if not _real(eps) or not eps >= 0.0:
        raise ValueError(f"{where}invalid fallback 'eps': {eps!r} (must be >= 0)")
    return FallbackSpec(fb["name"], None if flr is None else float(flr), (float(betas[0]), float(betas[1])), float(eps))


def check_optimizer_options(
    nonfinite: str, stabilize: int | None, compile: bool | dict[str, Any] = False, capturable: bool = False
) -> None:
    if not isinstance(capturable, bool):
        raise ValueError(f"capturable must be a bool, got {capturable!r}")
    if isinstance(compile, dict):
        if "fullgraph" in compile:
            raise ValueError(
                "compile={...}: 'fullgraph' is always True (the group step has no graph breaks); leave it out"
            )
        if not all(isinstance(k, str) for k in compile):
            raise ValueError(f"compile must be a bool or a dict of torch.compile keyword arguments, got {compile!r}")
    elif not isinstance(compile, bool):
        raise ValueError(
            f"compile must be a bool or a dict of torch.compile keyword arguments (e.g. {{'backend': 'aot_eager'}}), "
            f"got {compile!r}"
        )
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    if stabilize is not None and (isinstance(stabilize, bool) or not isinstance(stabilize, int) or stabilize < 1):
        raise ValueError(f"stabilize must be None or a positive int, got {stabilize!r}")


def prepare_pairs(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[torch.Tensor, int]]:
    """Validate ``pairs``; returns the list and ``factor -> pair index``."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    index: dict[torch.Tensor, int] = {}
    if pairs is None:
        return out, index
    if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(t, torch.Tensor) for t in pairs):
        raise ValueError("pairs must be a list of (B, A) tuples, e.g. pairs=[(B, A)], not a single pair")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
            raise ValueError(f"pairs[{i}] must be a (B, A) tuple of two tensors, got {pair!r}")
        b, a = pair
        if b is a:
            raise ValueError(f"pairs[{i}]: B and A are the same tensor")
        if b.ndim < 2 or a.ndim != b.ndim or b.shape[:-2] != a.shape[:-2] or b.shape[-1] != a.shape[-2]:
            raise ValueError(
                f"pairs[{i}]: shapes do not chain: B {tuple(b.shape)}, A {tuple(a.shape)}; expected "
                "B (..., m, r) and A (..., r, n) with the same leading dims"
            )
        m, r, n = b.shape[-2], b.shape[-1], a.shape[-1]
        if r == 0:
            raise ValueError(
                f"pairs[{i}]: rank r = 0 (B {tuple(b.shape)}, A {tuple(a.shape)}): a factor pair needs r >= 1; "
                "leave a rank-0 adapter out of pairs (it has nothing to train)"
            )
        if r > min(m, n):
            raise ValueError(
                f"pairs[{i}]: rank r = {r} exceeds min(m, n) = {min(m, n)} (B {tuple(b.shape)}, "
                f"A {tuple(a.shape)}): such factors cannot both have full rank"
            )
        if b.dtype != a.dtype or b.device != a.device:
            raise ValueError(
                f"pairs[{i}]: B and A must share dtype and device, got {b.dtype}/{b.device} and {a.dtype}/{a.device}"
            )
        for name, t in (("B", b), ("A", a)):
            if not t.is_floating_point():
                raise ValueError(f"pairs[{i}]: {name} must be floating point, got {t.dtype}")
            manifold = getattr(t, "manifold", None)
            if not _dispatch.is_euclidean(manifold):
                raise ValueError(
                    f"pairs[{i}]: {name} is a ManifoldParameter on {manifold!r}; pair factors must be plain tensors"
                )
            if t in index:
                raise ValueError(f"pairs[{i}]: {name} already belongs to pairs[{index[t]}]")
            index[t] = i
        out.append((b, a))
    return out, index


def check_family_options(opts: dict[str, Any], nrm: Any, where: str = "") -> None:
    """``error_feedback`` and ``input_transform``: their values, and the norms they need."""
    ef = opts.get("error_feedback", False)
    if not isinstance(ef, bool):
        raise ValueError(f"{where}error_feedback must be a bool, got {ef!r}")
    if ef and nrm.name not in ("kyfan", "nuclear"):
        raise ValueError(
            f"{where}error_feedback=True needs a low-rank LMO, norm=('kyfan', k): with norm={opts['norm']!r} the step "
            "leaves nothing of the momentum out, so there is no error to feed back"
        )
    if ef and opts["momentum"] == 0:
        raise ValueError(f"{where}error_feedback=True keeps the error in the momentum buffer: it needs momentum > 0")
    if ef and opts["pair_momentum"] == "ambient":
        raise ValueError(
            f"{where}error_feedback=True is defined for the invariant pair step (pair_momentum='factor'), not for the "
            "ambient LoRA mode"
        )
    try:
        transform = resolve_input_transform(opts.get("input_transform"))
    except ValueError as err:
        raise ValueError(f"{where}{err}") from err
    if transform is not None and ef:
        raise ValueError(
            f"{where}input_transform={opts['input_transform']!r} with error_feedback=True: error feedback needs the "
            "LMO of the momentum itself; use one or the other"
        )
