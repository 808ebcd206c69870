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
from . import _distributed, _momentum
from ._dispatch import ManifoldRule
from ._lr import adjusted_lr
from ._options import polar_spec
from ._stack import Inputs, Outputs, stack

GroupFn = Callable[[Inputs], Outputs]

_EUCLIDEAN = Euclidean()


def direction(geometry: MetricOperator, x: Any, egrad: Any, group: dict[str, Any], transform: Any = None) -> Any:
    """``intrinsic_direction(...).xi`` with the group's norm and orthogonalizer (batched over leading dims), and an
    input transform of the whitened blocks where the caller passes one."""
    return intrinsic_direction(
        geometry, x, egrad, group["norm"], polar=polar_spec(group), gap=False, transform=transform
    ).xi


#: Elements of one stacked input per batched call (4 MiB of float32). A group of small parameters (LoRA factors,
#: small frames) is one call; large matrices go in a few calls of about this size, whose intermediate products stay
#: in the CPU's caches (24 stacked 1024 x 1024 matrices in one call cost ~10% more than one at a time).
CHUNK_ELEMENTS = 2**20

#: A group's numerical step on stacked inputs (leading dim: the group's items, in the working dtype): a tuple of
#: stacked outputs. Pure: writes nothing.
Body = Callable[..., tuple[torch.Tensor, ...]]


def run_chunked(body: Body, inputs: Sequence[torch.Tensor], *scalars: Any) -> list[list[torch.Tensor]]:
    """``body`` over consecutive slices (views) of the stacked ``inputs`` of at most :data:`CHUNK_ELEMENTS` elements
    per input (at least one item), with the step's ``scalars`` (learning rate, decay) after them; for each output,
    the list of its stacked chunks, in order (one chunk when the whole group fits)."""
    n = inputs[0].shape[0]
    k = max(1, CHUNK_ELEMENTS // max(1, inputs[0][0].numel()))
    if k >= n:
        return [[t] for t in body(*inputs, *scalars)]
    outs: list[list[torch.Tensor]] = []
    for i in range(0, n, k):
        res = body(*(t[i : i + k] for t in inputs), *scalars)
        if not outs:
            outs = [[] for _ in res]
        for acc, t in zip(outs, res):
            acc.append(t)
    return outs


def rows(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The items of a stacked output (views, no copy)."""
    return [t for c in chunks for t in c.unbind(0)]


def per_item(body: Body, wdt: torch.dtype, *scalars: Any) -> GroupFn:
    """``body`` as a function of one tuple of tensors per item (the interface of
    :func:`~imuon_manopt.optim._distributed.apply_full`): stacks each input (no copy for the rows of one tensor),
    runs the chunked body with ``scalars`` and splits the outputs again."""

    def fn(inputs: Inputs) -> Outputs:
        if not inputs:
            return []
        stacked = [stack(inputs, i, wdt) for i in range(len(inputs[0]))]
        return list(zip(*(rows(chunks) for chunks in run_chunked(body, stacked, *scalars))))

    return fn


Scalar = float | torch.Tensor


def step_scalars(group: dict[str, Any], shape2d: tuple[int, int], tensor: bool) -> tuple[Scalar, Scalar]:
    """The step's learning rate ``lr'`` (``adjust_lr_fn`` applied) and decay factor ``1 - lr wd`` (floored at 0;
    a pair's factors each take it). Floats, or with ``tensor`` 0-d tensors (a compiled step takes them as inputs, so
    a new ``lr`` needs no recompilation); a tensor ``lr`` in the group stays a tensor (read on its device, as a
    captured step needs; ``adjust_lr_fn`` is then applied as ``lr * fn(1, shape)``, exact for the built-in rules,
    which are linear in ``lr``)."""
    lr = group["lr"]
    wd = group["weight_decay"]
    fn = group["adjust_lr_fn"]
    if isinstance(lr, torch.Tensor):
        lr_t = lr.reshape(())
        step = adjusted_lr(1.0, fn, shape2d) * lr_t if fn is not None else lr_t
        return step, (1.0 - lr_t * wd).clamp_min(0.0)
    lr = float(lr)
    step_f = adjusted_lr(lr, fn, shape2d)
    decay_f = max(0.0, 1.0 - lr * wd)
    if tensor:
        return torch.tensor(step_f, dtype=torch.float64), torch.tensor(decay_f, dtype=torch.float64)
    return step_f, decay_f


def _descend(base: torch.Tensor, xi: torch.Tensor, step_lr: Scalar) -> torch.Tensor:
    """``base - lr' xi`` (a float ``lr'`` as ``torch.add``'s alpha; a tensor one read where it lives)."""
    if isinstance(step_lr, torch.Tensor):
        return base - (step_lr * xi).to(xi.dtype)
    return torch.add(base, xi, alpha=-step_lr)


def matrix_body(
    group: dict[str, Any],
    shape2d: tuple[int, int],
    out: torch.dtype,
    local_lmo: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Body:
    """Muon on stacked plain tensors of one shape: ``(x, E~, lr', decay) -> (x_new,)`` with ``x_new = decay x - lr'
    polar(E~)`` (``decay = 1 - lr wd``, :func:`step_scalars`), ``x`` of shape ``(k, *shape)`` viewed as a batch of
    ``shape2d`` matrices: ``(k, *shape2d)`` with ``shape2d = (shape[0], prod(shape[1:]))`` (``flatten=True``,
    convolutions), or ``(k * prod(shape[:-2]), *shape[-2:])`` (``flatten=False``: one LMO per slice, in one batched
    call; a joint norm, which would couple a batch, gets one call per slice); ``x_new`` in the parameters' dtype
    ``out``. ``lr'`` and ``decay`` are floats or 0-d tensors. With ``local_lmo`` (the sketch mode of
    :func:`sketched_lmo`) the inputs are the rank's rows ``(k, m_r, n)`` of the matrices and ``local_lmo`` gives the
    same rows of the direction."""
    wd = group["weight_decay"]
    if group.get("error_feedback"):
        return _error_feedback_body(group, shape2d, out, wd)
    transform = resolve_input_transform(group.get("input_transform"))
    joint = resolve_norm(group["norm"]).joint

    def lmo(x2: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        if transform is None:
            return direction(_EUCLIDEAN, x2, e2, group)
        # plain matrices: the whitened gradient is E~ itself and the un-whitening the identity
        return transformed_lmo(e2, transform, lambda h: direction(_EUCLIDEAN, x2, h, group))[0]

    def body(x: torch.Tensor, e: torch.Tensor, step_lr: Scalar, decay: Scalar) -> tuple[torch.Tensor]:
        if local_lmo is not None:  # the sketch mode: local rows in, the same rows of the direction out
            xi = local_lmo(e)
        else:
            x2, e2 = x.reshape(-1, *shape2d), e.reshape(-1, *shape2d)
            if joint and x2.shape[0] > x.shape[0]:  # per-slice under a joint norm: each slice its own budget
                xi = torch.stack([lmo(x2[i : i + 1], e2[i : i + 1])[0] for i in range(x2.shape[0])])
            else:
                xi = lmo(x2, e2)
        base = x * decay if wd > 0 else x
        return (_descend(base, xi.reshape(x.shape), step_lr).to(out),)

    return body


def _error_feedback_body(group: dict[str, Any], shape2d: tuple[int, int], out: torch.dtype, wd: float) -> Body:
    """Dion's error feedback on plain matrices with a Ky Fan LMO: ``(x, M, lr', decay) -> (x_new, M_new)`` where ``M
    = buf + E`` is the momentum after this step's gradient (a sum, no decay), ``Z = P R`` its Ky Fan LMO (``P``
    orthonormal columns spanning the step), ``x_new = (1 - lr wd) x - lr' Z`` and ``M_new = M - (1 - beta) P P^T
    M``: the part of the momentum the step used decays by ``beta``, what it left out stays whole."""
    nrm = resolve_norm(group["norm"])
    k = int(nrm.k) if nrm.k is not None else 1
    spec = polar_spec(group)
    fade = 1.0 - group["momentum"]

    def body(x: torch.Tensor, m: torch.Tensor, step_lr: Scalar, decay: Scalar) -> tuple[torch.Tensor, torch.Tensor]:
        m2 = m.reshape(-1, *shape2d)
        p, r, _ = kyfan_factors(m2, k, spec)
        xi = (p @ r).to(x.dtype).reshape(x.shape)
        new_m = m2 - fade * (p @ (p.mT @ m2.to(p.dtype))).to(m2.dtype)
        base = x * decay if wd > 0 else x
        return _descend(base, xi, step_lr).to(out), new_m.reshape(m.shape)

    return body


def sketched_lmo(
    group: dict[str, Any], shape2d: tuple[int, int], params: Sequence[torch.Tensor], eps: float
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The low-rank sketch mode of a plain-matrix group under FSDP2, or ``None`` where the group takes the
    full-matrix path (:func:`~imuon_manopt.optim._distributed.apply_full`).

    It applies to 2-D parameters whose rows are split over one process group (FSDP2's ``Shard(0)``) with
    ``norm=("kyfan", k)``, ``polar={"method": "randomized", ...}``, ``k + oversample < min(m, n)``, no
    ``input_transform`` and no ``error_feedback``: the randomized Ky Fan LMO is computed from each rank's rows,
    communicating only ``n x (k + oversample)`` sketches instead of the matrices
    (:func:`~imuon_manopt.optim._distributed.sketch_kyfan_lmo`, equal to the single-process solver up to rounding).
    Returns ``lmo(e)`` for stacked local rows ``e`` (B, m_r, n); ``eps`` is the rounding of the inputs (the rank
    cut of the core's solver)."""
    spec = polar_spec(group)
    if spec.method != "randomized" or group.get("input_transform") is not None or group.get("error_feedback"):
        return None
    nrm = resolve_norm(group["norm"])
    if nrm.name != "kyfan" or nrm.k is None or nrm.k + spec.oversample >= min(shape2d):
        return None
    where = _distributed.row_shards(params)
    if where is None or where.shape != shape2d:
        return None
    start, _ = where.span(where.rank)
    k = int(nrm.k)

    def lmo(e: torch.Tensor) -> torch.Tensor:
        return _distributed.sketch_kyfan_lmo(
            e, shape2d[0], start, k, spec.oversample, spec.power_iters,
            group=where.group, rank=where.rank, world=where.world, mm_dtype=spec.dtype, eps=eps,
        )  # fmt: skip

    return lmo


def group_step(
    body: Body,
    xs: list[torch.Tensor],
    gs: list[torch.Tensor],
    bufs: list[torch.Tensor] | None,
    scalars: tuple[Scalar, Scalar],
    *,
    beta: float,
    use_nesterov: bool,
    feedback: bool,
    wdt: torch.dtype,
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """One stacked group's whole numerical step (pure; no host synchronization besides what ``body`` needs): the
    momentum on each run's stacked gradients ``gs`` and buffers ``bufs`` (``None`` without momentum;
    :func:`imuon_manopt.optim._momentum.euclidean_stacked`, or with ``feedback`` the sum ``M = buf + E`` whose new
    value the body returns after the new parameters), then ``body(*xs, *E~s, *scalars)`` in chunks. Returns the new
    values (per run of parameters, stacked chunks) and the new buffers. This is what ``compile=`` compiles."""
    es, new_bufs = [], []
    for k, g in enumerate(gs):
        e = g.to(wdt)
        if bufs is not None and feedback:
            e = e + bufs[k]
        elif bufs is not None:
            e, nb = _momentum.euclidean_stacked(e, bufs[k], beta, use_nesterov)
            new_bufs.append(nb)
        es.append(e)
    outs = run_chunked(body, [x.to(wdt) for x in xs] + es, *scalars)
    if feedback:
        new_bufs = [chunks[0] if len(chunks) == 1 else torch.cat(chunks) for chunks in outs[len(xs) :]]
        outs = outs[: len(xs)]
    return outs, new_bufs


def matrix_fn(group: dict[str, Any], shape2d: tuple[int, int], wdt: torch.dtype, out: torch.dtype) -> GroupFn:
    """:func:`matrix_body` per item: inputs ``(x, E~)``, outputs ``(x_new,)`` (and ``(M_new,)`` with error
    feedback)."""
    return per_item(matrix_body(group, shape2d, out), wdt, *step_scalars(group, shape2d, False))


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

    def lower(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return geometry.flat(geometry.at(x), v)

    carried = not geometry.open_in_ambient  # a tangent buffer, transported by the retraction

    def step(x: torch.Tensor, e: torch.Tensor, buf: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if beta > 0:
            if buf is None:  # the caller passes a buffer whenever beta > 0
                raise RuntimeError("internal error: momentum > 0 without a momentum buffer")
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
