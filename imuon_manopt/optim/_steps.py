"""The batched steps of :class:`~imuon_manopt.optim.IMuon`, one pure function per kind of group.

Each ``*_fn`` returns ``fn(inputs) -> outputs``: ``inputs`` holds one tuple of tensors per parameter of the group
(full tensors, never sharded), ``outputs`` one tuple per parameter (the new value, and the new momentum buffer where
the group keeps one in the function). ``fn`` stacks the group's tensors, takes one batched direction, one batched
LMO and one batched retraction, and splits the result again; it writes nothing, so the caller decides whether to
commit (spec §2–§3; the routing and momentum rules are in :mod:`imuon_manopt.optim.imuon`).

Batching is exact for the max-rule norms (spectral, nuclear), where every matrix of a batch gets its own LMO; the
joint norms (Frobenius, Schatten-p) couple a batch, so their groups hold one parameter each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import geoopt
import torch

from ..direction import intrinsic_direction
from ..geometry import AmbientFixedRank, Euclidean, FixedRank, MetricOperator
from ._dispatch import ManifoldRule
from ._options import adjusted_lr

Inputs = Sequence[tuple[torch.Tensor, ...]]
Outputs = list[tuple[torch.Tensor, ...]]
GroupFn = Callable[[Inputs], Outputs]

#: Halvings of a pair's step before the pair stays put for this step (2^-12 ~ 2.4e-4 of the step).
MAX_BACKTRACKS = 12
_EUCLIDEAN = Euclidean()
# No host synchronization inside the step: a rank-deficient factor shows up as non-finite directions, which the
# optimizer's finiteness check routes to its nonfinite policy (new pairs are checked once, on their first step).
_FIXED_RANK = FixedRank(check=False)
_AMBIENT = AmbientFixedRank(check=False)


def direction(geometry: MetricOperator, x: Any, egrad: Any, group: dict[str, Any]) -> Any:
    """``intrinsic_direction(...).xi`` with the group's norm and orthogonalizer (batched over leading dims)."""
    ns = group["polar"] == "newton_schulz"
    return intrinsic_direction(
        geometry,
        x,
        egrad,
        group["norm"],
        p=group["p"],
        polar=group["polar"],
        steps=group["ns_steps"] if ns else None,
        dtype=group["ns_dtype"] if ns else None,
        gap=False,
    ).xi


def _unbound_from(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor ``ts`` came from by ``unbind(0)``, in order (so stacking them again is a no-op), else None."""
    base = ts[0]._base
    if base is None or base.shape[0] != len(ts) or base.shape[1:] != ts[0].shape:
        return None
    step = base.stride(0)
    for k, t in enumerate(ts):
        offset = base.storage_offset() + k * step
        if t._base is not base or t.storage_offset() != offset or t.stride() != base.stride()[1:]:
            return None
    return base


def _stack(inputs: Inputs, i: int, dtype: torch.dtype) -> torch.Tensor:
    ts = [t[i] for t in inputs]
    if len(ts) == 1:
        return ts[0].unsqueeze(0).to(dtype)
    base = _unbound_from(ts)
    return (torch.stack(ts) if base is None else base).to(dtype)


def nesterov(e: list[torch.Tensor], bufs: list[torch.Tensor], beta: float, use_nesterov: bool):
    """``buf <- beta buf + e``; returns ``(e~, new bufs)`` with ``e~ = e + beta buf`` (Nesterov) or ``buf``.

    Elementwise, so it may run on local shards: stacked when all tensors share one shape (three batched ops), else
    ``torch._foreach`` ops."""
    if len({t.shape for t in e}) == 1 and len({t.shape for t in bufs}) == 1:
        es, bs = _stack([(t,) for t in e], 0, e[0].dtype), _stack([(t,) for t in bufs], 0, e[0].dtype)
        new = torch.add(es, bs, alpha=beta)
        out = torch.add(es, new, alpha=beta) if use_nesterov else new
        return list(out.unbind(0)), list(new.unbind(0))
    new = torch._foreach_add(e, torch._foreach_mul(bufs, beta))
    return (torch._foreach_add(e, new, alpha=beta) if use_nesterov else new), new


def matrix_fn(group: dict[str, Any], shape2d: tuple[int, int], wdt: torch.dtype, out: torch.dtype) -> GroupFn:
    """Muon on plain tensors of one shape: ``x <- (1 - lr wd) x - lr' polar(E~)``; inputs ``(x, E~)``, outputs
    ``(x_new,)``; ``x`` is viewed as ``shape2d`` (``(shape[0], -1)`` for convolutions)."""
    lr = float(group["lr"])
    step_lr = adjusted_lr(lr, group["adjust_lr_fn"], shape2d)
    wd = group["weight_decay"]

    def fn(inputs: Inputs) -> Outputs:
        if not inputs:
            return []
        x, e = _stack(inputs, 0, wdt), _stack(inputs, 1, wdt)
        n = x.shape[0]
        xi = direction(_EUCLIDEAN, x.reshape(n, *shape2d), e.reshape(n, *shape2d), group).reshape(x.shape)
        base = x * (1.0 - lr * wd) if wd > 0 else x
        new = torch.add(base, xi, alpha=-step_lr).to(out)
        return [(t,) for t in new.unbind(0)]

    return fn


def manifold_fn(
    group: dict[str, Any],
    manifold: geoopt.Manifold,
    rule: ManifoldRule,
    geometry: MetricOperator,
    shape: torch.Size,
    wdt: torch.dtype,
    out: torch.dtype,
) -> GroupFn:
    """``x <- R_x(-lr' xi)`` on one manifold; inputs ``(x, E)`` or, with momentum, ``(x, E, buf)``; outputs
    ``(x_new,)`` or ``(x_new, buf_new)``.

    With momentum the buffer is a tangent vector (the running sum of Riemannian gradients ``egrad2rgrad(x, E)``),
    carried to the new point by the manifold's ``retr_transp``; the Nesterov combination is lowered to a covector by
    the geometry's ``flat`` before the template. Manifolds whose geoopt retraction takes a covector
    (``rule.covector_update``) get ``flat(xi)``, so that they move along ``xi``.
    """
    step_lr = adjusted_lr(float(group["lr"]), group["adjust_lr_fn"], rule.matrix_shape(shape))
    beta, use_nesterov = group["momentum"], group["nesterov"]
    flat = rule.flat if rule.flat is not None else None

    def lower(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flat(x, v) if flat is not None else geometry.flat(geometry.at(x), v)

    def fn(inputs: Inputs) -> Outputs:
        if not inputs:
            return []
        x, e = _stack(inputs, 0, wdt), _stack(inputs, 1, wdt)
        buf = None
        if beta > 0:
            r = manifold.egrad2rgrad(x, e)
            buf = torch.add(r, _stack(inputs, 2, wdt), alpha=beta)
            e = lower(x, torch.add(r, buf, alpha=beta) if use_nesterov else buf)
        xi = direction(geometry, x, e, group)
        u = lower(x, xi) if rule.covector_update else xi
        new_x, buf = _retract(manifold, x, -step_lr * u, buf)
        if rule.polish is not None:
            new_x = rule.polish(new_x)
        new_x = new_x.to(out)
        if buf is None:
            return [(t,) for t in new_x.unbind(0)]
        return list(zip(new_x.unbind(0), buf.unbind(0)))

    return fn


def _retract(manifold: geoopt.Manifold, x: torch.Tensor, u: torch.Tensor, buf: torch.Tensor | None):
    """``manifold.retr`` (or ``retr_transp`` with a buffer). geoopt's factorizations raise where they meet
    non-finite values (a huge step, a non-finite direction); the step then has non-finite results like any other
    overflow, and the optimizer's ``nonfinite`` policy decides. Errors with finite inputs and a finite retraction
    are real errors and propagate."""
    try:
        return (manifold.retr(x, u), None) if buf is None else manifold.retr_transp(x, u, buf)
    except RuntimeError:
        finite = bool(torch.isfinite(u).all()) and (buf is None or bool(torch.isfinite(buf).all()))
        if finite:
            try:
                finite = bool(torch.isfinite(manifold.retr(x, u)).all())
            except RuntimeError:
                finite = False
        if finite:
            raise
        nan = torch.full_like(x, math.nan)
        return nan, (None if buf is None else torch.full_like(buf, math.nan))


def _ratio(cb: torch.Tensor, ca: torch.Tensor, r: int) -> torch.Tensor:
    """``s_min / s_max`` of the rank-r product ``Q_B cb ca^T Q_A^T`` (0 for a zero product)."""
    s = torch.linalg.svdvals(cb @ ca.mT)
    top = s[..., 0]
    safe = torch.where(top > 0, top, torch.ones_like(top))
    return torch.where(top > 0, s[..., r - 1] / safe, torch.zeros_like(top))


def _ratios(rb: torch.Tensor, ra: torch.Tensor, t: torch.Tensor, r: int) -> torch.Tensor:
    """``s_min / s_max`` of ``(B - t xi_B)(A - t xi_A)`` for step lengths ``t`` (k, *batch), from the R factors of
    ``[B, xi_B]`` and ``[A^T, xi_A^T]``: ``B - t xi_B = Q_B (R_B[:, :r] - t R_B[:, r:])``, so the product's nonzero
    singular values are those of a ``2r x 2r`` matrix. Never forms ``m x n``."""
    tt = t[..., None, None]
    return _ratio(rb[..., :r] - tt * rb[..., r:], ra[..., :r] - tt * ra[..., r:], r)


def step_lengths(
    b: torch.Tensor, a: torch.Tensor, xi_b: torch.Tensor, xi_a: torch.Tensor, step_lr: float, lazy: bool
) -> torch.Tensor:
    """Per-pair step lengths ``t`` (shape ``(*batch, 1, 1)``): the largest ``step_lr * 2^-k``, ``k = 0..12``, that
    keeps the product's ``s_min / s_max`` at least ``min(sqrt(eps), its current value)``; ``0`` if none does.

    The guard looks at the product ``B A``, so it is invariant to the gauge like the step itself. All candidates
    come from one thin QR of ``[B, xi_B]`` (m x 2r) and one of ``[A^T, xi_A^T]`` (n x 2r) and batched ``2r x 2r``
    singular values, with tensor ops only (no host synchronization). ``lazy`` (CPUs, where reading a flag costs
    nothing) first tries the full step alone and evaluates the other candidates only when a pair fails it; the result
    is the same.
    """
    batch = b.shape[:-2]
    full = torch.full(batch, float(step_lr), dtype=b.dtype, device=b.device)
    if step_lr == 0:
        return full[..., None, None]
    r = b.shape[-1]
    tol = math.sqrt(torch.finfo(b.dtype).eps)
    if lazy:  # the full step alone, from the r x r cores of the stepped factors
        r_b = torch.linalg.qr(b - step_lr * xi_b, mode="r")[1]
        r_a = torch.linalg.qr((a - step_lr * xi_a).mT, mode="r")[1]
        if bool((_ratio(r_b, r_a, r) >= tol).all()):
            return full[..., None, None]
    rb = torch.linalg.qr(torch.cat([b, xi_b], -1), mode="r")[1]
    ra = torch.linalg.qr(torch.cat([a.mT, xi_a.mT], -1), mode="r")[1]
    scales = torch.cat([torch.zeros(1), 0.5 ** torch.arange(MAX_BACKTRACKS + 1, dtype=torch.float64)])
    cand = scales.to(b.dtype).to(b.device).reshape(-1, *([1] * len(batch))) * full  # (14, *batch)
    ratios = _ratios(rb, ra, cand, r)
    threshold = torch.clamp(ratios[0], max=tol)
    ok = ratios[1:] >= threshold  # (13, *batch)
    first = torch.argmax(ok.to(torch.uint8), dim=0, keepdim=True)  # the first passing candidate
    t = torch.take_along_dim(cand[1:], first, dim=0)[0]
    return torch.where(ok.any(0), t, torch.zeros_like(t))[..., None, None]


def pair_fn(group: dict[str, Any], shape2d: tuple[int, int], wdt: torch.dtype, out: torch.dtype, lazy: bool):
    """The fixed-rank step of pairs of one shape: one input ``(B, A, E~_B, E~_A)`` and one output ``(B_new,
    A_new)`` per pair: ``(B - t xi_B, A - t xi_A)`` scaled by ``sqrt(1 - lr wd)``, with ``t`` from
    :func:`step_lengths`."""
    lr = float(group["lr"])
    step_lr = adjusted_lr(lr, group["adjust_lr_fn"], shape2d)
    wd = group["weight_decay"]
    geometry = _FIXED_RANK if group["pair_momentum"] == "factor" else _AMBIENT

    def fn(inputs: Inputs) -> Outputs:
        if not inputs:
            return []
        b, a, e_b, e_a = (_stack(inputs, i, wdt) for i in range(4))
        xi_b, xi_a = direction(geometry, (b, a), (e_b, e_a), group)
        t = step_lengths(b, a, xi_b, xi_a, step_lr, lazy)
        new_b, new_a = b - t * xi_b, a - t * xi_a
        if wd > 0:
            scale = math.sqrt(max(0.0, 1.0 - lr * wd))
            new_b, new_a = new_b * scale, new_a * scale
        return list(zip(new_b.to(out).unbind(0), new_a.to(out).unbind(0)))

    return fn
