"""Linear minimization oracles (LMOs) of unitarily invariant matrix norms (spec §1, step 3).

For ``H = U diag(s) V^T`` and a norm ``phi`` with budget ``tau``, the LMO is

    Z = argmax { <H, Z> : phi(Z) <= tau } = U diag(z*) V^T,   <H, Z> = tau * phi_dual(H),

- spectral (``p = inf``): ``Z = tau * U V^T`` (the polar factor; rank-aware), dual = nuclear norm;
- Frobenius (``p = 2``): ``Z = tau * H / ||H||_F``, dual = Frobenius norm;
- nuclear (``p = 1``): ``Z = tau * u_1 v_1^T`` (a top singular pair), dual = spectral norm;
- Schatten-p (``1 < p < inf``, ``1/p + 1/q = 1``): ``z* = tau * s^(q-1) / ||s||_q^(q-1)``, dual =
  Schatten-q.

The symmetric variants (``symmetric=True``, for SPD-type blocks) maximize over symmetric ``Z`` and
use ``eigh`` of ``sym(H) = Q diag(lambda) Q^T``: the singular values are ``|lambda|`` and each
direction keeps the sign of its eigenvalue (spectral: ``Z = tau * Q sign(Lambda) Q^T``, the matrix
sign).

All functions work per matrix over the trailing two dims of ``(..., m, n)``; the leading dims are a
batch. A zero matrix gives ``Z = 0`` and dual 0. Singular values (eigenvalue magnitudes) below
``eps * max(m, n) * s_max`` give no direction (for half-precision inputs, also those below the input
dtype's ``eps * s_max``: its rounding noise). numpy in -> numpy out; torch tensors keep their
device and dtype (half-precision inputs are computed in float32). :func:`polar` and :func:`msign`
are re-exported from :mod:`imuon_manopt.polar`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._backend import from_torch, to_torch
from .geometry.base import sym
from .polar import (
    Coefficients,
    _as_dtype,
    _check_eps,
    _check_matrix,
    _check_rank,
    _check_square,
    _eigh_parts,
    _exact_dtype,
    _finite_or_zero,
    _is_vector,
    _max_abs,
    _newton_schulz,
    _promote,
    _resolve_schedule,
    _svd_parts,
    _vector_parts,
    msign,
    polar,
)

__all__ = ["Norm", "resolve_norm", "lmo", "dual_norm", "polar", "msign", "NORMS"]

#: Accepted norm names (case-insensitive); "schatten" needs ``p``.
NORMS = ("spectral", "frobenius", "nuclear", "schatten")
_LMO_METHODS = ("svd", "eigh", "newton_schulz")
_FIXED_P = {"spectral": math.inf, "frobenius": 2.0, "nuclear": 1.0}


@dataclass(frozen=True)
class Norm:
    """A resolved unitarily invariant norm.

    Attributes:
        name: ``"spectral"``, ``"frobenius"``, ``"nuclear"`` or ``"schatten"`` (only for ``1 < p <
            inf``, ``p != 2``).
        p: the Schatten exponent of the norm (spectral ``inf``, Frobenius 2, nuclear 1).
        q: the dual exponent, ``1/p + 1/q = 1``.
        joint: True when blocks combine jointly (Frobenius, Schatten ``1 < p < inf``); False for the
            max rule (spectral, nuclear).
    """

    name: str
    p: float
    q: float
    joint: bool


def _dual_exponent(p: float) -> float:
    if p == 1.0:
        return math.inf
    if math.isinf(p):
        return 1.0
    return p / (p - 1.0)


def _make_norm(name: str, p: float) -> Norm:
    return Norm(name=name, p=p, q=_dual_exponent(p), joint=name in ("frobenius", "schatten"))


def _check_p(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise ValueError(f"p must be a real number with 1 <= p <= inf, got {p!r}")
    pf = float(p)
    if not pf >= 1.0:  # also rejects NaN
        raise ValueError(f"p must satisfy 1 <= p <= inf, got {p!r}")
    return pf


def resolve_norm(norm: str | Norm, p: float | None = None) -> Norm:
    """Resolve a norm name (case-insensitive) and optional Schatten exponent ``p`` to a
    :class:`Norm`.

    ``"schatten"`` needs ``p`` (``1 <= p <= inf``) and maps ``p = 1, 2, inf`` to nuclear, Frobenius,
    spectral. For the other names ``p`` may be omitted or must equal the name's own exponent (inf,
    2, 1). A :class:`Norm` is returned as is.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), a missing or out-of-range
            ``p``, or a ``p`` that contradicts the name.
        TypeError: ``norm`` is neither a string nor a :class:`Norm`.
    """
    if isinstance(norm, Norm):
        if p is not None and _check_p(p) != norm.p:
            raise ValueError(f"p={p!r} contradicts the given {norm}")
        return norm
    if not isinstance(norm, str):
        raise TypeError(f"norm must be a string (one of {list(NORMS)}) or a Norm, got {type(norm).__name__}")
    name = norm.strip().lower()
    if name not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid choices: {list(NORMS)} (schatten with p)")
    if name == "schatten":
        if p is None:
            raise ValueError("norm='schatten' needs p, with 1 <= p <= inf (p=1 nuclear, 2 Frobenius, inf spectral)")
        pf = _check_p(p)
        if pf == 1.0:
            return _make_norm("nuclear", 1.0)
        if pf == 2.0:
            return _make_norm("frobenius", 2.0)
        if math.isinf(pf):
            return _make_norm("spectral", math.inf)
        return _make_norm("schatten", pf)
    if p is not None and _check_p(p) != _FIXED_P[name]:
        raise ValueError(
            f"p={p!r} contradicts norm={norm!r} (its exponent is {_FIXED_P[name]}); use norm='schatten' with p"
        )
    return _make_norm(name, _FIXED_P[name])


# --------------------------------------------------------------------------------------------------


def _tau_tensor(tau: Any, batch: torch.Size, work: torch.dtype, device: torch.device) -> torch.Tensor | float:
    """tau -> (..., 1, 1) tensor in ``work`` broadcastable to ``batch + (1, 1)``; a number stays a
    Python float (no tensor is created for the common scalar budget)."""
    if isinstance(tau, (torch.Tensor, np.ndarray)):
        tt, _ = to_torch(tau)
        try:
            shape = torch.broadcast_shapes(tt.shape, batch)
        except RuntimeError:
            shape = None
        if shape != batch:
            raise ValueError(f"tau of shape {tuple(tt.shape)} does not broadcast to the batch shape {tuple(batch)}")
        tt = tt.to(device=device, dtype=work)
        if bool(torch.any(~(tt >= 0))):
            raise ValueError("tau must be >= 0 (and not NaN)")
        return tt[..., None, None]
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not float(tau) >= 0:
        raise ValueError(f"tau must be a non-negative number or a tensor broadcastable to the batch, got {tau!r}")
    return float(tau)


def _singular_lmo(s: torch.Tensor, keep: torch.Tensor, nrm: Norm) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector LMO on scaled singular values ``s`` (..., k); ``keep`` masks the numerical rank.

    Returns ``(z, dual)`` with ``phi_vec(z) = 1`` (or ``z = 0``) and ``dual = phi_dual(s)`` (the
    true dual, over all values).
    """
    mask = keep.to(s.dtype)
    if nrm.name == "spectral":
        return mask, s.sum(dim=-1)
    smax = s.amax(dim=-1, keepdim=True)
    if nrm.name == "nuclear":
        idx = s.argmax(dim=-1, keepdim=True)
        z = torch.zeros_like(s).scatter(-1, idx, torch.gather(mask, -1, idx))
        return z, smax.squeeze(-1)
    # Schatten-p with 1 < p < inf: work with r = s / s_max in [0, 1] so that r^(q-1) can neither
    # overflow nor, for the leading value, underflow.
    q = nrm.q
    safe = torch.where(smax > 0, smax, torch.ones_like(smax))
    r = s / safe
    rk = r * mask
    denom = torch.linalg.vector_norm(rk, ord=q, dim=-1, keepdim=True)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    z = (rk / denom) ** (q - 1.0)
    dual = smax.squeeze(-1) * torch.linalg.vector_norm(r, ord=q, dim=-1)
    return z, dual


def _lmo_tensor(
    x: torch.Tensor,
    nrm: Norm,
    *,
    symmetric: bool,
    schedule: tuple | None,
    ns_work: torch.dtype,
    return_dual: bool,
    rank: int | None,
    eps: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LMO kernel with budget 1 on a validated, non-empty ``x`` (..., m, n) in the working dtype: no
    conversion, no checks (the caller, :func:`lmo` or the direction template, did them once).

    ``schedule`` is ``(coefficients, margin)`` for the Newton–Schulz path (spectral norm only), else ``None``.
    Returns ``(Z, dual)`` in ``x``'s dtype; ``dual`` is ``None`` only for Newton–Schulz without ``return_dual``.
    """
    if symmetric:
        x = sym(x)
    if _is_vector(x):  # one singular value: every norm's LMO is the normalization
        z, nrm_x = _vector_parts(x)
        if rank == 0:
            z = torch.zeros_like(z)
        return z, nrm_x[..., 0, 0]
    if nrm.name == "frobenius":
        scale = _max_abs(x)
        y = x / scale
        f = torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True)
        return y / torch.where(f > 0, f, torch.ones_like(f)), (f * scale)[..., 0, 0]
    if schedule is not None:
        z = _newton_schulz(x, schedule[0], schedule[1], ns_work).to(x.dtype)
        if not return_dual:
            return z, None
        scale = _max_abs(x)  # the achieved <H, Z>, only when asked (it costs a pass over H)
        return z, ((x / scale) * z).sum(dim=(-2, -1)) * scale[..., 0, 0]
    if symmetric:
        q, lam, scale, keep = _eigh_parts(x, eps=eps, rank=rank)
        zv, dual = _singular_lmo(lam.abs(), keep, nrm)
        return (q * (torch.sign(lam) * zv).unsqueeze(-2)) @ q.mT, dual * scale[..., 0, 0]
    u, s, vh, scale, keep = _svd_parts(x, eps=eps, rank=rank)
    zv, dual = _singular_lmo(s, keep, nrm)
    return (u * zv.unsqueeze(-2)) @ vh, dual * scale[..., 0, 0]


def lmo(
    h: Any,
    norm: str | Norm = "spectral",
    *,
    p: float | None = None,
    tau: Any = 1.0,
    symmetric: bool = False,
    method: str = "svd",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
    return_dual: bool = False,
    coefficients: Coefficients = None,
    rank: int | None = None,
    eps: float | None = None,
) -> Any:
    """The LMO ``Z = argmax {<H, Z> : phi(Z) <= tau}``, per matrix over the last two dims.

    Args:
        h: ``(..., m, n)`` numpy array or torch tensor, real floating dtype (``(..., n, n)`` if
            ``symmetric``).
        norm: ``"spectral"`` (default), ``"frobenius"``, ``"nuclear"``, ``"schatten"`` (with ``p``)
            or a :class:`Norm`; see :func:`resolve_norm`.
        p: Schatten exponent, ``1 <= p <= inf``.
        tau: the budget, ``>= 0``: a number, or a tensor/array broadcastable to the batch shape
            ``h.shape[:-2]``.
        symmetric: maximize over symmetric ``Z`` using ``eigh`` of ``sym(H)`` (only the symmetric
            part of ``h`` matters then).
        method: how the spectral LMO orthogonalizes: ``"svd"`` (exact; ``eigh`` when ``symmetric``),
            ``"eigh"`` (exact, only with ``symmetric=True``), or ``"newton_schulz"`` (approximate
            polar factor / matrix sign, see :func:`imuon_manopt.polar.polar`). The other norms
            always use the exact decomposition.
        steps, dtype, coefficients: Newton–Schulz controls, as in :func:`imuon_manopt.polar.polar`.
            ``dtype`` also sets the exact path's working dtype (promoted to at least float32).
        return_dual: also return the dual norm of each matrix.
        rank, eps: a known upper bound on the rank of every matrix and the unit round-off the input
            carries, for the exact paths' rank cut (see :func:`imuon_manopt.polar.polar`; default: no
            bound, the input dtype's epsilon). The dual is always over all singular values.

    A vector-shaped ``h`` (``m == 1`` or ``n == 1``, or ``1 x 1`` when ``symmetric``) has one singular
    value, its 2-norm, so every norm's LMO is ``tau * h / ||h||`` (dual ``||h||``), computed directly
    with either method. Huge finite inputs neither overflow nor fail (every path divides by the max-abs
    entry first); a matrix with a NaN or infinite entry gives NaN (never a solver error).

    Returns:
        ``Z`` of shape ``(..., m, n)`` (same array type, device and dtype as ``h``), or the pair
        ``(Z, dual)`` with ``dual`` of shape ``h.shape[:-2]`` (same type and dtype);
        ``dual = phi_dual(H)``, so ``<H, Z> = tau * dual``. With ``method="newton_schulz"`` the
        spectral ``dual`` is the achieved value ``<H, Z> / tau``, which approximates the nuclear
        norm to the accuracy of the iteration.

    Raises:
        ValueError: bad ``norm``/``p``, ``method``, ``tau``, ``steps``, ``dtype``, ``coefficients``,
            or shape.
        TypeError: ``h`` is not a numpy array / torch tensor, or not real floating point.
    """
    nrm = resolve_norm(norm, p)
    if method not in _LMO_METHODS:
        raise ValueError(f"unknown method {method!r} for lmo; valid choices: {list(_LMO_METHODS)}")
    if method == "eigh" and not symmetric:
        raise ValueError("method='eigh' needs symmetric=True; use method='svd' for general matrices")
    t, was_numpy = to_torch(h)
    _check_matrix(t, "h")
    if symmetric:
        _check_square(t, "h")
    dtype = _as_dtype(dtype)
    rank = _check_rank(rank)
    eps = _check_eps(eps, t)
    use_ns = method == "newton_schulz" and nrm.name == "spectral"
    schedule = _resolve_schedule(coefficients, steps) if use_ns else None
    work = _exact_dtype(t, dtype)
    out_dtype = t.dtype
    batch = t.shape[:-2]
    tau_t = _tau_tensor(tau, batch, work, t.device)

    if t.numel() == 0:
        z = torch.zeros_like(t)
        dual = torch.zeros(batch, dtype=out_dtype, device=t.device)
    else:
        ns_work = dtype if dtype is not None else _promote(t.dtype)
        z, dual = _lmo_tensor(
            t.to(work),
            nrm,
            symmetric=symmetric,
            schedule=schedule if use_ns else None,
            ns_work=ns_work,
            return_dual=return_dual,
            rank=rank,
            eps=eps,
        )
        if not (isinstance(tau_t, float) and tau_t == 1.0):
            z = z * tau_t
        z = z.to(out_dtype).contiguous()
        dual = None if dual is None else dual.to(out_dtype)
    z = from_torch(z, was_numpy)
    if return_dual:
        return z, from_torch(dual, was_numpy)
    return z


def dual_norm(h: Any, norm: str | Norm = "spectral", *, p: float | None = None, symmetric: bool = False) -> Any:
    """The dual norm ``phi_dual(H)`` per matrix, equal to ``<H, lmo(H)> / tau``.

    spectral -> nuclear, Frobenius -> Frobenius, nuclear -> spectral, Schatten-p -> Schatten-q
    (``1/p + 1/q = 1``).

    Args:
        h: ``(..., m, n)`` numpy array or torch tensor, real floating dtype.
        norm, p: the primal norm, as in :func:`resolve_norm`.
        symmetric: the dual over symmetric matrices, i.e. of ``sym(H)`` (``h`` must be square).

    Returns:
        shape ``h.shape[:-2]``, same array type, device and dtype as ``h`` (computed in at least
        float32, scaled so that huge or tiny entries neither overflow nor underflow).
    """
    nrm = resolve_norm(norm, p)
    t, was_numpy = to_torch(h)
    _check_matrix(t, "h")
    if symmetric:
        _check_square(t, "h")
    if t.numel() == 0:
        return from_torch(torch.zeros(t.shape[:-2], dtype=t.dtype, device=t.device), was_numpy)
    x = t.to(_promote(t.dtype))
    if symmetric:
        x = sym(x)
    scale = _max_abs(x)
    y = x / scale
    if nrm.name == "frobenius":
        d = torch.linalg.vector_norm(y, dim=(-2, -1))
    else:
        y, mask = _finite_or_zero(y, scale)  # a non-finite matrix has a NaN dual, not a solver error
        s = (torch.linalg.eigvalsh(y).abs() if symmetric else torch.linalg.svdvals(y)) * mask[..., 0]
        d = _singular_lmo(s, torch.ones_like(s, dtype=torch.bool), nrm)[1]  # the dual, over all s
    return from_torch((d * scale[..., 0, 0]).to(t.dtype), was_numpy)
