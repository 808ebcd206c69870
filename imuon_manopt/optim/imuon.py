"""iMuon as a ``torch.optim`` optimizer for plain tensors, geoopt manifold parameters and LoRA
factor pairs.

:class:`IMuon` is a geoopt ``OptimMixin`` + ``torch.optim.Optimizer``. Each parameter is routed by
what it is:

- plain tensor (or geoopt ``Euclidean``) with ``ndim >= 2``: Muon, ``p - lr * lmo(E~)``; tensors
  with ``ndim > 2`` (convolutions) are viewed as ``(shape[0], -1)``;
- plain tensor with ``ndim < 2`` (biases, norms, scalars): the group's ``fallback`` (AdamW by
  default, or SGD);
- ``ManifoldParameter`` on a supported manifold: ``retr(p, -lr * xi)`` with ``xi`` the iMuon
  direction of the manifold's metric (spec §2); a batch ``(..., n, p)`` is one core call;
- a ``(B, A)`` pair listed in ``pairs``: ``B - lr * xi_B``, ``A - lr * xi_A``, the invariant
  fixed-rank step, with ``lr`` backtracked if a factor would lose rank.

Momentum (spec §3), with ``beta = momentum``:

- plain matrices: Nesterov on the Euclidean gradient, ``buf = beta * buf + E``, ``E~ = E + beta *
  buf`` (``E~ = buf`` without Nesterov);
- manifold parameters: the buffer is a tangent vector, the running sum of Riemannian gradients
  ``egrad2rgrad(x, E)``, carried to the new point by the manifold's vector transport
  (``retr_transp``); the Nesterov combination is turned back into a Euclidean covector by the metric
  (``G_x``) before the iMuon template;
- pairs: buffers on the factor gradients ``E_B``, ``E_A`` (GL(r)-equivariant).
  ``pair_momentum="ambient"`` selects the reference LoRA mode of spec §3 (ambient momentum ``E~_B A
  + B E~_A``, only O(r)-invariant).

The spectral LMO is scale invariant, so this sum-form momentum gives the same directions as
``torch.optim.Muon``'s EMA form (whose combined update is ``(1 - beta)`` times this one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from geoopt.optim.mixin import OptimMixin

from ..direction import intrinsic_direction
from ..geometry import Euclidean, FixedRank, MetricOperator
from ..geometry.base import Blocks
from ..lmo import resolve_norm
from . import _dispatch

__all__ = ["IMuon"]

AdjustLrFn = Callable[[float, tuple[int, int]], float]

_POLARS = ("svd", "newton_schulz")
_ADJUST_NAMES = ("original", "match_rms_adamw")
_FALLBACKS = ("adamw", "sgd")
_PAIR_MOMENTUM = ("factor", "ambient")
_NONFINITE = ("raise", "skip")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
#: Halvings of a pair's step before the pair stays put for this step (2^-12 ~ 2.4e-4 of the step).
_MAX_BACKTRACKS = 12
#: Feasibility tolerances of the first-step manifold check, by parameter dtype.
_CHECK_TOL = {torch.float64: 1e-5, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
_EUCLIDEAN = Euclidean()
_FIXED_RANK = FixedRank()


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the update is computed in: at least float32."""
    return torch.float32 if t.dtype in _LOW_PRECISION else t.dtype


def _adjusted_lr(lr: float, fn: str | AdjustLrFn | None, shape: tuple[int, int]) -> float:
    """Shape-based learning-rate scaling (``torch.optim.Muon``'s conventions, or a callable)."""
    if fn is None:
        return lr
    a, b = shape
    if fn == "original":
        return lr * math.sqrt(max(1.0, a / b))
    if fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(a, b))
    return float(fn(lr, (a, b)))


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Are all entries of all ``tensors`` finite? One host sync per (device, dtype).

    The max-norm propagates NaN and Inf and cannot overflow, so one fused ``_foreach_norm`` per
    (device, dtype) bucket checks a whole list; on the CPU, where the fused infinity norm is slow,
    ``abs().amax()`` per tensor does the same.
    """
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            buckets.setdefault((t.device, t.dtype), []).append(t)
    for ts in buckets.values():
        if ts[0].device.type == "cpu":
            norms = [t.abs().amax() for t in ts]
        else:
            norms = torch._foreach_norm(ts, math.inf)
        top = norms[0] if len(norms) == 1 else torch.stack(norms).max()  # max propagates NaN
        if not math.isfinite(float(top)):
            return False
    return True


class _AmbientLoRA(MetricOperator):
    """The reference LoRA "ambient momentum" step (spec §3), only O(r)-invariant.

    With ``B = Q_B R_B`` and ``A^T = Q_A R_A`` and the (never formed) ambient matrix ``M = E_B A + B
    E_A``: ``H_B = M Q_A = E_B R_A^T + B (E_A Q_A)``, ``H_A = Q_B^T M = (Q_B^T E_B) A + R_B E_A``,
    and ``xi_B = lmo(H_B) R_A^{-T}``, ``xi_A = R_B^{-1} lmo(H_A)``.
    """

    structure = ("general", "general")

    def at(self, x):
        b, a = x
        _FIXED_RANK.at(x)  # shape and rank checks, with the library's error messages
        q_b, r_b = torch.linalg.qr(b)
        q_a, r_a = torch.linalg.qr(a.mT)
        return b, a, q_b, r_b, q_a, r_a

    def project(self, state, egrad) -> Blocks:
        b, a, q_b, r_b, q_a, r_a = state
        e_b, e_a = egrad
        return e_b @ r_a.mT + b @ (e_a @ q_a), (q_b.mT @ e_b) @ a + r_b @ e_a

    def whiten(self, state, blocks: Blocks) -> Blocks:
        return blocks

    def unwhiten(self, state, blocks: Blocks) -> Blocks:
        *_, r_b, _, r_a = state
        z_b, z_a = blocks
        xi_b = torch.linalg.solve_triangular(r_a.mT, z_b, upper=False, left=False)
        xi_a = torch.linalg.solve_triangular(r_b, z_a, upper=True)
        return xi_b, xi_a

    def tangent(self, state, blocks: Blocks):
        return tuple(blocks)


_AMBIENT_LORA = _AmbientLoRA()


@dataclass
class _Plan:
    """Everything one ``step`` would write: new parameter values and new state entries."""

    params: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    state: list[tuple[dict, str, torch.Tensor]] = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        return [v for _, v in self.params] + [v for *_, v in self.state if v.is_floating_point()]


class IMuon(OptimMixin, torch.optim.Optimizer):
    r"""Intrinsic Muon: spectral steepest descent in each parameter's own geometry
    (arXiv:2605.09238).

    One step per parameter (see the module docstring for the routing and the momentum rules):
    ``x <- R_x(-lr * xi)``, where ``xi = G^{-1/2} lmo(G^{-1/2} P_x(E~))`` is the iMuon direction of
    the parameter's manifold and metric for the (momentum-combined) Euclidean gradient ``E~`` (spec
    §1–§3). The manifold is read from ``ManifoldParameter.manifold`` and dispatched on its concrete
    class: ``geoopt.EuclideanStiefel``, ``geoopt.CanonicalStiefel`` (what ``geoopt.Stiefel()``
    returns; its canonical metric changes the direction), ``geoopt.SymmetricPositiveDefinite``
    (affine-invariant), ``geoopt.Sphere`` (row-wise) and ``imuon_manopt.manifolds.Grassmann``; more
    via :func:`~imuon_manopt.optim.register_manifold`. The retraction and vector transport are the
    manifold's own (``retr`` / ``retr_transp``).

    Args:
        params: parameters or param-group dicts (every option below except ``pairs`` and
            ``nonfinite`` can be set per group).
        lr: learning rate (step length in the chosen norm; ``tau`` of the LMO is 1).
        momentum: ``beta`` in ``[0, 1)`` (default 0.95); 0 disables the buffers.
        nesterov: Nesterov combination ``E~ = E + beta * buf`` (default) instead of ``E~ = buf``.
        weight_decay: decoupled decay ``p <- (1 - lr * wd) p`` (unadjusted ``lr``) for plain tensors
            (the iMuon matrices and the fallback) and for pairs (applied to the product: both
            factors are scaled by ``sqrt(1 - lr * wd)``, which keeps the rank and the gauge
            invariance). A group with ``weight_decay > 0`` may not hold manifold parameters: decay
            leaves the manifold, so this raises a ``ValueError`` (put them in a group with
            ``weight_decay=0``).
        norm: the LMO's norm, ``"spectral"`` (default), ``"frobenius"``, ``"nuclear"`` or
            ``"schatten"``.
        p: the Schatten exponent for ``norm="schatten"``.
        polar: orthogonalizer, ``"newton_schulz"`` (default: fast on accelerators, approximate polar
            factor, as in Muon) or ``"svd"`` (exact and rank-aware; eigh for SPD). The Newton–Schulz
            schedule is the core's (:func:`imuon_manopt.lmo.polar`).
        ns_steps: Newton–Schulz iterations (default 5).
        ns_dtype: working dtype of the Newton–Schulz products, e.g. ``torch.bfloat16`` on GPUs
            with fast bfloat16 matmuls (what ``torch.optim.Muon`` always uses). Default ``None``:
            the update's working dtype (at least float32), which is also the right choice on CPUs
            without native bfloat16 arithmetic. The whitening, projection and retraction stay in
            the working dtype; only the orthogonalization is rounded to ``ns_dtype``. Ignored with
            ``polar="svd"``.
        adjust_lr_fn: shape-based lr scaling, off by default: ``"original"`` (``lr * sqrt(max(1, a /
            b))``), ``"match_rms_adamw"`` (``lr * 0.2 * sqrt(max(a, b))``, which lets one lr serve
            iMuon and the AdamW fallback), or a callable ``(lr, (a, b)) -> lr``. ``(a, b)`` is the
            matrix shape the step lives in: the ``(shape[0], -1)`` view for plain tensors, the
            trailing two dims for manifold parameters (``(n, 1)`` for a sphere), ``(m, n)`` of the
            product for a pair. A callable makes ``state_dict()`` picklable only if the callable is.
        pairs: fixed-rank factor pairs ``[(B, A), ...]`` with ``X = B @ A``, ``B`` (..., m, r),
            ``A`` (..., r, n), both plain tensors of the same group in ``params``. Pairs are
            structure, not state: pass the same pairs when rebuilding the optimizer before
            ``load_state_dict``. See :func:`lora_pairs`.
        pair_momentum: ``"factor"`` (default; buffers on ``E_B``, ``E_A``, GL(r)-invariant) or
            ``"ambient"`` (the reference LoRA mode, only O(r)-invariant).
        fallback: update for plain tensors with ``ndim < 2``: ``"adamw"`` (default; ``betas``,
            ``eps``, decoupled ``weight_decay``) or ``"sgd"`` (``momentum`` and ``nesterov`` of the
            group).
        fallback_lr: the fallback's learning rate at the group's initial ``lr`` (default: the
            group's ``lr``). It follows later changes of ``lr`` (schedulers) proportionally:
            ``fallback_lr * lr / lr_at_init``.
        betas, eps: the AdamW fallback's moment coefficients and denominator offset.
        use_imuon: group option; ``False`` sends every plain tensor of the group to the fallback
            (e.g. embeddings and output heads, as is common with Muon). Manifold parameters and
            pairs cannot use the fallback.
        nonfinite: a non-finite gradient (or update) ``"raise"`` s ``FloatingPointError`` (default)
            or ``"skip"`` s the step; either way no parameter or state entry is changed (all updates
            are computed into temporaries and checked before anything is written).
            ``last_step_skipped`` tells which.
        stabilize: geoopt's option: every ``stabilize`` steps, project manifold parameters back onto
            their manifold (``projx``) and momentum buffers onto the tangent space.

    Notes:
        - The update is computed in at least float32 (bfloat16/float16 parameters are upcast) and
          written back in the parameter's dtype; momentum buffers are stored in the parameter's
          dtype.
        - Parameters whose ``grad`` is ``None`` are skipped (a pair is skipped when both factors
          have none; a single missing factor gradient counts as zero).
        - A manifold parameter is checked to lie on its manifold (``check_point_on_manifold``) on
          its first step.
        - A pair with a rank-deficient factor (PEFT's ``B = 0`` start) raises a ``ValueError``; use
          :func:`full_rank_lora_init_` first. A pair step is halved (per matrix of a batch, at most
          12 times, then not taken) while the product's ``s_min / s_max`` (gauge-invariant, from
          the r x r core of the factors' QR) would fall below ``sqrt(eps)`` of the working dtype
          (or below its current value, if already lower).
        - ``CanonicalStiefel`` points get one Newton–Schulz polishing step after the Cayley
          retraction, which removes the orthonormality error rounding accumulates over long runs.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        norm: str = "spectral",
        p: float | None = None,
        polar: str = "newton_schulz",
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = None,
        adjust_lr_fn: str | AdjustLrFn | None = None,
        pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
        pair_momentum: str = "factor",
        fallback: str = "adamw",
        fallback_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        use_imuon: bool = True,
        nonfinite: str = "raise",
        stabilize: int | None = None,
    ) -> None:
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if stabilize is not None and (not isinstance(stabilize, int) or stabilize < 1):
            raise ValueError(f"stabilize must be None or a positive int, got {stabilize!r}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            norm=norm,
            p=p,
            polar=polar,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            adjust_lr_fn=adjust_lr_fn,
            pair_momentum=pair_momentum,
            fallback=fallback,
            fallback_lr=fallback_lr,
            betas=tuple(betas),
            eps=eps,
            use_imuon=use_imuon,
        )
        self._check_options(defaults, where="")
        self.nonfinite = nonfinite
        self.last_step_skipped = False
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pair_index: dict[torch.Tensor, int] = {}
        self._prepare_pairs(pairs)
        self._rules: dict[torch.Tensor, tuple[_dispatch.ManifoldRule, MetricOperator]] = {}
        super().__init__(params, defaults, stabilize=stabilize)
        self._check_pairs_membership()

    # ------------------------------------------------------------------ validation

    @staticmethod
    def _check_options(opts: dict[str, Any], where: str) -> None:
        """``ValueError`` naming the bad value for every option of a param group."""
        lr = opts["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(
                    f"{where}lr must be a float or a 1-element tensor, got shape {tuple(lr.shape)}"
                )
            lr = float(lr)
        if not isinstance(lr, (int, float)) or not lr >= 0.0 or not math.isfinite(lr):
            raise ValueError(
                f"{where}invalid learning rate: lr={opts['lr']!r} (must be finite and >= 0)"
            )
        mom = opts["momentum"]
        if not isinstance(mom, (int, float)) or not 0.0 <= mom < 1.0:
            raise ValueError(f"{where}invalid momentum: {mom!r} (must be in [0, 1))")
        wd = opts["weight_decay"]
        if not isinstance(wd, (int, float)) or not wd >= 0.0 or not math.isfinite(wd):
            raise ValueError(f"{where}invalid weight_decay: {wd!r} (must be finite and >= 0)")
        if not isinstance(opts["nesterov"], bool):
            raise ValueError(f"{where}nesterov must be a bool, got {opts['nesterov']!r}")
        try:
            resolve_norm(opts["norm"], opts["p"])
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{where}invalid norm={opts['norm']!r} with p={opts['p']!r}: {err}"
            ) from err
        if opts["polar"] not in _POLARS:
            raise ValueError(f"{where}unknown polar={opts['polar']!r}; expected one of {_POLARS}")
        steps = opts["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
            raise ValueError(f"{where}invalid ns_steps: {steps!r} (must be an int in [1, 100))")
        nsd = opts["ns_dtype"]
        if nsd is not None and not (isinstance(nsd, torch.dtype) and nsd.is_floating_point):
            raise ValueError(
                f"{where}invalid ns_dtype: {nsd!r} (must be None or a floating torch dtype such as "
                "torch.bfloat16)"
            )
        fn = opts["adjust_lr_fn"]
        if fn is not None and not callable(fn) and fn not in _ADJUST_NAMES:
            raise ValueError(
                f"{where}unknown adjust_lr_fn={fn!r}; expected None, one of {_ADJUST_NAMES} or a "
                "callable "
                "(lr, (a, b)) -> lr"
            )
        if opts["pair_momentum"] not in _PAIR_MOMENTUM:
            raise ValueError(
                f"{where}unknown pair_momentum={opts['pair_momentum']!r}; expected one of "
                f"{_PAIR_MOMENTUM}"
            )
        if opts["fallback"] not in _FALLBACKS:
            raise ValueError(
                f"{where}unknown fallback={opts['fallback']!r}; expected one of {_FALLBACKS}"
            )
        flr = opts["fallback_lr"]
        if flr is not None and (
            not isinstance(flr, (int, float)) or not flr >= 0.0 or not math.isfinite(flr)
        ):
            raise ValueError(
                f"{where}invalid fallback_lr: {flr!r} (must be None or finite and >= 0)"
            )
        betas = opts["betas"]
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
        ):
            raise ValueError(f"{where}invalid betas: {betas!r} (must be two numbers in [0, 1))")
        if not isinstance(opts["eps"], (int, float)) or not opts["eps"] >= 0.0:
            raise ValueError(f"{where}invalid eps: {opts['eps']!r} (must be >= 0)")
        if not isinstance(opts["use_imuon"], bool):
            raise ValueError(f"{where}use_imuon must be a bool, got {opts['use_imuon']!r}")

    def _prepare_pairs(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        if pairs is None:
            return
        if (
            isinstance(pairs, tuple)
            and len(pairs) == 2
            and all(isinstance(t, torch.Tensor) for t in pairs)
        ):
            raise ValueError(
                "pairs must be a list of (B, A) tuples, e.g. pairs=[(B, A)], not a single pair"
            )
        for i, pair in enumerate(pairs):
            if not (
                isinstance(pair, (tuple, list))
                and len(pair) == 2
                and all(isinstance(t, torch.Tensor) for t in pair)
            ):
                raise ValueError(f"pairs[{i}] must be a (B, A) tuple of two tensors, got {pair!r}")
            b, a = pair
            if b is a:
                raise ValueError(f"pairs[{i}]: B and A are the same tensor")
            if (
                b.ndim < 2
                or a.ndim != b.ndim
                or b.shape[:-2] != a.shape[:-2]
                or b.shape[-1] != a.shape[-2]
            ):
                raise ValueError(
                    f"pairs[{i}]: shapes do not chain: B {tuple(b.shape)}, A {tuple(a.shape)}; "
                    "expected "
                    "B (..., m, r) and A (..., r, n) with the same leading dims"
                )
            m, r, n = b.shape[-2], b.shape[-1], a.shape[-1]
            if r > min(m, n):
                raise ValueError(
                    f"pairs[{i}]: rank r = {r} exceeds min(m, n) = {min(m, n)} (B "
                    f"{tuple(b.shape)}, "
                    f"A {tuple(a.shape)}): such factors cannot both have full rank"
                )
            if b.dtype != a.dtype or b.device != a.device:
                raise ValueError(
                    f"pairs[{i}]: B and A must share dtype and device, got {b.dtype}/{b.device} "
                    "and "
                    f"{a.dtype}/{a.device}"
                )
            for name, t in (("B", b), ("A", a)):
                if not t.is_floating_point():
                    raise ValueError(f"pairs[{i}]: {name} must be floating point, got {t.dtype}")
                if not _dispatch.is_euclidean(getattr(t, "manifold", None)):
                    raise ValueError(
                        f"pairs[{i}]: {name} is a ManifoldParameter on {t.manifold!r}; pair "
                        "factors must be "
                        "plain tensors"
                    )
                if t in self._pair_index:
                    raise ValueError(
                        f"pairs[{i}]: {name} already belongs to pairs[{self._pair_index[t]}]"
                    )
                self._pair_index[t] = i
            self._pairs.append((b, a))

    def _check_pairs_membership(self) -> None:
        group_of = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        for i, (b, a) in enumerate(self._pairs):
            for name, t in (("B", b), ("A", a)):
                if t not in group_of:
                    raise ValueError(
                        f"pairs[{i}]: {name} (shape {tuple(t.shape)}) is not among the optimizer's "
                        "params; "
                        "pass both factors in params as well"
                    )
            if group_of[b] != group_of[a]:
                raise ValueError(
                    f"pairs[{i}]: B is in param group {group_of[b]} and A in group {group_of[a]}; "
                    "a pair's "
                    "factors must share one group (its options apply to the pair)"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch semantics), validating its options and its parameters' manifolds."""
        gi = len(getattr(self, "param_groups", []))
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError(
                "optimizer parameters must be an ordered collection (a list), not a set"
            )
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        opts = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        if "betas" in opts:
            opts["betas"] = tuple(opts["betas"])
        self._check_options(opts, where=f"param group {gi}: ")
        for pi, p in enumerate(params):
            where = f"param group {gi}, parameter {pi} (shape {tuple(p.shape)})"
            if not isinstance(p, torch.Tensor) or not p.is_floating_point() or p.is_complex():
                raise TypeError(
                    f"{where}: IMuon needs real floating-point tensors, got "
                    f"{getattr(p, 'dtype', type(p).__name__)}"
                )
            manifold = getattr(p, "manifold", None)
            if _dispatch.is_euclidean(manifold):
                continue
            if p in self._pair_index:
                raise ValueError(
                    f"{where} is a pair factor and a ManifoldParameter on {manifold!r}"
                )
            self._rules[p] = _dispatch.lookup(manifold)
            if opts["weight_decay"] > 0:
                raise ValueError(
                    f"{where} lies on {manifold!r} and its group has "
                    f"weight_decay={opts['weight_decay']}: "
                    "decoupled decay would leave the manifold. Put manifold parameters in a param "
                    "group with "
                    "weight_decay=0."
                )
            if not opts["use_imuon"]:
                raise ValueError(
                    f"{where} lies on {manifold!r}: use_imuon=False (the Euclidean fallback) "
                    "would leave the manifold"
                )
        param_group = dict(param_group)
        param_group["params"] = params
        param_group.setdefault("lr_at_init", float(opts["lr"]))
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ stepping

    def _direction(
        self, geometry: MetricOperator, x: Any, egrad: Any, group: dict[str, Any]
    ) -> Any:
        polar = group["polar"]
        return intrinsic_direction(
            geometry,
            x,
            egrad,
            group["norm"],
            p=group["p"],
            polar=polar,
            steps=group["ns_steps"] if polar == "newton_schulz" else None,
            dtype=group.get("ns_dtype") if polar == "newton_schulz" else None,
            gap=False,
        ).xi

    @staticmethod
    def _nesterov(
        group: dict[str, Any], state: dict, e: torch.Tensor, key: str = "momentum_buffer"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``buf = beta * buf + e``; returns ``(e~, new buf)`` (``(e, None)`` without momentum)."""
        beta = group["momentum"]
        if beta == 0:
            return e, None
        old = state.get(key)
        buf = e.clone() if old is None else torch.add(e, old.to(e.dtype), alpha=beta)
        return (torch.add(e, buf, alpha=beta) if group["nesterov"] else buf), buf

    def _euclidean_update(self, group, p: torch.Tensor, g: torch.Tensor, plan: _Plan) -> None:
        state = self.state[p]
        wdt = _work_dtype(p)
        x, e = p.detach().to(wdt), g.to(wdt)
        e, buf = self._nesterov(group, state, e)
        if buf is not None:
            plan.state.append((state, "momentum_buffer", buf.to(p.dtype)))
        shape2d = (x.shape[0], math.prod(x.shape[1:]))
        if x.ndim == 2:
            xi = self._direction(_EUCLIDEAN, x, e, group)
        else:
            xi = self._direction(_EUCLIDEAN, x.reshape(shape2d), e.reshape(shape2d), group).reshape(
                x.shape
            )
        lr = float(group["lr"])
        step_lr = _adjusted_lr(lr, group["adjust_lr_fn"], shape2d)
        wd = group["weight_decay"]
        base = x * (1.0 - lr * wd) if wd > 0 else x
        plan.params.append((p, torch.add(base, xi, alpha=-step_lr)))

    def _manifold_update(self, group, p: torch.Tensor, g: torch.Tensor, plan: _Plan) -> None:
        state = self.state[p]
        rule, geometry = self._rules[p]
        manifold = p.manifold
        wdt = _work_dtype(p)
        x, e = p.detach().to(wdt), g.to(wdt)
        if "step" not in state:
            tol = _CHECK_TOL.get(p.dtype, 1e-5)
            ok, reason = manifold.check_point_on_manifold(x, explain=True, atol=tol, rtol=tol)
            if not ok:
                raise ValueError(
                    f"parameter of shape {tuple(p.shape)} is not on its manifold {manifold!r}: "
                    f"{reason}. "
                    "Initialize it on the manifold (e.g. manifold.random(...) or "
                    "manifold.projx(...))"
                )
        if group["momentum"] > 0:
            r = manifold.egrad2rgrad(x, e)
            r, buf = self._nesterov(group, state, r)
            e = rule.flat(x, r)
        else:
            buf = None
        xi = self._direction(geometry, x, e, group)
        shape2d = (x.shape[-2], x.shape[-1]) if x.ndim >= 2 else (x.shape[-1], 1)
        step_lr = _adjusted_lr(float(group["lr"]), group["adjust_lr_fn"], shape2d)
        if buf is None:
            new_x = manifold.retr(x, -step_lr * xi)
        else:
            new_x, new_buf = manifold.retr_transp(x, -step_lr * xi, buf)
            plan.state.append((state, "momentum_buffer", new_buf.to(p.dtype)))
        if rule.polish is not None:
            new_x = rule.polish(new_x)
        plan.params.append((p, new_x))

    @staticmethod
    def _min_ratio(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``s_min / s_max`` of the product ``B A`` (..., m, n) of a pair, from its r x r core
        ``R_B R_A^T`` (``B = Q_B R_B``, ``A^T = Q_A R_A``): independent of the gauge
        ``(B M, M^-1 A)``, never forms ``m x n``."""
        r_b = torch.linalg.qr(b, mode="r")[1]
        r_a = torch.linalg.qr(a.mT, mode="r")[1]
        s = torch.linalg.svdvals(r_b @ r_a.mT)
        top = s[..., 0]
        return torch.where(
            top > 0,
            s[..., -1] / torch.where(top > 0, top, torch.ones_like(top)),
            torch.zeros_like(top),
        )

    def _pair_update(
        self,
        group,
        b: torch.Tensor,
        a: torch.Tensor,
        g_b: torch.Tensor | None,
        g_a: torch.Tensor | None,
        plan: _Plan,
        index: int,
    ) -> None:
        wdt = _work_dtype(b)
        x_b, x_a = b.detach().to(wdt), a.detach().to(wdt)
        e_b = torch.zeros_like(x_b) if g_b is None else g_b.to(wdt)
        e_a = torch.zeros_like(x_a) if g_a is None else g_a.to(wdt)
        s_b, s_a = self.state[b], self.state[a]
        e_b, buf_b = self._nesterov(group, s_b, e_b)
        e_a, buf_a = self._nesterov(group, s_a, e_a)
        if buf_b is not None:
            plan.state.append((s_b, "momentum_buffer", buf_b.to(b.dtype)))
            plan.state.append((s_a, "momentum_buffer", buf_a.to(a.dtype)))
        geometry = _FIXED_RANK if group["pair_momentum"] == "factor" else _AMBIENT_LORA
        try:
            xi_b, xi_a = self._direction(geometry, (x_b, x_a), (e_b, e_a), group)
        except ValueError as err:
            raise ValueError(
                f"pairs[{index}] (B {tuple(b.shape)}, A {tuple(a.shape)}): {err}"
            ) from err
        lr = float(group["lr"])
        step_lr = _adjusted_lr(lr, group["adjust_lr_fn"], (b.shape[-2], a.shape[-1]))
        t = self._backtrack(x_b, x_a, xi_b, xi_a, step_lr)
        new_b = x_b - t * xi_b
        new_a = x_a - t * xi_a
        wd = group["weight_decay"]
        if wd > 0:
            scale = math.sqrt(max(0.0, 1.0 - lr * wd))
            new_b, new_a = new_b * scale, new_a * scale
        plan.params.append((b, new_b))
        plan.params.append((a, new_a))

    def _backtrack(self, x_b, x_a, xi_b, xi_a, step_lr: float) -> torch.Tensor:
        """Per-matrix step lengths ``t`` (shape ``(..., 1, 1)``): halve ``step_lr`` where the pair
        would lose rank.

        The guard looks at the product ``B A`` (its ``s_min / s_max``), so it is invariant to the
        gauge like the step itself. A candidate is accepted when that ratio is at least ``sqrt(eps)``
        of the working dtype or, for a product that is already below that, at least its current
        ratio (it may not degrade further). After ``_MAX_BACKTRACKS`` halvings a matrix of the batch
        that still fails does not move (``t = 0``, always accepted).
        """
        batch = x_b.shape[:-2]
        t = torch.full(batch, float(step_lr), dtype=x_b.dtype, device=x_b.device)
        if step_lr == 0:
            return t[..., None, None]
        tol = math.sqrt(torch.finfo(x_b.dtype).eps)

        def ratios(tt):
            tt = tt[..., None, None]
            return self._min_ratio(x_b - tt * xi_b, x_a - tt * xi_a)

        first = ratios(t)
        if bool((first >= tol).all()):
            return t[..., None, None]
        now = self._min_ratio(x_b, x_a)
        threshold = torch.clamp(now, max=tol)
        ok = first >= threshold
        for _ in range(_MAX_BACKTRACKS):
            if bool(ok.all()):
                break
            t = torch.where(ok, t, 0.5 * t)
            ok = ratios(t) >= threshold
        t = torch.where(ok, t, torch.zeros_like(t))
        return t[..., None, None]

    def _fallback_lr(self, group) -> float:
        lr = float(group["lr"])
        flr = group["fallback_lr"]
        if flr is None:
            return lr
        lr0 = group.get("lr_at_init", lr)
        return flr * (lr / lr0) if lr0 > 0 else flr

    def _fallback_update(self, group, p: torch.Tensor, g: torch.Tensor, plan: _Plan) -> None:
        state = self.state[p]
        wdt = _work_dtype(p)
        x, e = p.detach().to(wdt), g.to(wdt)
        lr = self._fallback_lr(group)
        wd = group["weight_decay"]
        base = x * (1.0 - lr * wd) if wd > 0 else x
        if group["fallback"] == "sgd":
            d, buf = self._nesterov(group, state, e)
            if buf is not None:
                plan.state.append((state, "momentum_buffer", buf.to(p.dtype)))
            plan.params.append((p, base - lr * d))
            return
        beta1, beta2 = group["betas"]
        step = state.get("step", 0) + 1
        m = state.get("exp_avg")
        v = state.get("exp_avg_sq")
        m = (1.0 - beta1) * e if m is None else beta1 * m.to(wdt) + (1.0 - beta1) * e
        v = (1.0 - beta2) * e * e if v is None else beta2 * v.to(wdt) + (1.0 - beta2) * e * e
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        denom = v.sqrt() / math.sqrt(bc2) + group["eps"]
        plan.params.append((p, base - (lr / bc1) * m / denom))
        plan.state.append((state, "exp_avg", m.to(p.dtype)))
        plan.state.append((state, "exp_avg_sq", v.to(p.dtype)))

    def _nonfinite_grads(self, items: list[tuple[int, int, torch.Tensor, torch.Tensor]]) -> str:
        bad = [
            f"group {gi} parameter {pi} (shape {tuple(p.shape)})"
            for gi, pi, p, g in items
            if not bool(torch.isfinite(g).all())
        ]
        return ", ".join(bad) if bad else "the computed update"

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One iMuon step for every parameter with a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (run under
                ``torch.enable_grad()``).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            FloatingPointError: a gradient or update is not finite and ``nonfinite="raise"``
                (nothing changed).
            ValueError: a manifold parameter is off its manifold, or a pair has a rank-deficient
                factor.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_step_skipped = False

        items: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("IMuon does not support sparse gradients")
                items.append((gi, pi, p, p.grad))
        if not items:
            return loss
        if not _all_finite([g for *_, g in items]):
            return self._reject(loss, f"non-finite gradient in {self._nonfinite_grads(items)}")

        plan = _Plan()
        grads = {p: g for _, _, p, g in items}
        done: set[int] = set()
        for gi, _, p, g in items:
            group = self.param_groups[gi]
            if id(p) in done:
                continue
            if p in self._pair_index:
                index = self._pair_index[p]
                b, a = self._pairs[index]
                done.update((id(b), id(a)))
                self._pair_update(group, b, a, grads.get(b), grads.get(a), plan, index)
            elif p in self._rules:
                self._manifold_update(group, p, g, plan)
            elif p.ndim >= 2 and group["use_imuon"]:
                self._euclidean_update(group, p, g, plan)
            else:
                self._fallback_update(group, p, g, plan)
            done.add(id(p))

        if not _all_finite(plan.tensors()):
            return self._reject(
                loss,
                "non-finite update (finite gradients; check the learning rate and the "
                "parameters' conditioning)",
            )
        for p, new in plan.params:
            p.copy_(new)
        for state, key, value in plan.state:
            state[key] = value
        for _, _, p, _ in items:
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                self.stabilize_group(group)
        return loss

    def _reject(self, loss: Any, what: str) -> Any:
        if self.nonfinite == "skip":
            self.last_step_skipped = True
            return loss
        raise FloatingPointError(
            f"IMuon: {what}; no parameter or optimizer state was changed. Pass nonfinite='skip' to "
            "skip such "
            "steps instead of raising."
        )

    @torch.no_grad()
    def stabilize_group(self, group: dict[str, Any]) -> None:
        """Project manifold parameters onto their manifolds, their buffers onto tangent spaces."""
        for p in group["params"]:
            if p not in self._rules:
                continue
            manifold = p.manifold
            p.copy_(manifold.projx(p.detach().to(_work_dtype(p))))
            buf = self.state[p].get("momentum_buffer")
            if buf is not None:
                x = p.detach().to(_work_dtype(p))
                buf.copy_(manifold.proju(x, buf.to(x.dtype)))
