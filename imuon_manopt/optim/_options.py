"""Options of :class:`~imuon_manopt.optim.IMuon`: defaults, folding of the compact forms, validation, pairs.

A param group stores its options under fixed keys (the ``state_dict()`` layout): ``lr momentum nesterov
weight_decay norm polar ns_steps ns_dtype oversample power_iters adjust_lr_fn pair_momentum fallback fallback_lr betas
eps use_imuon error_feedback input_transform``. ``norm`` is stored as given, a name or a ``(name, parameter)`` pair
(:func:`imuon_manopt.lmo.resolve_norm`). The constructor and param-group dicts also take the compact forms

- ``polar={"method": "newton_schulz", "steps": 5, "dtype": torch.bfloat16}`` (and ``"oversample"``,
  ``"power_iters"`` for ``"randomized"``) for ``polar``, ``ns_steps``, ``ns_dtype``, ``oversample``, ``power_iters``;
- ``fallback={"name": "adamw", "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}`` for ``fallback``,
  ``fallback_lr``, ``betas``, ``eps``;

which :func:`fold` spreads onto the stored keys. The old constructor keywords (``ns_steps``, ``ns_dtype``,
``pair_momentum``, ``fallback_lr``, ``betas``, ``eps``, ``use_imuon``) keep working with a ``DeprecationWarning``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..lmo import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, PolarSpec, resolve_norm, resolve_polar
from ..transforms import resolve_input_transform
from . import _dispatch

POLARS = ("svd", "newton_schulz", "randomized")
ADJUST_NAMES = ("original", "match_rms_adamw")
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
    ns_steps=5,
    ns_dtype=None,
    oversample=DEFAULT_OVERSAMPLE,
    power_iters=DEFAULT_POWER_ITERS,
    adjust_lr_fn=None,
    pair_momentum="factor",
    fallback="adamw",
    fallback_lr=None,
    betas=(0.9, 0.999),
    eps=1e-8,
    use_imuon=True,
    error_feedback=False,
    input_transform=None,
)

#: Old constructor keywords -> what replaces them.
DEPRECATED_KEYWORDS = {
    "ns_steps": "polar={'method': 'newton_schulz', 'steps': ...}",
    "ns_dtype": "polar={'method': 'newton_schulz', 'dtype': ...}",
    "pair_momentum": "a param group option: {'params': ..., 'pair_momentum': 'ambient'}",
    "fallback_lr": "fallback={'name': ..., 'lr': ...}",
    "betas": "fallback={'name': 'adamw', 'betas': ...}",
    "eps": "fallback={'name': 'adamw', 'eps': ...}",
    "use_imuon": "a param group option: {'params': ..., 'use_imuon': False}",
}


def take_deprecated(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The old keywords among ``kwargs``, each with a ``DeprecationWarning``; a ``TypeError`` for unknown ones."""
    unknown = sorted(set(kwargs) - set(DEPRECATED_KEYWORDS))
    if unknown:
        raise TypeError(f"IMuon got unexpected keyword argument(s) {unknown}")
    for key in kwargs:
        warnings.warn(
            f"IMuon({key}=...) is deprecated; use {DEPRECATED_KEYWORDS[key]}", DeprecationWarning, stacklevel=3
        )
    return dict(kwargs)


def fold(opts: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Spread the compact forms of ``norm``, ``polar`` and ``fallback`` onto the stored keys (in a copy)."""
    opts = dict(opts)
    norm = opts.get("norm")
    if isinstance(norm, list):
        opts["norm"] = tuple(norm)  # hashable, as the grouping needs
    transform = opts.get("input_transform")
    if isinstance(transform, list):
        opts["input_transform"] = tuple(transform)
    polar = opts.get("polar")
    if isinstance(polar, dict):
        keys = {"method", "steps", "dtype", "oversample", "power_iters"}
        extra = set(polar) - keys
        if extra or "method" not in polar:
            raise ValueError(
                f"{where}invalid polar={polar!r}: expected a name or a dict with 'method' and optionally 'steps', "
                "'dtype', 'oversample', 'power_iters'"
            )
        opts["polar"] = polar["method"]
        for src, dst in (("steps", "ns_steps"), ("dtype", "ns_dtype"), ("oversample", "oversample")):
            if src in polar:
                opts[dst] = polar[src]
        if "power_iters" in polar:
            opts["power_iters"] = polar["power_iters"]
    fallback = opts.get("fallback")
    if isinstance(fallback, dict):
        extra = set(fallback) - {"name", "lr", "betas", "eps"}
        if extra or "name" not in fallback:
            raise ValueError(
                f"{where}invalid fallback={fallback!r}: expected 'adamw', 'sgd' or a dict with 'name' and "
                "optionally 'lr', 'betas', 'eps'"
            )
        opts["fallback"] = fallback["name"]
        for src, dst in (("lr", "fallback_lr"), ("betas", "betas"), ("eps", "eps")):
            if src in fallback:
                opts[dst] = fallback[src]
    if "betas" in opts and isinstance(opts["betas"], list):
        opts["betas"] = tuple(opts["betas"])
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
    if opts["polar"] not in POLARS:
        raise ValueError(f"{where}unknown polar={opts['polar']!r}; expected one of {POLARS}")
    for key in ("oversample", "power_iters"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}invalid polar {key!r}: {v!r} (must be an int >= 0)")
    steps = opts["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
        raise ValueError(f"{where}invalid ns_steps: {steps!r} (must be an int in [1, 100))")
    nsd = opts["ns_dtype"]
    if nsd is not None and not (isinstance(nsd, torch.dtype) and nsd.is_floating_point):
        raise ValueError(
            f"{where}invalid ns_dtype: {nsd!r} (must be None or a floating torch dtype such as torch.bfloat16)"
        )
    fn = opts["adjust_lr_fn"]
    if fn is not None and not callable(fn) and fn not in ADJUST_NAMES:
        raise ValueError(
            f"{where}unknown adjust_lr_fn={fn!r}; expected None, one of {ADJUST_NAMES} or a callable (lr, (a, b)) -> lr"
        )
    if opts["pair_momentum"] not in PAIR_MOMENTUM:
        raise ValueError(f"{where}unknown pair_momentum={opts['pair_momentum']!r}; expected one of {PAIR_MOMENTUM}")
    if opts["fallback"] not in FALLBACKS:
        raise ValueError(f"{where}unknown fallback={opts['fallback']!r}; expected one of {FALLBACKS}")
    flr = opts["fallback_lr"]
    if flr is not None and (not _real(flr) or not flr >= 0.0 or not math.isfinite(flr)):
        raise ValueError(f"{where}invalid fallback_lr: {flr!r} (must be None or finite and >= 0)")
    betas = opts["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_real(b) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{where}invalid betas: {betas!r} (must be two numbers in [0, 1))")
    if not _real(opts["eps"]) or not opts["eps"] >= 0.0:
        raise ValueError(f"{where}invalid eps: {opts['eps']!r} (must be >= 0)")
    if not isinstance(opts["use_imuon"], bool):
        raise ValueError(f"{where}use_imuon must be a bool, got {opts['use_imuon']!r}")
    check_family_options(opts, nrm, where)


def polar_spec(group: dict[str, Any]) -> PolarSpec:
    """The group's LMO solver as the core's :class:`~imuon_manopt.lmo.PolarSpec`."""
    ns = group["polar"] == "newton_schulz"
    return resolve_polar(
        {
            "method": group["polar"],
            "steps": group["ns_steps"] if ns else None,
            "dtype": group["ns_dtype"] if group["polar"] != "svd" else None,
            "oversample": group["oversample"],
            "power_iters": group["power_iters"],
        }
    )


def check_optimizer_options(nonfinite: str, stabilize: int | None) -> None:
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
            if not _dispatch.is_euclidean(getattr(t, "manifold", None)):
                raise ValueError(
                    f"pairs[{i}]: {name} is a ManifoldParameter on {t.manifold!r}; pair factors must be plain tensors"
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
