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

from ._backend import astype, from_torch, namespace, to_torch
from .geometry.base import sym
from .polar import (
    Coefficients,
    as_dtype,
    check_eps,
    check_matrix,
    check_rank,
    check_square,
    eigh_parts,
    exact_dtype,
    finite_or_zero,
    fro_norm,
    is_vector,
    max_abs,
    msign,
    newton_schulz,
    polar,
    promote,
    rank_tol,
    resolve_schedule,
    svd_parts,
    vector_parts,
)

__all__ = [
    "Norm",
    "PolarSpec",
    "resolve_norm",
    "resolve_polar",
    "kyfan_factors",
    "gaussian_sketch",
    "lmo",
    "dual_norm",
    "polar",
    "msign",
    "NORMS",
    "POLAR_METHODS",
]

#: Accepted norm names (case-insensitive). "schatten", "kyfan" and "fmuon" take a parameter: ``(name, parameter)``.
NORMS = ("spectral", "frobenius", "nuclear", "schatten", "kyfan", "fmuon")
_PARAM_NORMS = {"schatten": "p", "kyfan": "k", "fmuon": "alpha"}
#: LMO solvers (``polar=``): exact SVD (eigh for symmetric blocks), Newton–Schulz (spectral and the F-Muon polar
#: part), and the randomized range finder for the Ky Fan LMO.
POLAR_METHODS = ("svd", "eigh", "newton_schulz", "randomized")
_LMO_METHODS = POLAR_METHODS
_FIXED_P = {"spectral": math.inf, "frobenius": 2.0, "nuclear": 1.0}
#: Defaults of the randomized Ky Fan solver: oversampling columns and power iterations.
DEFAULT_OVERSAMPLE = 8
DEFAULT_POWER_ITERS = 2


@dataclass(frozen=True)
class Norm:
    """A resolved unitarily invariant norm ``phi`` (the LMO maximizes ``<H, Z>`` over ``phi(Z) <= tau``).

    Attributes:
        name: ``"spectral"``, ``"frobenius"``, ``"nuclear"``, ``"schatten"`` (only for ``1 < p < inf``, ``p != 2``),
            ``"kyfan"`` (only for ``k >= 2``) or ``"fmuon"`` (only for ``0 < alpha < 1``).
        p: the Schatten exponent of the norm (spectral ``inf``, Frobenius 2, nuclear 1; NaN for Ky Fan and F-Muon).
        q: the dual exponent, ``1/p + 1/q = 1`` (NaN for Ky Fan and F-Muon).
        joint: True when blocks combine jointly (Frobenius, Schatten ``1 < p < inf``, and F-Muon's Frobenius part);
            False for the max rule (spectral, nuclear, Ky Fan).
        k: Ky Fan's rank: ``phi(Z) = max(||Z||_2, ||Z||_* / k)``, dual ``KF_k(H)`` (the sum of the ``k`` largest
            singular values), LMO ``U_k V_k^T``. ``None`` for the other norms.
        alpha: F-Muon's weight of the polar part: the ball is ``alpha B_spectral + (1 - alpha) B_Frobenius``, LMO
            ``alpha polar(H) + (1 - alpha) H / ||H||_F``, dual ``alpha ||H||_* + (1 - alpha) ||H||_F``. ``None``
            for the other norms.
    """

    name: str
    p: float
    q: float
    joint: bool
    k: int | None = None
    alpha: float | None = None

    @property
    def spec(self) -> str | tuple[str, float | int]:
        """The canonical spelling: a name, or a ``(name, parameter)`` pair."""
        if self.name == "schatten":
            return ("schatten", self.p)
        if self.name == "kyfan":
            return ("kyfan", self.k)  # type: ignore[return-value]
        if self.name == "fmuon":
            return ("fmuon", self.alpha)  # type: ignore[return-value]
        return self.name


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
        raise ValueError(f"the Schatten exponent p must be a real number with 1 <= p <= inf, got {p!r}")
    pf = float(p)
    if not pf >= 1.0:  # also rejects NaN
        raise ValueError(f"the Schatten exponent p must satisfy 1 <= p <= inf, got {p!r}")
    return pf


def _schatten(pf: float) -> Norm:
    if pf == 1.0:
        return _make_norm("nuclear", 1.0)
    if pf == 2.0:
        return _make_norm("frobenius", 2.0)
    if math.isinf(pf):
        return _make_norm("spectral", math.inf)
    return _make_norm("schatten", pf)


def _kyfan(k: Any) -> Norm:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"the Ky Fan rank k must be an int >= 1 (norm=('kyfan', k)), got {k!r}")
    if k == 1:  # the dual of the spectral norm's dual: one top singular pair
        return _make_norm("nuclear", 1.0)
    return Norm(name="kyfan", p=math.nan, q=math.nan, joint=False, k=int(k))


def _fmuon(alpha: Any) -> Norm:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(
            f"the F-Muon weight alpha must be a number in [0, 1] (norm=('fmuon', alpha): alpha on the polar part), "
            f"got {alpha!r}"
        )
    a = float(alpha)
    if a == 1.0:
        return _make_norm("spectral", math.inf)
    if a == 0.0:
        return _make_norm("frobenius", 2.0)
    return Norm(name="fmuon", p=math.nan, q=math.nan, joint=True, alpha=a)


def resolve_norm(norm: str | tuple[str, Any] | Norm) -> Norm:
    """Resolve a norm spec to a :class:`Norm`: a name or a ``(name, parameter)`` pair (names case-insensitive).

    - ``"spectral"``, ``"frobenius"``, ``"nuclear"``: no parameter;
    - ``("schatten", p)``, ``1 <= p <= inf`` (``p = 1, 2, inf`` resolve to nuclear, Frobenius, spectral);
    - ``("kyfan", k)``, an int ``k >= 1``: the dual Ky Fan ball ``max(||Z||_2, ||Z||_* / k) <= 1``, LMO
      ``U_k V_k^T`` (``k = 1`` resolves to nuclear; ``k >= min(m, n)`` gives the spectral LMO on that block);
    - ``("fmuon", alpha)``, ``0 <= alpha <= 1``: LMO ``alpha polar(H) + (1 - alpha) H / ||H||_F`` (``alpha = 1``
      resolves to spectral, ``0`` to Frobenius).

    A :class:`Norm` is returned as is.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), a missing, superfluous or out-of-range
            parameter.
        TypeError: ``norm`` is neither a string, a pair nor a :class:`Norm`.
    """
    if isinstance(norm, Norm):
        return norm
    param: Any = None
    has_param = False
    if isinstance(norm, (tuple, list)):
        if len(norm) != 2 or not isinstance(norm[0], str):
            raise ValueError(f"invalid norm={norm!r}: expected a name or a (name, parameter) pair such as ('kyfan', 8)")
        norm, param, has_param = norm[0], norm[1], True
    elif not isinstance(norm, str):
        raise TypeError(
            f"norm must be a name (one of {list(NORMS)}), a (name, parameter) pair or a Norm, got {type(norm).__name__}"
        )
    name = norm.strip().lower()
    if name not in NORMS:
        raise ValueError(
            f"unknown norm {norm!r}; valid choices: 'spectral', 'frobenius', 'nuclear', ('schatten', p), "
            "('kyfan', k), ('fmuon', alpha)"
        )
    if name in _PARAM_NORMS:
        if not has_param:
            what = _PARAM_NORMS[name]
            raise ValueError(f"norm={name!r} needs its parameter: write norm=({name!r}, {what})")
        if name == "schatten":
            return _schatten(_check_p(param))
        if name == "kyfan":
            return _kyfan(param)
        return _fmuon(param)
    if has_param:
        raise ValueError(f"norm {name!r} takes no parameter; write norm={name!r}, not ({name!r}, {param!r})")
    return _make_norm(name, _FIXED_P[name])


@dataclass(frozen=True)
class PolarSpec:
    """A resolved LMO solver (``polar=``).

    Attributes:
        method: ``"svd"`` (exact; eigh for symmetric blocks; a Gram/eigh path for thin Ky Fan blocks),
            ``"eigh"`` (exact, symmetric blocks only), ``"newton_schulz"`` (the spectral LMO and F-Muon's polar
            part; the other norms use the exact path) or ``"randomized"`` (the Ky Fan LMO by a range finder; the
            other norms use the exact path).
        steps: Newton–Schulz iterations (``None``: the default, 5).
        dtype: Newton–Schulz working dtype, or the randomized solver's matmul dtype (``None``: the input's,
            at least float32).
        oversample: extra sketch columns of the randomized solver (default 8).
        power_iters: power iterations of the randomized solver (default 2).
    """

    method: str
    steps: int | None = None
    dtype: torch.dtype | None = None
    oversample: int = DEFAULT_OVERSAMPLE
    power_iters: int = DEFAULT_POWER_ITERS


_POLAR_KEYS = ("method", "steps", "dtype", "oversample", "power_iters")


def _nonneg_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"polar {name!r} must be an int >= 0, got {v!r}")
    return int(v)


def resolve_polar(polar: str | dict[str, Any] | PolarSpec) -> PolarSpec:
    """Resolve a solver spec: a method name, or a dict ``{"method": ..., "steps": 5, "dtype": ..., "oversample":
    8, "power_iters": 2}`` (every key but ``method`` optional). A :class:`PolarSpec` is returned as is.

    Raises:
        ValueError: an unknown method or key, or a bad value (the message names it).
    """
    if isinstance(polar, PolarSpec):
        return polar
    if isinstance(polar, str):
        opts: dict[str, Any] = {"method": polar}
    elif isinstance(polar, dict):
        extra = sorted(set(polar) - set(_POLAR_KEYS))
        if extra or "method" not in polar:
            raise ValueError(
                f"invalid polar={polar!r}: expected a method name or a dict with 'method' and optionally "
                f"{list(_POLAR_KEYS[1:])}" + (f" (unknown keys {extra})" if extra else "")
            )
        opts = dict(polar)
    else:
        raise ValueError(f"polar must be a method name {list(POLAR_METHODS)} or a dict, got {polar!r}")
    method = opts["method"]
    if method not in POLAR_METHODS:
        raise ValueError(f"unknown polar method {method!r}; valid choices: {list(POLAR_METHODS)}")
    steps = opts.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1):
        raise ValueError(f"polar 'steps' must be a positive int (Newton–Schulz iterations), got {steps!r}")
    return PolarSpec(
        method=method,
        steps=None if steps is None else int(steps),
        dtype=as_dtype(opts.get("dtype")),
        oversample=_nonneg_int("oversample", opts.get("oversample", DEFAULT_OVERSAMPLE)),
        power_iters=_nonneg_int("power_iters", opts.get("power_iters", DEFAULT_POWER_ITERS)),
    )


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


def _singular_lmo(s: Any, keep: Any, nrm: Norm) -> tuple[Any, Any]:
    """Vector LMO on scaled singular values ``s`` (..., k); ``keep`` masks the numerical rank.

    Returns ``(z, dual)`` with ``phi_vec(z) = 1`` (or ``z = 0``) and ``dual = phi_dual(s)`` (the
    true dual, over all values). Torch tensors or numpy arrays.
    """
    xp = namespace(s)
    mask = astype(keep, s.dtype)
    if nrm.name == "spectral":
        return mask, s.sum(-1)
    smax = xp.amax(s, axis=-1, keepdims=True)
    if nrm.name == "nuclear":
        if xp is np:
            idx = np.argmax(s, axis=-1, keepdims=True)
            z = np.zeros_like(s)
            np.put_along_axis(z, idx, np.take_along_axis(mask, idx, axis=-1), axis=-1)
        else:
            idx = s.argmax(dim=-1, keepdim=True)
            z = torch.zeros_like(s).scatter(-1, idx, torch.gather(mask, -1, idx))
        return z, smax[..., 0]
    if nrm.name == "kyfan":  # the k largest values (ties: the first in order), within the numerical rank (torch only)
        top = s.topk(min(int(nrm.k), s.shape[-1]), dim=-1)  # type: ignore[arg-type]
        z = torch.zeros_like(s).scatter(-1, top.indices, torch.gather(mask, -1, top.indices))
        return z, top.values.sum(dim=-1)
    # Schatten-p with 1 < p < inf: work with r = s / s_max in [0, 1] so that r^(q-1) can neither
    # overflow nor, for the leading value, underflow.
    q = nrm.q
    safe = xp.where(smax > 0, smax, xp.ones_like(smax))
    r = s / safe
    rk = r * mask
    denom = xp.linalg.vector_norm(rk, ord=q, axis=-1, keepdims=True)
    denom = xp.where(denom > 0, denom, xp.ones_like(denom))
    z = (rk / denom) ** (q - 1.0)
    dual = smax[..., 0] * xp.linalg.vector_norm(r, ord=q, axis=-1)
    return z, dual


SPECTRAL = _make_norm("spectral", math.inf)
# Exact Ky Fan on a thin block (long side >= _KF_GRAM_ASPECT times the short one, k below the short side) runs on the
# short side's Gram matrix in float64: cheaper than a thin SVD and, in float64, equal to it to ~1e-12 on
# gradient-like spectra (the Gram matrix squares the condition number; its cut is at sqrt(eps64) relative).
_KF_GRAM_ASPECT = 4


def fmuon_mix(z_polar: torch.Tensor, h: torch.Tensor, fro: torch.Tensor, alpha: float) -> torch.Tensor:
    """F-Muon's LMO ``alpha polar(H) + (1 - alpha) H / ||H||_F`` from the polar part ``z_polar`` and the Frobenius
    norm ``fro`` (broadcastable to ``h``; the joint norm of every block for a product, zero gives a zero part)."""
    safe = torch.where(fro > 0, fro, torch.ones_like(fro))
    return alpha * z_polar + (1.0 - alpha) * (h / safe)


def _kyfan_gram(x: torch.Tensor, k: int, eps: float | None, rank: int | None):
    """Exact top-k factors of a thin ``x`` (..., m, n) from the Gram matrix of its short side (float64): with
    ``X^T X = V diag(lam) V^T`` (``n <= m``), ``P = X V_k diag(lam_k)^(-1/2)`` and ``U_k V_k^T = P V_k^T``.
    Returns ``(P, V_k^T, KF_k(X))`` in ``x``'s orientation."""
    transpose = x.shape[-2] < x.shape[-1]
    y = x.mT if transpose else x
    scale = max_abs(y)
    yf, bad = finite_or_zero(y / scale, scale)  # a non-finite matrix gives NaN, not a solver error
    y64 = yf.to(torch.float64)
    lam, vec = torch.linalg.eigh(y64.mT @ y64)  # ascending
    lam = lam.flip(-1).clamp_min(0.0)
    vec = vec.flip(-1)
    kk = min(k, lam.shape[-1])
    lam_k, v_k = lam[..., :kk], vec[..., :kk]
    tol = rank_tol(max(x.shape[-2:]), eps, x.dtype)
    # eigh's round-off on the Gram matrix is ~ n eps64 lam_max: below that no eigenvalue is a direction
    cut = max(tol * tol, 8 * lam.shape[-1] * torch.finfo(torch.float64).eps)
    keep = lam_k > cut * lam[..., :1]
    if rank is not None:
        keep = keep & (torch.arange(kk, device=x.device) < rank)
    sig = lam_k.sqrt()
    inv = torch.where(keep, 1.0 / torch.where(keep, sig, torch.ones_like(sig)), torch.zeros_like(sig))
    left = ((y64 @ v_k) * inv.unsqueeze(-2)).to(x.dtype) * bad
    right = v_k.mT.to(x.dtype)
    dual = sig.sum(dim=-1).to(x.dtype) * (scale * bad)[..., 0, 0]
    return (right.mT, left.mT, dual) if transpose else (left, right, dual)


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function on int64 tensors holding values in [0, 2^32) (xor-shift-multiply rounds with
    multipliers below 2^31, so no product leaves int64): the same bits on every device."""
    for mult in (0x7FEB352D, 0x46F4A3B1, 0x2C1B3C6D):
        x = x ^ (x >> 16)
        x = (x * mult) & _MASK32
    return x ^ (x >> 15)


_SKETCHES: dict[tuple, torch.Tensor] = {}
_SKETCH_CACHE_SIZE = 16


def gaussian_sketch(rows: int, cols: int, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The randomized solver's test matrix: ``rows x cols`` standard normal entries, a fixed function of the entry's
    position (a counter-based hash, then Box–Muller), so the same on every call, rank and device type, with no
    random-number state: the step is deterministic, identical across data-parallel ranks, and can be compiled or
    captured in a CUDA graph. Row ``i`` does not depend on ``rows``, so a rank holding rows ``a .. b`` of a sharded
    matrix takes rows ``a .. b`` of this matrix. Eager calls keep the last few in a cache (read-only: never write to
    the result)."""
    device = torch.device(device)
    key = (rows, cols, dtype, device.type, device.index)
    compiling = torch.compiler.is_compiling()
    if not compiling and key in _SKETCHES:  # eager steps reuse it (compiled steps fuse its few elementwise ops)
        return _SKETCHES[key]
    i = torch.arange(rows, device=device, dtype=torch.int64)[:, None]
    j = torch.arange(cols, device=device, dtype=torch.int64)[None, :]
    idx = (
        i * 0x10000 + j
    ) & _MASK32  # distinct for cols < 2^16 and rows < 2^16 (beyond: a different pattern, still valid)
    h1 = _hash32(idx ^ 0x5BD1E995)
    h2 = _hash32(h1 ^ 0x1B873593)
    u1 = (h1.to(torch.float64) + 0.5) / 2.0**32  # in (0, 1)
    u2 = (h2.to(torch.float64) + 0.5) / 2.0**32
    out = (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)
    if not compiling:
        if len(_SKETCHES) >= _SKETCH_CACHE_SIZE:
            _SKETCHES.pop(next(iter(_SKETCHES)))
        _SKETCHES[key] = out
    return out


def _kyfan_randomized(
    x: torch.Tensor,
    k: int,
    oversample: int,
    power_iters: int,
    mm_dtype: torch.dtype | None,
    eps: float | None,
    rank: int | None,
    generator: torch.Generator | None,
):
    """Randomized Ky Fan LMO of ``x`` (..., m, n): a range finder ``Q`` (``l = k + oversample`` columns, on the
    short side, with ``power_iters`` power iterations re-orthonormalized by QR), then the exact top-k LMO of the
    small ``Q^T X``: ``Z = Q U_k V_k^T`` with ``Q^T X = U S V^T``, truncated to ``k`` (the polar factor of the
    whole sketch would leave the dual Ky Fan ball). ``Z`` is always feasible (``||Z||_2 <= 1``, rank ``<= k``).

    The matmuls run in ``mm_dtype`` (default: ``x``'s), QR and SVD in ``x``'s dtype. The Gaussian test matrix is
    drawn from ``generator``, or by default is :func:`gaussian_sketch` (a fixed function of the position, so the
    result is deterministic, the same on every data-parallel rank, and compiles without graph breaks). Returns
    ``(Z, KF_k(Q^T X))``: the achieved ``<X, Z>``, a lower bound
    of ``KF_k(X)``."""
    transpose = x.shape[-2] > x.shape[-1]
    y = x.mT if transpose else x  # (..., s, L), s <= L: the range of the short side
    s_dim, l_dim = y.shape[-2:]
    ell = min(k + oversample, s_dim)
    scale = max_abs(y)
    y, bad = finite_or_zero(y / scale, scale)  # a non-finite matrix gives NaN, not a solver error
    mm = y.dtype if mm_dtype is None else mm_dtype
    ym = y.to(mm)
    if generator is None:
        omega = gaussian_sketch(l_dim, ell, dtype=y.dtype, device=y.device).to(mm)
    else:
        omega = torch.randn(l_dim, ell, generator=generator, device=y.device, dtype=y.dtype).to(mm)
    q = torch.linalg.qr((ym @ omega).to(y.dtype)).Q  # (..., s, ell)
    for _ in range(power_iters):
        w = torch.linalg.qr((ym.mT @ q.to(mm)).to(y.dtype)).Q  # (..., L, ell)
        q = torch.linalg.qr((ym @ w.to(mm)).to(y.dtype)).Q
    b = (q.mT.to(mm) @ ym).to(y.dtype)  # (..., ell, L)
    u, sv, vh = torch.linalg.svd(b, full_matrices=False)
    kk = min(k, sv.shape[-1])
    tol = rank_tol(max(x.shape[-2:]), eps, y.dtype) * sv[..., :1]
    keep = sv[..., :kk] > tol
    if rank is not None:
        keep = keep & (torch.arange(kk, device=x.device) < rank)
    left = (q @ (u[..., :kk] * keep.unsqueeze(-2).to(u.dtype))) * bad
    right = vh[..., :kk, :]
    dual = sv[..., :kk].sum(dim=-1) * (scale * bad)[..., 0, 0]
    return (right.mT, left.mT, dual) if transpose else (left, right, dual)


def _kyfan_factors(
    x: torch.Tensor,
    k: int,
    *,
    sketch: PolarSpec | None,
    eps: float | None,
    rank: int | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Ky Fan LMO of ``x`` (..., m, n) as factors ``(P, R, dual)``: ``Z = P R`` with ``P`` (..., m, k') of
    orthonormal columns (zero columns beyond the numerical rank) and ``R`` (..., k', n) of orthonormal rows,
    ``k' = min(k, m, n)``; ``P P^T`` projects onto the column space of the step. Randomized (``sketch``, when the
    short side exceeds ``k + oversample``), Gram/eigh (thin CPU blocks) or SVD."""
    short, long = sorted(x.shape[-2:])
    if sketch is not None and k + sketch.oversample < short:
        return _kyfan_randomized(x, k, sketch.oversample, sketch.power_iters, sketch.dtype, eps, rank, generator)
    if k < short and long >= _KF_GRAM_ASPECT * short and x.device.type == "cpu":
        return _kyfan_gram(x, k, eps, rank)
    u, s, vh, scale, keep = svd_parts(x, eps=eps, rank=rank)
    kk = min(k, s.shape[-1])
    left = u[..., :kk] * keep[..., :kk].unsqueeze(-2).to(u.dtype)
    return left, vh[..., :kk, :], s[..., :kk].sum(dim=-1) * scale[..., 0, 0]


def kyfan_factors(
    h: torch.Tensor,
    k: int,
    polar: str | dict[str, Any] | PolarSpec = "svd",
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Ky Fan LMO ``U_k V_k^T`` of a torch tensor ``h`` (..., m, n) in factored form ``(P, R, dual)``, ``Z = P
    R``: ``P`` (..., m, k') has orthonormal columns (those beyond the numerical rank are zero), ``R`` (..., k', n)
    orthonormal rows, ``k' = min(k, m, n)``; ``dual`` is ``<H, Z>`` (``KF_k(H)`` for the exact solvers). ``P P^T H``
    is the part of ``H`` the step uses (error feedback keeps the rest). ``polar`` as in :func:`resolve_polar`:
    ``"randomized"`` uses the range finder, anything else the exact path. Computed in ``h``'s dtype (at least
    float32); no numpy, no validation beyond the spec."""
    spec = resolve_polar(polar)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    x = h.to(promote(h.dtype))
    p, r, d = _kyfan_factors(
        x,
        k,
        sketch=spec if spec.method == "randomized" else None,
        eps=torch.finfo(h.dtype).eps,
        rank=None,
        generator=generator,
    )
    return p, r, d


def lmo_tensor(
    x: torch.Tensor,
    nrm: Norm,
    *,
    symmetric: bool,
    schedule: tuple | None,
    ns_work: torch.dtype | None,
    return_dual: bool,
    rank: int | None,
    eps: float | None,
    sketch: PolarSpec | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LMO kernel with budget 1 on a validated, non-empty ``x`` (..., m, n) in the working dtype: no
    conversion, no checks (the caller, :func:`lmo` or the direction template, did them once).

    ``schedule`` is ``(coefficients, margin)`` for the Newton–Schulz path (the spectral norm and F-Muon's polar
    part), else ``None``. ``sketch`` selects the randomized Ky Fan solver (its ``oversample``, ``power_iters`` and
    matmul ``dtype``); other norms ignore it. Returns ``(Z, dual)`` in ``x``'s dtype; ``dual`` is ``None`` only for
    Newton–Schulz without ``return_dual``. ``x`` is a torch tensor, or a numpy array for the exact paths of the
    spectral, Frobenius, nuclear and Schatten norms (the result has ``x``'s type).
    """
    xp = namespace(x)
    if symmetric:
        x = sym(x)
    if is_vector(x):  # one singular value: every norm's LMO is the normalization
        z, nrm_x = vector_parts(x)
        if rank == 0:
            z = xp.zeros_like(z)
        return z, nrm_x[..., 0, 0]
    if nrm.name == "fmuon":
        zp, nuc = lmo_tensor(
            x, SPECTRAL, symmetric=symmetric, schedule=schedule, ns_work=ns_work, return_dual=return_dual,
            rank=rank, eps=eps,
        )  # fmt: skip
        scale = max_abs(x)
        fro = torch.linalg.vector_norm(x / scale, dim=(-2, -1), keepdim=True) * scale
        alpha = float(nrm.alpha)  # type: ignore[arg-type]
        dual = None if nuc is None else alpha * nuc + (1.0 - alpha) * fro[..., 0, 0]
        return fmuon_mix(zp, x, fro, alpha), dual
    if nrm.name == "kyfan" and not symmetric:
        left, right, dual = _kyfan_factors(x, int(nrm.k), sketch=sketch, eps=eps, rank=rank, generator=generator)  # type: ignore[arg-type]
        return left @ right, dual
    if nrm.name == "frobenius":
        scale = max_abs(x)
        y = x / scale
        f = fro_norm(y)
        return y / xp.where(f > 0, f, xp.ones_like(f)), (f * scale)[..., 0, 0]
    if schedule is not None:
        z = newton_schulz(x, schedule[0], schedule[1], x.dtype if ns_work is None else ns_work).to(x.dtype)
        if not return_dual:
            return z, None
        scale = max_abs(x)  # the achieved <H, Z>, only when asked (it costs a pass over H)
        return z, ((x / scale) * z).sum(dim=(-2, -1)) * scale[..., 0, 0]
    if symmetric:
        q, lam, scale, keep = eigh_parts(x, eps=eps, rank=rank)
        zv, dual = _singular_lmo(abs(lam), keep, nrm)
        return (q * (xp.sign(lam) * zv)[..., None, :]) @ q.mT, dual * scale[..., 0, 0]
    u, s, vh, scale, keep = svd_parts(x, eps=eps, rank=rank)
    zv, dual = _singular_lmo(s, keep, nrm)
    return (u * zv[..., None, :]) @ vh, dual * scale[..., 0, 0]


def lmo(
    h: Any,
    norm: str | tuple[str, Any] | Norm = "spectral",
    *,
    tau: Any = 1.0,
    symmetric: bool = False,
    method: str = "svd",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
    return_dual: bool = False,
    coefficients: Coefficients = None,
    rank: int | None = None,
    eps: float | None = None,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iters: int = DEFAULT_POWER_ITERS,
    generator: torch.Generator | None = None,
) -> Any:
    """The LMO ``Z = argmax {<H, Z> : phi(Z) <= tau}``, per matrix over the last two dims.

    Args:
        h: ``(..., m, n)`` numpy array or torch tensor, real floating dtype (``(..., n, n)`` if
            ``symmetric``).
        norm: a norm spec, see :func:`resolve_norm`: ``"spectral"`` (default), ``"frobenius"``, ``"nuclear"``,
            ``("schatten", p)``, ``("kyfan", k)``, ``("fmuon", alpha)``, or a :class:`Norm`.
        tau: the budget, ``>= 0``: a number, or a tensor/array broadcastable to the batch shape
            ``h.shape[:-2]``.
        symmetric: maximize over symmetric ``Z`` using ``eigh`` of ``sym(H)`` (only the symmetric
            part of ``h`` matters then).
        method: the solver: ``"svd"`` (exact; ``eigh`` when ``symmetric``; for Ky Fan on a thin CPU block with
            ``k`` below its short side, the exact Gram/eigh form in float64), ``"eigh"`` (exact, only with
            ``symmetric=True``), ``"newton_schulz"`` (approximate polar factor / matrix sign, see
            :func:`imuon_manopt.polar.polar`: the spectral norm and F-Muon's polar part; the other norms use the
            exact path) or ``"randomized"`` (Ky Fan only, non-symmetric: a range finder of ``k + oversample``
            columns with ``power_iters`` power iterations, then the exact top-k LMO of ``Q^T H``, truncated to
            ``k``; the other norms, symmetric blocks and blocks whose short side is at most ``k + oversample``
            use the exact path).
        steps: Newton–Schulz iterations, as in :func:`imuon_manopt.polar.polar`.
        dtype: Newton–Schulz working dtype, as in :func:`imuon_manopt.polar.polar`; it also sets the exact path's
            working dtype (promoted to at least float32) and the randomized solver's matmul dtype.
        coefficients: Newton–Schulz coefficients, as in :func:`imuon_manopt.polar.polar`.
        return_dual: also return the dual norm of each matrix.
        rank: a known upper bound on the rank of every matrix, for the exact paths' rank cut (see
            :func:`imuon_manopt.polar.polar`; default: no bound). The dual is always over all singular values.
        eps: the unit round-off the input carries, for the same cut (default: the input dtype's epsilon).
        oversample: the randomized solver's extra columns (default 8).
        power_iters: the randomized solver's power iterations (default 2).
        generator: the generator of the randomized solver's Gaussian test matrix (default: none; the fixed
            :func:`gaussian_sketch`, so the result is deterministic and the same on every rank).

    A vector-shaped ``h`` (``m == 1`` or ``n == 1``, or ``1 x 1`` when ``symmetric``) has one singular
    value, its 2-norm, so every norm's LMO is ``tau * h / ||h||`` (dual ``||h||``), computed directly
    with either method. Huge finite inputs neither overflow nor fail (every path divides by the max-abs
    entry first); a matrix with a NaN or infinite entry gives NaN (never a solver error).

    Returns:
        ``Z`` of shape ``(..., m, n)`` (same array type, device and dtype as ``h``), or the pair
        ``(Z, dual)`` with ``dual`` of shape ``h.shape[:-2]`` (same type and dtype);
        ``dual = phi_dual(H)``, so ``<H, Z> = tau * dual``. With ``method="newton_schulz"`` (spectral, and the
        polar part of F-Muon) and ``method="randomized"`` the ``dual`` is the achieved value ``<H, Z> / tau``,
        which approaches the dual norm with the solver's accuracy (from below for the randomized solver).

    Raises:
        ValueError: bad ``norm``, ``method``, ``tau``, ``steps``, ``dtype``, ``coefficients``, ``oversample``,
            ``power_iters`` or shape.
        TypeError: ``h`` is not a numpy array / torch tensor, or not real floating point.
    """
    nrm = resolve_norm(norm)
    if method not in _LMO_METHODS:
        raise ValueError(f"unknown method {method!r} for lmo; valid choices: {list(_LMO_METHODS)}")
    if method == "eigh" and not symmetric:
        raise ValueError("method='eigh' needs symmetric=True; use method='svd' for general matrices")
    t, was_numpy = to_torch(h)
    check_matrix(t, "h")
    if symmetric:
        check_square(t, "h")
    dtype = as_dtype(dtype)
    rank = check_rank(rank)
    eps = check_eps(eps, t)
    sketch = None
    if method == "randomized":
        sketch = resolve_polar({"method": method, "dtype": dtype, "oversample": oversample, "power_iters": power_iters})
    use_ns = method == "newton_schulz" and nrm.name in ("spectral", "fmuon")
    schedule = resolve_schedule(coefficients, steps) if use_ns else None
    work = exact_dtype(t, None if sketch is not None else dtype)
    out_dtype = t.dtype
    batch = t.shape[:-2]
    tau_t = _tau_tensor(tau, batch, work, t.device)

    dual: torch.Tensor | None
    if t.numel() == 0:
        z = torch.zeros_like(t)
        dual = torch.zeros(batch, dtype=out_dtype, device=t.device)
    else:
        ns_work = dtype if dtype is not None else promote(t.dtype)
        z, dual = lmo_tensor(
            t.to(work),
            nrm,
            symmetric=symmetric,
            schedule=schedule if use_ns else None,
            ns_work=ns_work,
            return_dual=return_dual,
            rank=rank,
            eps=eps,
            sketch=sketch,
            generator=generator,
        )
        if not (isinstance(tau_t, float) and tau_t == 1.0):
            z = z * tau_t
        z = z.to(out_dtype).contiguous()
        dual = None if dual is None else dual.to(out_dtype)
    z = from_torch(z, was_numpy)
    if return_dual:
        if dual is None:  # lmo_tensor computes it whenever return_dual is set
            raise RuntimeError("internal error: the LMO kernel returned no dual norm")
        return z, from_torch(dual, was_numpy)
    return z


def dual_norm(h: Any, norm: str | tuple[str, Any] | Norm = "spectral", *, symmetric: bool = False) -> Any:
    """The dual norm ``phi_dual(H)`` per matrix, equal to ``<H, lmo(H)> / tau``.

    spectral -> nuclear, Frobenius -> Frobenius, nuclear -> spectral, Schatten-p -> Schatten-q
    (``1/p + 1/q = 1``), ``("kyfan", k)`` -> the Ky Fan k-norm ``KF_k(H)`` (sum of the ``k`` largest singular
    values), ``("fmuon", alpha)`` -> ``alpha ||H||_* + (1 - alpha) ||H||_F``.

    Args:
        h: ``(..., m, n)`` numpy array or torch tensor, real floating dtype.
        norm: the primal norm spec, as in :func:`resolve_norm`.
        symmetric: the dual over symmetric matrices, i.e. of ``sym(H)`` (``h`` must be square).

    Returns:
        shape ``h.shape[:-2]``, same array type, device and dtype as ``h`` (computed in at least
        float32, scaled so that huge or tiny entries neither overflow nor underflow).
    """
    nrm = resolve_norm(norm)
    t, was_numpy = to_torch(h)
    check_matrix(t, "h")
    if symmetric:
        check_square(t, "h")
    if t.numel() == 0:
        return from_torch(torch.zeros(t.shape[:-2], dtype=t.dtype, device=t.device), was_numpy)
    x = t.to(promote(t.dtype))
    if symmetric:
        x = sym(x)
    scale = max_abs(x)
    y = x / scale
    if nrm.name == "frobenius":
        d = torch.linalg.vector_norm(y, dim=(-2, -1))
    else:
        y, mask = finite_or_zero(y, scale)  # a non-finite matrix has a NaN dual, not a solver error
        s = (torch.linalg.eigvalsh(y).abs() if symmetric else torch.linalg.svdvals(y)) * mask[..., 0]
        if nrm.name == "fmuon":
            alpha = float(nrm.alpha)  # type: ignore[arg-type]
            d = alpha * s.sum(dim=-1) + (1.0 - alpha) * torch.linalg.vector_norm(s, dim=-1)
        else:
            d = _singular_lmo(s, torch.ones_like(s, dtype=torch.bool), nrm)[1]  # the dual, over all s
    return from_torch((d * scale[..., 0, 0]).to(t.dtype), was_numpy)
