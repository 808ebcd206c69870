"""The batched steps of :class:`~imuon_manopt.optim.IMuon`, one pure function per kind of group (factor pairs:
:mod:`imuon_manopt.optim._pairs`).

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
from ..geometry import Euclidean, MetricOperator
from ..lmo import kyfan_factors, resolve_norm
from ..transforms import resolve_input_transform, transformed_lmo
from . import _momentum
from ._dispatch import ManifoldRule
from ._lr import adjusted_lr
from ._options import polar_spec
from ._stack import Inputs, Outputs, stack

GroupFn = Callable[[Inputs], Outputs]

_EUCLIDEAN = Euclidean()


def direction(geometry: MetricOperator, x: Any, egrad: Any, group: dict[str, Any]) -> Any:
    """``intrinsic_direction(...).xi`` with the group's norm and orthogonalizer (batched over leading dims)."""
    return intrinsic_direction(geometry, x, egrad, group["norm"], polar=polar_spec(group), gap=False).xi


#: Elements of one stacked input per batched call (4 MiB of float32). A group of small parameters (LoRA factors,
#: small frames) is one call; large matrices go in a few calls of about this size, whose intermediate products stay
#: in the CPU's caches (24 stacked 1024 x 1024 matrices in one call cost ~10% more than one at a time).
CHUNK_ELEMENTS = 2**20

#: A group's numerical step on stacked inputs (leading dim: the group's items, in the working dtype): a tuple of
#: stacked outputs. Pure: writes nothing.
Body = Callable[..., tuple[torch.Tensor, ...]]


def run_chunked(body: Body, inputs: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``body`` over consecutive slices (views) of the stacked ``inputs`` of at most :data:`CHUNK_ELEMENTS` elements
    per input (at least one item); for each output, the list of its stacked chunks, in order (one chunk when the
    whole group fits)."""
    n = inputs[0].shape[0]
    k = max(1, CHUNK_ELEMENTS // max(1, inputs[0][0].numel()))
    if k >= n:
        return [[t] for t in body(*inputs)]
    outs: list[list[torch.Tensor]] = []
    for i in range(0, n, k):
        res = body(*(t[i : i + k] for t in inputs))
        if not outs:
            outs = [[] for _ in res]
        for acc, t in zip(outs, res):
            acc.append(t)
    return outs


def rows(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The items of a stacked output (views, no copy)."""
    return [t for c in chunks for t in c.unbind(0)]


def per_item(body: Body, wdt: torch.dtype) -> GroupFn:
    """``body`` as a function of one tuple of tensors per item (the interface of
    :func:`~imuon_manopt.optim._distributed.apply_full`): stacks each input (no copy for the rows of one tensor),
    runs the chunked body and splits the outputs again."""

    def fn(inputs: Inputs) -> Outputs:
        if not inputs:
            return []
        stacked = [stack(inputs, i, wdt) for i in range(len(inputs[0]))]
        return list(zip(*(rows(chunks) for chunks in run_chunked(body, stacked))))

    return fn


def matrix_body(group: dict[str, Any], shape2d: tuple[int, int], wdt: torch.dtype, out: torch.dtype) -> Body:
    """Muon on stacked plain tensors of one shape: ``(x, E~) -> (x_new,)`` with ``x_new = (1 - lr wd) x - lr'
    polar(E~)``, ``x`` of shape ``(k, *shape)`` viewed as ``(k, *shape2d)`` (``(shape[0], -1)`` for convolutions);
    ``x_new`` in the parameters' dtype ``out``."""
    lr = float(group["lr"])
    step_lr = adjusted_lr(lr, group["adjust_lr_fn"], shape2d)
    wd = group["weight_decay"]
    if group.get("error_feedback"):
        return _error_feedback_body(group, shape2d, out, lr, step_lr, wd)
    transform = resolve_input_transform(group.get("input_transform"))

    def body(x: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor]:
        n = x.shape[0]
        x2, e2 = x.reshape(n, *shape2d), e.reshape(n, *shape2d)
        if transform is None:
            xi = direction(_EUCLIDEAN, x2, e2, group)
        else:  # plain matrices: the whitened gradient is E~ itself and the un-whitening the identity
            xi = transformed_lmo(e2, transform, lambda h: direction(_EUCLIDEAN, x2, h, group))[0]
        base = x * (1.0 - lr * wd) if wd > 0 else x
        return (torch.add(base, xi.reshape(x.shape), alpha=-step_lr).to(out),)

    return body


def _error_feedback_body(
    group: dict[str, Any], shape2d: tuple[int, int], out: torch.dtype, lr: float, step_lr: float, wd: float
) -> Body:
    """Dion's error feedback on plain matrices with a Ky Fan LMO: ``(x, M) -> (x_new, M_new)`` where ``M = buf + E``
    is the momentum after this step's gradient (a sum, no decay), ``Z = P R`` its Ky Fan LMO (``P`` orthonormal
    columns spanning the step), ``x_new = (1 - lr wd) x - lr' Z`` and ``M_new = M - (1 - beta) P P^T M``: the part
    of the momentum the step used decays by ``beta``, what it left out stays whole."""
    nrm = resolve_norm(group["norm"])
    k = int(nrm.k) if nrm.k is not None else 1
    spec = polar_spec(group)
    decay = 1.0 - group["momentum"]

    def body(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        m2 = m.reshape(n, *shape2d)
        p, r, _ = kyfan_factors(m2, k, spec)
        xi = (p @ r).to(x.dtype).reshape(x.shape)
        new_m = m2 - decay * (p @ (p.mT @ m2.to(p.dtype))).to(m2.dtype)
        base = x * (1.0 - lr * wd) if wd > 0 else x
        return torch.add(base, xi, alpha=-step_lr).to(out), new_m.reshape(m.shape)

    return body


def matrix_fn(group: dict[str, Any], shape2d: tuple[int, int], wdt: torch.dtype, out: torch.dtype) -> GroupFn:
    """:func:`matrix_body` per item: inputs ``(x, E~)``, outputs ``(x_new,)``."""
    return per_item(matrix_body(group, shape2d, wdt, out), wdt)


def manifold_body(
    group: dict[str, Any],
    manifold: geoopt.Manifold,
    rule: ManifoldRule,
    geometry: MetricOperator,
    shape: torch.Size,
    wdt: torch.dtype,
    out: torch.dtype,
) -> Body:
    """``x <- R_x(-lr' xi)`` on one manifold, stacked: ``(x, E) -> (x_new,)`` or, with momentum, ``(x, E, buf) ->
    (x_new, buf_new)``.

    With momentum the buffer is a tangent vector (:func:`imuon_manopt.optim._momentum.tangent`), carried to the new
    point by the manifold's ``retr_transp``, or, where the geometry is ``open_in_ambient`` (SPD), a sum of Euclidean
    gradients (:func:`imuon_manopt.optim._momentum.covector`), which needs no transport. Manifolds whose geoopt
    retraction takes a covector (``rule.covector_update``) get ``flat(xi)``, so that they move along ``xi``.

    A factorization that fails inside the step (the geometry's Cholesky factor of a point that has lost
    definiteness to rounding, geoopt's scripted ``eigh`` not converging, which raises a plain ``RuntimeError``)
    raises ``torch.linalg.LinAlgError`` naming the cause, which the optimizer's ``nonfinite`` policy handles like a
    non-finite update. With ``rule.verify`` the new point is factorized by the geometry before it is returned.
    """
    step_lr = adjusted_lr(float(group["lr"]), group["adjust_lr_fn"], rule.matrix_shape(shape))
    beta, use_nesterov = group["momentum"], group["nesterov"]
    flat = rule.flat

    def lower(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flat(x, v) if flat is not None else geometry.flat(geometry.at(x), v)

    carried = not geometry.open_in_ambient  # a tangent buffer, transported by the retraction

    def step(x: torch.Tensor, e: torch.Tensor, buf: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if beta > 0:
            if carried:
                e, buf = _momentum.tangent(manifold, x, e, buf, beta, use_nesterov, lower)
            else:
                e, buf = _momentum.covector(e, buf, beta, use_nesterov)
        xi = direction(geometry, x, e, group)
        u = lower(x, xi) if rule.covector_update else xi
        if carried:
            new_x, buf = _retract(manifold, x, -step_lr * u, buf)
        else:
            new_x = _retract(manifold, x, -step_lr * u, None)[0]
        if rule.verify:
            geometry.at(new_x)  # raises where the new point is off the manifold
        return new_x, buf

    def body(x: torch.Tensor, e: torch.Tensor, buf: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        try:
            new_x, buf = step(x, e, buf)
        except torch.linalg.LinAlgError:
            raise
        except (RuntimeError, ValueError) as err:
            # inputs of the right shapes (checked before the step): a numerical failure, e.g. geoopt's scripted
            # eigh (a plain RuntimeError) or an SPD point whose smallest eigenvalue fell to rounding level
            raise torch.linalg.LinAlgError(f"{rule.label}: {err}") from err
        if rule.polish is not None:
            new_x = rule.polish(new_x)
        new_x = new_x.to(out)
        return (new_x,) if buf is None else (new_x, buf)

    return body


def manifold_fn(
    group: dict[str, Any],
    manifold: geoopt.Manifold,
    rule: ManifoldRule,
    geometry: MetricOperator,
    shape: torch.Size,
    wdt: torch.dtype,
    out: torch.dtype,
) -> GroupFn:
    """:func:`manifold_body` per item: inputs ``(x, E)`` or ``(x, E, buf)``, outputs ``(x_new,)`` or ``(x_new,
    buf_new)``."""
    return per_item(manifold_body(group, manifold, rule, geometry, shape, wdt, out), wdt)


def _retract(
    manifold: geoopt.Manifold, x: torch.Tensor, u: torch.Tensor, buf: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``manifold.retr`` (or ``retr_transp`` with a buffer). geoopt's factorizations raise where they meet
    non-finite values (a huge step, a non-finite direction); the step then has non-finite results like any other
    overflow, and the optimizer's ``nonfinite`` policy decides. Other failures raise (and become ``LinAlgError``
    in :func:`manifold_body`)."""
    try:
        return (manifold.retr(x, u), None) if buf is None else manifold.retr_transp(x, u, buf)
    except RuntimeError:
        if bool(torch.isfinite(u).all()) and (buf is None or bool(torch.isfinite(buf).all())):
            raise
        nan = torch.full_like(x, math.nan)
        return nan, (None if buf is None else torch.full_like(buf, math.nan))
