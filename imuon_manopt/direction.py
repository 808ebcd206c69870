"""The iMuon template, written once for every geometry.

Given a metric operator (:class:`imuon_manopt.geometry.MetricOperator`), a point ``x`` and a Euclidean gradient
(or momentum) ``E``:

1. ``H = L^{-1} P_x(E)``: project and whiten (``L L^T = G_x``);
2. ``Z = argmax {<H, Z> : phi(Z) <= tau}``: the LMO of a unitarily invariant norm, block by block;
3. ``xi = L^{-T} Z``: un-whiten, and assemble the tangent vector.

``xi`` is the *positive* direction: ``<E, xi> = <H, Z> = tau * phi_dual(H) >= 0`` (the LMO gap); a step is
``R_x(-eta * xi)``.

Block rule (spec §1). The blocks of a geometry (e.g. Stiefel's ``(Omega, K)``), the factors of a product, and the
leading batch dimensions all form one product norm: spectral, nuclear and Ky Fan combine with ``max`` (each block
gets its own LMO with the whole budget ``tau``, e.g. its own ``U_k V_k^T``, and the gap is the *sum* of the blocks'
dual norms); Frobenius and Schatten-p (1 < p < inf) combine jointly (``phi`` of the block-diagonal matrix: the
budget is shared in proportion to ``dual_i^(q-1)`` and the gap is the ``l_q`` norm of the blocks' dual norms).
F-Muon's ball ``alpha B_spectral + (1 - alpha) B_Frobenius`` is taken on the block-diagonal matrix: its polar part
follows the max rule (each block ``polar(H_b)``) and its Frobenius part is joint (``H_b / ||H||_F`` with the norm
over all blocks), so ``Z_b = alpha polar(H_b) + (1 - alpha) H_b / ||H||_F`` and the gap is
``alpha sum_b ||H_b||_* + (1 - alpha) ||H||_F``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np
import torch

from ._backend import astype, finfo, namespace, native_numpy, numel, to_torch
from .geometry.base import MetricOperator, skew, sym
from .lmo import SPECTRAL, Norm, PolarSpec, fmuon_mix, lmo_tensor, resolve_norm, resolve_polar
from .polar import check_square, exact_dtype, promote, resolve_schedule
from .transforms import resolve_input_transform, transformed_lmo


class Direction(NamedTuple):
    """An iMuon direction.

    Attributes:
        xi: the tangent vector, in the geometry's representation (same container and array type as ``x``).
        gap: the LMO gap ``<E, xi> = tau * phi_dual(H)`` as a 0-d tensor (a Python float for numpy input);
            the natural stationarity measure, zero exactly when the projected gradient is zero. ``None``
            when :func:`intrinsic_direction` was called with ``gap=False``.
    """

    xi: Any
    gap: Any


_LOW_PRECISION = (torch.float16, torch.bfloat16)
_STRUCTURES = {"general", "symmetric", "skew"}
_NUMPY_NORMS = ("spectral", "frobenius", "nuclear", "schatten")  # the norms whose LMO kernel has a numpy path


def _rebuild(tree, items):
    return list(items) if isinstance(tree, list) else tuple(items)


def _to_torch(tree):
    """numpy arrays -> torch tensors (zero-copy where possible), through lists and tuples."""
    if isinstance(tree, torch.Tensor):
        return tree
    if isinstance(tree, (list, tuple)):
        return _rebuild(tree, (_to_torch(t) for t in tree))
    if isinstance(tree, (np.ndarray, np.generic, float, int)):
        arr = np.asarray(tree)
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float64)
        elif not arr.flags.writeable:  # e.g. jax's gradients; torch warns on read-only memory
            arr = arr.copy()
        return to_torch(arr)[0]
    raise TypeError(f"expected numpy arrays or torch tensors (or lists/tuples of them), got {type(tree).__name__}")


def _map(fn, tree):
    if isinstance(tree, (torch.Tensor, np.ndarray)):
        return fn(tree)
    return _rebuild(tree, (_map(fn, t) for t in tree))


def _leaves(tree) -> list[Any]:
    if isinstance(tree, (torch.Tensor, np.ndarray)):
        return [tree]
    return [leaf for t in tree for leaf in _leaves(t)]


def _is_numpy(tree) -> bool:
    if isinstance(tree, (list, tuple)):
        return any(_is_numpy(t) for t in tree)
    return isinstance(tree, np.ndarray)


def _abs_max(t) -> float:
    """``max |t|`` as a float (NaN if any entry is NaN): one ``aminmax`` pass for a torch tensor (no ``abs``
    temporary; ~1.6x faster on a CPU), ``abs().max()`` for numpy."""
    if isinstance(t, np.ndarray):
        return float(abs(t).max())
    lo, hi = torch.aminmax(t)
    return float(torch.maximum(-lo, hi))


def _prescale(tree, host: bool | None = None):
    """``(tree * s, s)`` with ``s`` a power of two that moves the largest entry into ``[2^lo, 2^hi]`` (``hi =
    max_exp - 24``, ``lo = -floor(max_exp / 2)``: 2^103 and 2^-63 for float32), and ``s = 1`` when it is there already,
    so ordinary gradients are left exactly as they are and the small leaves of an unbalanced tree (a fixed-rank
    pair far from balance) are not pushed into the subnormal range. Above ``2^hi`` projections and whitening
    could overflow. A zero or non-finite tree is returned unchanged (``s = 1``), so NaN and inf propagate.

    On the CPU (``host=None``: when every leaf is a numpy array or on the CPU, outside ``torch.compile``) the largest
    entry is read on the host (no device to wait for) and ``s`` is a float; elsewhere it is a 0-d tensor, computed
    without a host synchronization.
    """
    leaves = [t for t in _leaves(tree) if numel(t)]
    if not leaves:
        return tree, 1.0
    max_exp = _MAX_EXP.get(leaves[0].dtype)
    if max_exp is None:
        max_exp = _MAX_EXP[leaves[0].dtype] = int(math.log2(finfo(leaves[0].dtype).max))
    hi, lo = max_exp - 24, -(max_exp // 2)
    if host is None:  # under torch.compile the device computation (a host read would break the graph)
        host = all(isinstance(t, np.ndarray) for t in leaves) or (
            not torch.compiler.is_compiling()
            and all(isinstance(t, np.ndarray) or t.device.type == "cpu" for t in leaves)
        )
    if host:
        amax = max(_abs_max(t) for t in leaves)
        if not (math.isfinite(amax) and amax > 0.0) or 2.0**lo <= amax <= 2.0**hi:
            return tree, 1.0
        e = math.frexp(amax)[1]  # amax = m 2^e, m in [1/2, 1)
        inv = math.ldexp(1.0, hi - e if e > hi else lo - e + 1)
        return _map(lambda t: t * inv, tree), inv
    big = leaves[0].abs().amax()
    for t in leaves[1:]:
        big = torch.maximum(big, t.abs().amax().to(big.dtype))
    exp = torch.frexp(big).exponent
    shift = (exp - hi).clamp_min(0) - (lo + 1 - exp).clamp_min(0)  # 0 in range (and for zero / non-finite big)
    shift = torch.where(torch.isfinite(big) & (big > 0), shift, torch.zeros_like(shift))
    inv_t = torch.ldexp(torch.ones_like(big), -shift)
    return _map(lambda t: t * inv_t.to(t.dtype), tree), inv_t


_MAX_EXP: dict = {}  # dtype -> log2 of its largest finite value


def _stays_numpy(geometry: MetricOperator, *trees) -> bool:
    """Whether the core computes on these numpy inputs directly (the geometry has a numpy path and the inputs are
    small float32/float64 arrays; :func:`imuon_manopt._backend.native_numpy`) instead of converting them to torch."""
    if not getattr(geometry, "supports_numpy", False):
        return False
    leaves: list = []
    for tree in trees:
        if not _numpy_leaves(tree, leaves):
            return False
    return native_numpy(leaves)


def _numpy_leaves(tree, out: list) -> bool:
    """Append the numpy arrays of ``tree`` to ``out``; False as soon as a leaf is something else."""
    if isinstance(tree, np.ndarray):
        out.append(tree)
        return True
    if isinstance(tree, (list, tuple)):
        return all(_numpy_leaves(t, out) for t in tree)
    return False


def flat_covector(geometry: MetricOperator, x: Any, v: Any) -> Any:
    """``geometry.flat`` (the metric's lowering map, tangent vector -> Euclidean covector) at the point ``x``.

    numpy in, numpy out (computed in numpy where :func:`intrinsic_direction` would be, else through torch); torch
    tensors stay torch. Lists and tuples keep their structure.
    """
    if not (_is_numpy(x) or _is_numpy(v)):
        return geometry.flat(geometry.at(x), v)
    if _stays_numpy(geometry, x, v):
        return geometry.flat(geometry.at(x), v)
    c = geometry.flat(geometry.at(_to_torch(x)), _to_torch(v))
    return _map(lambda t: t.detach().cpu().numpy(), c)


def intrinsic_direction(
    geometry: MetricOperator,
    x: Any,
    egrad: Any,
    norm: str | tuple[str, Any] | Norm = "spectral",
    *,
    tau: float = 1.0,
    polar: str | dict[str, Any] | PolarSpec = "svd",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
    gap: bool = True,
    generator: torch.Generator | None = None,
    transform: Any = None,
) -> Direction:
    """The iMuon direction ``xi`` at ``x`` for the Euclidean gradient (or momentum) ``egrad``.

    Args:
        geometry: the metric operator, e.g. ``Stiefel()``, ``FixedRank()``, ``Product([...])``.
        x: the point, in the geometry's representation (see :mod:`imuon_manopt.geometry`); numpy or torch.
        egrad: the Euclidean gradient, same structure and shapes as ``x``.
        norm: a norm spec (:func:`imuon_manopt.lmo.resolve_norm`): ``"spectral"`` (default), ``"frobenius"``,
            ``"nuclear"``, ``("schatten", p)``, ``("kyfan", k)`` or ``("fmuon", alpha)``.
        tau: the LMO budget (``phi(Z) <= tau``); usually 1, with the step size absorbing it.
        polar: the LMO solver (:func:`imuon_manopt.lmo.resolve_polar`): ``"svd"`` (exact, eigh for symmetric
            blocks), ``"newton_schulz"`` (fast; the spectral norm and F-Muon's polar part), ``"randomized"`` (the
            Ky Fan LMO by a range finder) or a dict ``{"method": ..., "steps", "dtype", "oversample",
            "power_iters"}``. Norms a method does not solve use the exact path.
        steps: Newton–Schulz iterations (default of :func:`imuon_manopt.lmo.polar`); overrides the dict's.
        dtype: working dtype of the Newton–Schulz path (e.g. ``torch.bfloat16``) or the randomized solver's
            matmuls; overrides the dict's.
        gap: compute the gap (default). ``False`` returns ``gap=None`` and skips the pass over the
            whitened gradient that the Newton–Schulz path needs for it (optimizers that only step).
        generator: the randomized solver's generator (default: none, the fixed
            :func:`imuon_manopt.lmo.gaussian_sketch`).
        transform: an input transform applied to each whitened block before its LMO (:mod:`imuon_manopt.
            transforms`; ``Z_b = LMO(h(H_b))``, the un-whitening unchanged), general blocks and max-rule norms
            only. Not an LMO of a norm: the gap is the achieved ``<E, xi>``. Which transforms keep a geometry's
            invariances is the caller's decision (MiMuon's switch keeps the fixed-rank gauge invariance: the
            whitened blocks change by orthogonal factors, which keep singular values).

    Returns:
        :class:`Direction` ``(xi, gap)``. ``xi`` has the structure, shapes, array type and dtype of ``x``. The
        geometry is evaluated in at least float32. With Newton–Schulz or the randomized solver the gap is the
        achieved ``<E, xi>``.
    """
    if not isinstance(geometry, MetricOperator):
        raise TypeError(f"geometry must be an imuon_manopt.geometry.MetricOperator, got {type(geometry).__name__}")
    nrm = resolve_norm(norm)
    spec = resolve_polar(polar)
    if type(tau) is not float and (isinstance(tau, bool) or not isinstance(tau, numbers.Real)) or not float(tau) >= 0:
        raise ValueError(f"tau must be a non-negative number, got {tau!r}")
    tau = float(tau)
    method = spec.method
    steps = spec.steps if steps is None else steps
    dtype = spec.dtype if dtype is None else resolve_polar({"method": method, "dtype": dtype}).dtype
    use_ns = method == "newton_schulz" and nrm.name in ("spectral", "fmuon")
    schedule = resolve_schedule(None, steps) if use_ns else None
    sketch = spec if method == "randomized" and nrm.name == "kyfan" else None
    spec_t = resolve_input_transform(transform)
    if spec_t is not None and nrm.joint:
        raise ValueError(
            f"transform={transform!r} needs a max-rule norm (spectral, nuclear, Ky Fan), got {nrm.spec!r}: a joint "
            "norm shares its budget by the blocks' dual norms, which a transformed block does not have"
        )
    if sketch is not None and dtype is not None:
        sketch = PolarSpec("randomized", None, dtype, sketch.oversample, sketch.power_iters)
    as_numpy = _is_numpy(x) or _is_numpy(egrad)
    x_leaves: list = []
    e_leaves: list = []
    if (
        as_numpy
        and schedule is None
        and sketch is None
        and spec_t is None
        and dtype is None
        and nrm.name in _NUMPY_NORMS
        and getattr(geometry, "supports_numpy", False)
        and _numpy_leaves(x, x_leaves)
        and _numpy_leaves(egrad, e_leaves)
        and native_numpy(x_leaves + e_leaves)
    ):
        # small numpy problems stay numpy: the same kernels, without torch's per-operation cost (_backend.py)
        return _numpy_template(geometry, x, egrad, x_leaves, e_leaves, nrm, tau, gap)
    xt, et = _to_torch(x), _to_torch(egrad)
    x_leaves, e_leaves = _leaves(xt), _leaves(et)
    out_dtype = x_leaves[0].dtype
    dtypes = {t.dtype for t in x_leaves} | {t.dtype for t in e_leaves}
    if isinstance(out_dtype, torch.dtype) and out_dtype in _LOW_PRECISION:
        xt = _map(lambda t: t.float(), xt)
        et = _map(lambda t: t.float(), et)
    elif any(t.dtype != out_dtype for t in e_leaves):
        et = _map(lambda t: astype(t, out_dtype), et)

    # The direction is invariant under a positive scaling of the gradient (and the gap scales with it): a huge (or
    # tiny) gradient is multiplied by a power of two (exact) so that it cannot overflow in the projection or
    # whitening, and the gap is scaled back at the end.
    et, inv_scale = _prescale(et)
    state = geometry.at(xt)
    blocks = geometry.whiten(state, geometry.project(state, et))
    structure, ranks = _block_layout(geometry, state, blocks)
    # The rank cut follows the precision the inputs were rounded to, not the working dtype.
    eps = max(finfo(in_dtype).eps for in_dtype in dtypes)
    # Leaves are torch tensors or numpy arrays (small numpy inputs stay numpy: imuon_manopt._backend).
    zs: list[Any] = []
    duals: list[Any] = []
    kinds: list[str] = []
    hs: list[Any] = []
    z: Any
    d: Any
    fmuon = nrm.name == "fmuon"
    need_duals = gap or (nrm.joint and not fmuon)  # a joint norm splits its budget by the blocks' duals
    for h, kind, rank in zip(blocks, structure, ranks):
        symmetric = kind == "symmetric"
        if symmetric:
            check_square(h, "h")
        elif method == "eigh":
            raise ValueError(f"polar='eigh' needs symmetric blocks; {geometry!r} has a {kind} block: use 'svd'")
        h_numpy = isinstance(h, np.ndarray)
        if numel(h) == 0:
            if h_numpy:
                z, d = np.zeros_like(h), np.zeros(h.shape[:-2], dtype=h.dtype)
            else:
                z, d = torch.zeros_like(h), torch.zeros(h.shape[:-2], dtype=h.dtype, device=h.device)
        else:  # the LMO kernel: the arguments were validated once above
            work = h.dtype if h_numpy else exact_dtype(h, None if sketch is not None else dtype)
            hw = astype(h, work)
            if spec_t is not None:
                if kind != "general" or h_numpy:
                    raise ValueError(
                        f"transform={transform!r} applies to general blocks; {geometry!r} has a {kind} block, whose "
                        "symmetry or skewness (tangency) the transform would break"
                    )

                ns_work = dtype if dtype is not None else promote(h.dtype)

                def block_lmo(t: torch.Tensor, ns_work: torch.dtype = ns_work, rank: int | None = rank) -> torch.Tensor:
                    return lmo_tensor(
                        t, nrm, symmetric=False, schedule=schedule, ns_work=ns_work, return_dual=False, rank=rank,
                        eps=eps, sketch=sketch, generator=generator,
                    )[0]  # fmt: skip

                z = transformed_lmo(hw, spec_t, block_lmo)[0]
                d = (hw * z).sum(dim=(-2, -1)) if need_duals else None  # the achieved <H, Z>
                zs.append(astype(z, h.dtype))
                kinds.append(kind)
                duals.append(None if d is None else astype(d, h.dtype))
                continue
            z, d = lmo_tensor(
                hw,
                SPECTRAL if fmuon else nrm,  # F-Muon: the polar part here, the joint Frobenius part below
                symmetric=symmetric,
                schedule=schedule,
                ns_work=None if h_numpy else (dtype if dtype is not None else promote(h.dtype)),
                return_dual=need_duals,
                rank=rank,
                eps=eps,
                sketch=sketch,
                generator=generator,
            )
            if fmuon:
                hs.append(sym(hw).to(h.dtype) if symmetric else h)
            z = astype(z, h.dtype)
        zs.append(z)
        kinds.append(kind)
        duals.append(None if d is None else astype(d, h.dtype))

    if fmuon:  # Z_b = alpha polar(H_b) + (1 - alpha) H_b / ||H||_F (joint), then the budget and skew parts
        alpha = float(nrm.alpha)  # type: ignore[arg-type]
        fro: Any = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(hb) for hb in hs])) if hs else None
        it = iter(hs)
        zs = [z if z.numel() == 0 else fmuon_mix(z, next(it), fro, alpha) for z in zs]
    fmuon_total = None
    if fmuon and gap:
        fmuon_total = alpha * sum(d.sum() for d in duals) + (1.0 - alpha) * (fro if fro is not None else 0.0)
    return _assemble(geometry, state, zs, duals, kinds, nrm, tau, gap, inv_scale, out_dtype, as_numpy, fmuon_total)


def _block_layout(geometry: MetricOperator, state: Any, blocks: tuple) -> tuple[tuple[str, ...], tuple]:
    """``(structure, ranks)`` of the whitened blocks: the geometry's declared structure (checked: one entry per block,
    each a known kind) and per block the rank bound of the LMO's rank cut (the geometry's, and for a skew block at
    most its even part: a skew matrix has even rank)."""
    structure = geometry.structure
    if len(structure) != len(blocks) or not set(structure) <= _STRUCTURES:
        raise ValueError(
            f"{geometry!r} declares structure {tuple(structure)} for {len(blocks)} blocks; expected one entry per "
            f"block from {sorted(_STRUCTURES)}"
        )
    ranks = geometry.block_ranks(state)
    if ranks is None:
        ranks = (None,) * len(blocks)
    if "skew" in structure:
        ranks = tuple(
            _skew_rank(h, rank) if kind == "skew" else rank for h, kind, rank in zip(blocks, structure, ranks)
        )
    return tuple(structure), ranks


def _skew_rank(h: Any, rank: int | None) -> int:
    side = h.shape[-1] - h.shape[-1] % 2
    return side if rank is None else min(rank, side)


def _assemble(
    geometry: MetricOperator,
    state: Any,
    zs: list[Any],
    duals: list[Any],
    kinds: list[str] | tuple[str, ...],
    nrm: Norm,
    tau: float,
    gap: bool,
    inv_scale: Any,
    out_dtype: Any,
    as_numpy: bool,
    fmuon_total: Any = None,
) -> Direction:
    """The template's last steps, shared by both routes: the budget, the skew parts, the block rule's gap (F-Muon's
    ``fmuon_total`` from the caller) and the joint norms' budget split, then un-whitening and assembly in the
    geometry's representation, in ``out_dtype``."""
    if tau != 1.0:
        zs = [z * tau for z in zs]
    zs = [skew(z) if kind == "skew" else z for z, kind in zip(zs, kinds)]

    value: Any  # the LMO gap, or None
    total: Any
    if nrm.name == "fmuon":
        value = tau * fmuon_total / inv_scale if gap else None
    elif nrm.joint:
        q = nrm.q
        xp = namespace(zs[0])
        if xp is np:  # numpy's norm does not rescale: divide by the largest dual first (the duals may be ~1e300)
            flat = np.concatenate([np.reshape(d, -1) for d in duals])
            big = float(np.abs(flat).max()) if flat.size else 0.0
            total = big * np.linalg.vector_norm(flat / big, ord=q) if 0.0 < big < math.inf else np.linalg.norm(flat, q)
        else:
            total = torch.linalg.vector_norm(torch.cat([d.reshape(-1) for d in duals]), ord=q)
        safe = xp.where(total > 0, total, xp.ones_like(total))
        zs = [z * astype(((d / safe) ** (q - 1))[..., None, None], z.dtype) for z, d in zip(zs, duals)]
        value = tau * total / inv_scale if gap else None
    elif gap:
        value = tau * sum(d if d.ndim == 0 else d.sum() for d in duals) / inv_scale
    else:
        value = None

    xi = geometry.tangent(state, geometry.unwhiten(state, tuple(zs)))
    xi_leaves = _leaves(xi)
    if any(t.dtype != out_dtype for t in xi_leaves):
        xi = _map(lambda t: astype(t, out_dtype), xi)
    if isinstance(xi_leaves[0], np.ndarray):
        return Direction(xi, None if value is None else float(value))
    if as_numpy:
        return Direction(_map(lambda t: t.detach().cpu().numpy(), xi), None if value is None else float(value))
    return Direction(xi, value)


_NP_EPS = {np.dtype(np.float32): float(np.finfo(np.float32).eps), np.dtype(np.float64): float(np.finfo(np.float64).eps)}


def _numpy_template(
    geometry: MetricOperator, x: Any, egrad: Any, x_leaves: list, e_leaves: list, nrm: Norm, tau: float, gap: bool
) -> Direction:
    """The template on small float32/float64 numpy inputs (exact LMO, no input transform, no F-Muon or Ky Fan: the
    caller checked): the same steps and kernels as the torch route (:func:`_prescale`, the geometry's operations,
    :func:`imuon_manopt.lmo.lmo_tensor`, :func:`_assemble`), without its dtype promotion, solver dispatch and
    transform handling, which cost more than the arithmetic on such inputs."""
    out_dtype = x_leaves[0].dtype
    eps = max(_NP_EPS[t.dtype] for t in (*x_leaves, *e_leaves))  # the rank cut follows the inputs' rounding
    if any(t.dtype != out_dtype for t in e_leaves):
        egrad = _map(lambda t: astype(t, out_dtype), egrad)
    et, inv_scale = _prescale(egrad, host=True)
    state = geometry.at(x)
    blocks = geometry.whiten(state, geometry.project(state, et))
    structure, ranks = _block_layout(geometry, state, blocks)
    need_duals = gap or nrm.joint
    zs: list[Any] = []
    duals: list[Any] = []
    z: Any
    d: Any
    h: Any
    for h, kind, rank in zip(blocks, structure, ranks):
        symmetric = kind == "symmetric"
        if symmetric:
            check_square(h, "h")
        if h.size == 0:
            z, d = np.zeros_like(h), np.zeros(h.shape[:-2], dtype=h.dtype)
        else:
            z, d = lmo_tensor(
                h, nrm, symmetric=symmetric, schedule=None, ns_work=None, return_dual=need_duals, rank=rank, eps=eps
            )
        zs.append(astype(z, h.dtype))
        duals.append(None if d is None else astype(d, h.dtype))
    return _assemble(geometry, state, zs, duals, structure, nrm, tau, gap, inv_scale, out_dtype, True)
