"""Orthogonalizers: the thin polar factor and the matrix sign (spec §4).

Two ways to compute them, behind one contract:

- ``"svd"`` / ``"eigh"`` (exact, rank-aware): ``polar(X) = U V^T`` over the singular values above
  ``eps * max(m, n) * s_max``; ``msign(S) = Q sign(Lambda) Q^T`` over the eigenvalues with
  ``|lambda|`` above ``eps * n * max|lambda|`` (for half-precision inputs the cut is at least the
  input dtype's ``eps`` times ``s_max``: their rounding noise is not a direction).
  Directions below the threshold are dropped, so a zero matrix maps to exactly zero and a
  rank-deficient one gains no spurious directions; a caller that knows a rank bound (``rank=``)
  drops the values beyond it too.
- ``"newton_schulz"`` (fast, matmul only): odd quintic iterations
  ``X <- a X + b (X X^T) X + c (X X^T)^2 X`` on the short side of the matrix after scaling it to
  Frobenius norm at most 1, with a per-step coefficient schedule (Polar Express by default, or
  Muon's fixed quintic). Exactly zero singular values stay zero.

Shapes: ``x`` is ``(..., m, n)``; the leading dims are a batch, handled in one batched matmul per
product. numpy arrays in give numpy arrays out; torch tensors keep their device. Dtypes: float32
and float64 are computed in their own precision; float16/bfloat16 inputs are computed in at least
float32 (unless ``dtype`` asks for a different working dtype of the Newton–Schulz path) and the
result is returned in the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._backend import finfo, from_torch, namespace, to_torch
from .geometry.base import sym

__all__ = ["polar", "msign", "NS_COEFFICIENTS", "DEFAULT_NS_STEPS"]

#: A Newton–Schulz schedule: a name, a sequence of (a, b, c) triples, one triple, or None (default).
Coefficients = Any

DEFAULT_NS_STEPS = 5

# Polar Express schedule (Amsel, Persson, Musco, Gower, "The Polar Express: Optimal Matrix Sign
# Methods and Their Application to the Muon Algorithm", arXiv:2505.16932, Algorithm 1 and its
# reference code NoahAmsel/PolarExpress). Step k applies the odd quintic p_k(x) = a x + b x^3 + c
# x^5 to the singular values. Each p_k is the minimax-best quintic for the interval of singular
# values that the previous steps leave, starting from [1e-3, 1]; after a few steps the interval has
# shrunk around 1 and the schedule settles on (15/8, -5/4, 3/8), the degree-5 Newton–Schulz
# polynomial (p(1) = 1, p'(1) = 0), which then repeats. The paper divides every polynomial but the
# last by a safety factor, p_k(x / 1.01), and normalizes the input by 1.01 ||X||_F, so that
# low-precision round-off that pushes a singular value slightly above 1 cannot make the iteration
# diverge.
_PE_SAFETY = 1.01
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_POLAR_EXPRESS = tuple(
    (a / _PE_SAFETY, b / _PE_SAFETY**3, c / _PE_SAFETY**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)

# Muon's fixed quintic (K. Jordan's Muon post and torch.optim.Muon's default `ns_coefficients`):
# chosen for a large slope at 0, it does not converge to 1 but leaves singular values roughly in
# [0.7, 1.2].
_MUON = ((3.4445, -4.7750, 2.0315),)

#: Named Newton–Schulz schedules: name -> ((a, b, c), ...); the last triple repeats for later steps.
NS_COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "polar_express": _POLAR_EXPRESS,
    "muon": _MUON,
}
# The input normalization that goes with each named schedule (Frobenius norm times this margin).
_NS_MARGIN = {"polar_express": _PE_SAFETY, "muon": 1.0}

_POLAR_METHODS = ("svd", "newton_schulz")
_MSIGN_METHODS = ("eigh", "newton_schulz")
_HALF = (torch.float16, torch.bfloat16)
# Newton–Schulz on a CPU float32/float64 input whose long side is at least _GRAM_ASPECT times its
# short side runs on the short side's Gram matrix, when the short side is at most _GRAM_MAX_SIDE
# (the O(s^3) float64 part stays small) and s^2 l is at least _GRAM_MIN_WORK (below that the fixed
# cost of the small float64 problem outweighs the saved products).
_GRAM_ASPECT = 4
_GRAM_MAX_SIDE = 512
_GRAM_MIN_WORK = 2**20


def _use_gram(s: int, l: int, work: torch.dtype, device: torch.device, count: int = 1) -> bool:
    # CPU only: on a GPU the plain iteration's long-side products are cheap and the Gram form's
    # extra small float64 kernels cost more than they save (H100, 1024 x 64 float32: 1.2 ms with
    # the Gram form, 0.7 ms without; benchmarks/RESULTS.md).
    return (
        device.type == "cpu"
        and work in (torch.float32, torch.float64)
        and l >= _GRAM_ASPECT * s
        and s <= _GRAM_MAX_SIDE
        and count * s * s * l >= _GRAM_MIN_WORK  # count: matrices in the batch (one call's fixed costs)
    )


# --------------------------------------------------------------------------------------------------
# validation and dtype utilities (shared with lmo.py)


def check_matrix(t: torch.Tensor, name: str = "x") -> None:
    if t.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., m, n), got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(
            f"{name} must have a real floating-point dtype (float16, bfloat16, float32, float64), got {t.dtype}"
        )


def check_square(t: torch.Tensor, name: str = "x") -> None:
    if t.shape[-1] != t.shape[-2]:
        raise ValueError(f"{name} must be square (..., n, n) for the symmetric variant, got shape {tuple(t.shape)}")


def as_dtype(dtype: Any) -> torch.dtype | None:
    """``None``, a torch dtype, or anything numpy understands as a floating dtype -> torch dtype."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        try:
            out = torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype
        except (TypeError, ValueError):
            out = None
    if out is None or not out.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (e.g. torch.bfloat16, torch.float32), got {dtype!r}")
    return out


def promote(dtype: torch.dtype) -> torch.dtype:
    """At least float32: half types are computed in float32."""
    return torch.float32 if dtype in _HALF else dtype


def exact_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """Working dtype of the SVD/eigh paths: ``dtype`` (or the input's), promoted to >= float32."""
    return promote(dtype if dtype is not None else t.dtype)


def _resolve_steps(steps: Any) -> int:
    if steps is None:
        return DEFAULT_NS_STEPS
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer (default {DEFAULT_NS_STEPS}), got {steps!r}")
    return int(steps)


def resolve_schedule(coefficients: Coefficients, steps: Any) -> tuple[list[tuple[float, float, float]], float]:
    """-> (one (a, b, c) per step, input normalization margin)."""
    n_steps = _resolve_steps(steps)
    if coefficients is None:
        coefficients = "polar_express"
    if isinstance(coefficients, str):
        key = coefficients.strip().lower().replace("-", "_").replace(" ", "_")
        if key not in NS_COEFFICIENTS:
            raise ValueError(
                f"unknown coefficients {coefficients!r}; valid names: {sorted(NS_COEFFICIENTS)}, "
                "or a sequence of (a, b, c) tuples"
            )
        seq, margin = NS_COEFFICIENTS[key], _NS_MARGIN[key]
    else:
        try:
            arr = np.asarray(coefficients, dtype=np.float64)
        except (TypeError, ValueError):
            arr = None
        if arr is not None and arr.shape == (3,):
            arr = arr[None]
        if arr is None or arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != 3 or not np.isfinite(arr).all():
            raise ValueError(
                f"coefficients must be one of {sorted(NS_COEFFICIENTS)} or a non-empty sequence "
                f"of finite (a, b, c) tuples, got {coefficients!r}"
            )
        seq, margin = tuple((float(a), float(b), float(c)) for a, b, c in arr), 1.0
    return [seq[min(i, len(seq) - 1)] for i in range(n_steps)], margin


def max_abs(x: torch.Tensor) -> torch.Tensor:
    """Per-matrix max |x_ij| (..., 1, 1), floored at the dtype's smallest normal number: dividing
    by it is always safe, a zero matrix stays zero, and a subnormal one comes out with entries
    below 1 (the caller's next normalization, if any, must allow for that). numpy in, numpy out."""
    if isinstance(x, np.ndarray):
        return np.maximum(np.abs(x).max(axis=(-2, -1), keepdims=True), finfo(x.dtype).tiny)
    if x.device.type == "cpu":
        amax = x.abs().amax(dim=(-2, -1), keepdim=True)  # (vector_norm with ord=inf is ~8x slower)
    else:  # one fused kernel: on a GPU small matrices cost launches more than flops
        amax = torch.linalg.vector_norm(x, math.inf, dim=(-2, -1), keepdim=True)
    return amax.clamp_min(torch.finfo(x.dtype).tiny)


# --------------------------------------------------------------------------------------------------
# torch kernels (no conversion, no validation): also used by lmo.py


def rank_tol(n: int, eps: float | None, dtype: torch.dtype) -> float:
    """Relative rank cut ``max(eps_work * n, eps)`` (``n = max(m, n)``): the first term bounds the round-off of the
    decomposition in the working dtype, the second the rounding the input carries (``eps``: its machine epsilon, e.g.
    ``2^-7`` for bfloat16 computed in float32; the rounding noise of a rank-deficient bfloat16 matrix measured below
    ``0.2 eps s_max`` from 4 x 4 to 4096 x 256), so that noise is not mistaken for a direction."""
    tol = finfo(dtype).eps * n
    return tol if eps is None else max(tol, float(eps))


def _cap_rank(keep: torch.Tensor, rank: int | None) -> torch.Tensor:
    """Drop the values beyond the ``rank``-th (values sorted in decreasing order): the input's rank is known to
    be at most ``rank``, so anything past it is rounding noise, however large relative to ``eps``."""
    if rank is None or rank >= keep.shape[-1]:
        return keep
    if isinstance(keep, np.ndarray):
        return keep & (np.arange(keep.shape[-1]) < rank)
    return keep & (torch.arange(keep.shape[-1], device=keep.device) < rank)


def finite_or_zero(y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y with every non-finite matrix zeroed, mask)``, ``mask`` 1 for finite and NaN for non-finite matrices
    (..., 1, 1). ``scale`` (the per-matrix max-abs) is non-finite exactly when the matrix is."""
    xp = namespace(y)
    bad = ~xp.isfinite(scale)
    mask = xp.where(bad, xp.full_like(scale, math.nan), xp.ones_like(scale))
    return xp.where(bad, xp.zeros_like(y), y), mask


def svd_parts(x: torch.Tensor, *, eps: float | None = None, rank: int | None = None):
    """Thin SVD of ``x / scale`` (``scale`` = per-matrix max-abs entry, so huge and tiny inputs
    neither overflow nor underflow). Returns ``(U, s, Vh, scale, keep)``: the singular values of
    ``x`` are ``s * scale``; ``keep`` marks those above the cut of :func:`rank_tol` times ``s_max``
    among the first ``rank``. A matrix with a NaN or infinite entry gives NaN factors (never a solver error).
    Torch tensors or numpy arrays."""
    xp = namespace(x)
    scale = max_abs(x)
    y = x / scale
    try:
        u, s, vh = xp.linalg.svd(y, full_matrices=False)
    except (torch.linalg.LinAlgError, np.linalg.LinAlgError):  # non-finite input: NaN for those matrices
        y, mask = finite_or_zero(y, scale)
        u, s, vh = xp.linalg.svd(y, full_matrices=False)
        u, s = u * mask, s * mask[..., 0]
    tol = rank_tol(max(x.shape[-2:]), eps, s.dtype) * s[..., :1]
    return u, s, vh, scale, _cap_rank(s > tol, rank)


def eigh_parts(x: torch.Tensor, *, eps: float | None = None, rank: int | None = None):
    """``eigh`` of ``sym(x) / scale``. Returns ``(Q, lam, scale, keep)``: the eigenvalues of
    ``sym(x)`` are ``lam * scale``; ``keep`` marks ``|lam|`` above the :func:`rank_tol` cut among the
    ``rank`` largest in magnitude. Non-finite matrices give NaN factors. Torch tensors or numpy arrays."""
    xp = namespace(x)
    h = sym(x)
    scale = max_abs(h)
    y = h / scale
    try:
        lam, q = xp.linalg.eigh(y)
    except (torch.linalg.LinAlgError, np.linalg.LinAlgError):
        y, mask = finite_or_zero(y, scale)
        lam, q = xp.linalg.eigh(y)
        lam, q = lam * mask[..., 0], q * mask
    mag = abs(lam)
    tol = rank_tol(x.shape[-1], eps, lam.dtype) * xp.amax(mag, axis=-1, keepdims=True)
    keep = mag > tol
    if rank is not None and rank < mag.shape[-1]:  # keep the `rank` largest magnitudes
        if xp is np:
            top = np.zeros_like(keep)
            np.put_along_axis(top, np.argsort(-mag, axis=-1, kind="stable")[..., :rank], True, axis=-1)
            keep = keep & top
        else:
            order = mag.argsort(dim=-1, descending=True)
            keep = keep & torch.zeros_like(keep).scatter(-1, order[..., :rank], True)
    return q, lam, scale, keep


def fro_norm(y: torch.Tensor) -> torch.Tensor:
    """Per-matrix Frobenius norm (..., 1, 1) of a matrix scaled to entries <= 1 (no overflow to guard against):
    ``torch.linalg.vector_norm``, or for numpy the square root of the sum of squares (numpy's ``vector_norm`` over
    two axes costs ~20 us of Python on a small matrix)."""
    if isinstance(y, np.ndarray):
        return np.sqrt((y * y).sum(axis=(-2, -1), keepdims=True))
    return torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True)


def is_vector(x: torch.Tensor) -> bool:
    """A matrix with one row or one column: its one singular value is its 2-norm."""
    return min(x.shape[-2:]) == 1


def vector_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / ||x||_F, ||x||_F)`` per matrix for a vector-shaped ``x`` (..., m, 1) or (..., 1, n): its
    exact polar factor (zero for a zero vector, NaN for a non-finite one) and its singular value
    (..., 1, 1), without overflow or underflow."""
    if isinstance(x, np.ndarray) and x.ndim == 2:
        # one numpy vector: the same steps with the scale and the norm as Python floats (fewer array operations; the
        # same values: a NaN or inf entry gives NaN, a zero vector zero)
        tiny = finfo(x.dtype).tiny
        amax = float(abs(x).max())
        scale = amax if not amax < tiny else tiny
        y = x / scale
        nrm = math.sqrt(float((y * y).sum()))
        return y / (nrm if not nrm < tiny else tiny), np.full((1, 1), nrm * scale, dtype=x.dtype)
    scale = max_abs(x)
    y = x / scale
    nrm = fro_norm(y)
    if isinstance(y, np.ndarray):
        # the nonzero entries of y are at least 2^-52 (float64; 2^-23 float32: the smallest subnormal over the
        # smallest normal), so a nonzero norm exceeds tiny and max(nrm, tiny) divides like where(nrm > 0, nrm, 1)
        return y / np.maximum(nrm, finfo(y.dtype).tiny), nrm * scale
    return y / torch.where(nrm > 0, nrm, torch.ones_like(nrm)), nrm * scale


def _polar_svd(x: torch.Tensor, work: torch.dtype, eps: float | None = None, rank: int | None = None):
    if is_vector(x):
        z = vector_parts(x.to(work))[0]
        return z if rank is None or rank >= 1 else torch.zeros_like(z)
    u, _, vh, _, keep = svd_parts(x.to(work), eps=eps, rank=rank)
    return (u * keep.unsqueeze(-2).to(u.dtype)) @ vh


def _msign_eigh(x: torch.Tensor, work: torch.dtype, eps: float | None = None, rank: int | None = None):
    q, lam, _, keep = eigh_parts(x.to(work), eps=eps, rank=rank)
    sgn = torch.sign(lam) * keep.to(lam.dtype)
    return (q * sgn.unsqueeze(-2)) @ q.mT


def newton_schulz(
    x: torch.Tensor, coeffs: Sequence[tuple[float, float, float]], margin: float, work: torch.dtype
) -> torch.Tensor:
    """Newton–Schulz polar factor of ``x`` (..., m, n), computed in ``work``; returned in ``work``.

    The iteration runs on the short side ``s x l`` (``s = min(m, n)``) so each step costs
    ``2 s^2 l + 2 s^3 + 2 s^2 l`` flops. Scaling: divide by the max-abs entry first, then by the
    Frobenius norm of the result (times ``margin``), in at least float32, so the spectral norm is <=
    1 without overflow for huge inputs or underflow for tiny ones; a zero matrix stays exactly zero.
    """
    m, n = x.shape[-2:]
    transpose = m > n
    s, l = (n, m) if transpose else (m, n)
    batch = x.shape[:-2]
    prec = torch.promote_types(promote(x.dtype), promote(work))  # precision of the scaling step
    # Out of place throughout: the input is never written to, and autograd can differentiate.
    # After the max-abs step every entry is <= 1; the Frobenius floor at the smallest normal number
    # (not at 1) keeps a zero matrix zero and still normalizes a subnormal one. The scaling runs in
    # the input's memory layout (reductions over a transposed view are slow).
    y = x.to(prec)
    y = y / max_abs(y)
    fro = torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True).mul(margin)
    y = (y / fro.clamp_min(torch.finfo(prec).tiny)).to(work)
    if transpose:
        y = y.mT
    if _use_gram(s, l, work, x.device, math.prod(batch)):
        p = _newton_schulz_gram(y, coeffs).to(work)
        # the final product P Y_0, formed in the input's orientation (a contiguous result)
        return y.mT @ p.mT if transpose else p @ y
    if y.ndim == 2:
        for a, b, c in coeffs:
            gram = torch.mm(y, y.mT)
            upd = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            y = torch.addmm(y, upd, y, beta=a)
    else:
        y = y.reshape(-1, s, l)
        for a, b, c in coeffs:
            gram = torch.bmm(y, y.mT)
            upd = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            y = torch.baddbmm(y, upd, y, beta=a)
        y = y.reshape(*batch, s, l)
    return y.mT if transpose else y


def _newton_schulz_gram(y: torch.Tensor, coeffs: Sequence[tuple[float, float, float]]) -> torch.Tensor:
    """The same iteration as :func:`newton_schulz` for a short-and-wide ``y`` (..., s, l), ``l >> s``,
    run on its ``s x s`` Gram matrix ``G = Y_0 Y_0^T``.

    Every iterate has the form ``Y_k = P_k Y_0`` with ``P_k`` a polynomial in ``G``; with
    ``A_k = Y_k Y_k^T = P_k G P_k^T`` the step is ``P_{k+1} = (a I + b A_k + c A_k^2) P_k``. Only ``G``
    and the final ``P Y_0`` touch the long side: ``4 s^2 l`` flops plus ``O(s^3)`` instead of
    ``k (4 s^2 l + 2 s^3)``. ``P`` is evaluated on the eigenvalues of ``G``
    (``r_{k+1} = r_k (a + b r_k^2 lam + c r_k^4 lam^2)``, ``r_0 = 1``: the scalar map the iteration
    applies, divided by ``sigma``), which is cheaper on the CPU than ``4 k`` small products; for
    batches, and when autograd records ``y``, by the small products themselves. Both run in float64: ``P`` grows
    like ``1 / sigma`` along weak directions, which float32 would square into the round-off of
    ``A_k``. The caller forms the final product ``P Y_0`` in ``y``'s dtype.

    Returns:
        ``P`` (..., s, s), float64.
    """
    y64 = y.to(torch.float64)
    gram = y64 @ y64.mT
    if y.ndim == 2 and not (torch.is_grad_enabled() and y.requires_grad):
        if not bool(torch.isfinite(gram).all()):  # eigh would raise; the iteration propagates NaN
            return torch.full_like(gram, math.nan)
        lam, vec = torch.linalg.eigh(gram)
        lam = lam.clamp_min(0.0)
        r = torch.ones_like(lam)
        for a, b, c in coeffs:
            r2l = r * r * lam
            r = r * (a + b * r2l + c * r2l * r2l)
        p = (vec * r.unsqueeze(-2)) @ vec.mT
    else:
        eye = torch.eye(y.shape[-2], dtype=torch.float64, device=y.device)
        p = eye.expand_as(gram)
        for a, b, c in coeffs:
            a_k = p @ gram @ p.mT
            p = (a * eye + b * a_k + c * (a_k @ a_k)) @ p
    return p


def check_rank(rank: Any) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(
            f"rank must be None or a non-negative integer (an upper bound on the input's rank), got {rank!r}"
        )
    return int(rank)


def check_eps(eps: Any, t: torch.Tensor) -> float:
    """The input's unit round-off for the rank cut: ``eps`` if given, else the input dtype's."""
    if eps is None:
        return torch.finfo(t.dtype).eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not 0.0 <= float(eps) < 1.0:
        raise ValueError(f"eps must be None or a float in [0, 1) (the input's unit round-off), got {eps!r}")
    return float(eps)


def _orthogonalize(
    x: Any,
    symmetric: bool,
    method: str,
    steps: int | None,
    dtype: Any,
    coefficients: Coefficients,
    rank: Any = None,
    eps: Any = None,
) -> Any:
    """The body of :func:`polar` (``symmetric=False``) and :func:`msign` (``symmetric=True``)."""
    name, methods = ("msign", _MSIGN_METHODS) if symmetric else ("polar", _POLAR_METHODS)
    t, was_numpy = to_torch(x)
    check_matrix(t)
    if symmetric:
        check_square(t)
    if method not in methods:
        raise ValueError(f"unknown method {method!r} for {name}; valid choices: {list(methods)}")
    dtype = as_dtype(dtype)
    rank = check_rank(rank)
    eps = check_eps(eps, t)
    if method == "newton_schulz":
        coeffs, margin = resolve_schedule(coefficients, steps)
    if t.numel() == 0:
        return from_torch(torch.zeros_like(t), was_numpy)
    if method == "newton_schulz" and not (is_vector(t) and not symmetric):
        work = dtype if dtype is not None else promote(t.dtype)
        src = sym(t.to(promote(t.dtype))) if symmetric else t
        out = newton_schulz(src, coeffs, margin, work)
    elif symmetric:
        out = _msign_eigh(t, exact_dtype(t, dtype), eps, rank)
    else:  # SVD, or the exact normalization of a vector (its polar factor) for either method
        out = _polar_svd(t, exact_dtype(t, dtype), eps, rank)
    return from_torch(out.to(t.dtype).contiguous(), was_numpy)


# --------------------------------------------------------------------------------------------------
# public API


def polar(
    x: Any,
    *,
    method: str = "svd",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
    coefficients: Coefficients = None,
    rank: int | None = None,
    eps: float | None = None,
) -> Any:
    """Thin polar factor ``U V^T`` of ``x = U diag(s) V^T``, per matrix over the trailing two dims.

    Args:
        x: ``(..., m, n)`` numpy array or torch tensor (any device), real floating dtype. Never
            modified.
        method: ``"svd"`` (exact, rank-aware: singular values below ``eps * max(m, n) * s_max`` give
            zero directions, so ``polar(0) = 0``) or ``"newton_schulz"`` (matmul-only iteration on
            the short side, after max-abs then Frobenius scaling; approximate, see ``steps``).
        steps: Newton–Schulz iterations (default 5); ignored by ``"svd"``. The Polar Express
            schedule is tuned for 5 or more steps (5 steps: singular values of a matrix with
            ``sigma_min >= 1e-3 ||X||_F`` land in [0.84, 1.13]; 8 steps: converged); truncated to
            fewer steps it is less accurate than ``coefficients="muon"``.
        dtype: working dtype. Newton–Schulz: any floating dtype, e.g. ``torch.bfloat16`` as Muon
            uses (default: the input dtype promoted to at least float32). SVD: promoted to at least
            float32.
        coefficients: Newton–Schulz schedule: ``"polar_express"`` (default), ``"muon"``
            (torch.optim.Muon's fixed quintic), or a sequence of ``(a, b, c)`` (one triple per step;
            the last one repeats; a single triple repeats for every step).
        rank: an upper bound on the rank of every matrix, known from its structure (e.g. ``n - p`` for
            ``(I - X X^T) E`` with ``X`` of shape ``n x p``): the SVD path keeps at most the ``rank``
            largest singular values, so the rounding noise in the others never becomes a direction,
            however it compares with the cut. ``None`` (default): no bound. Ignored by Newton–Schulz.
        eps: the machine epsilon of the precision the input was rounded to, for the SVD path's rank
            cut ``max(eps_work * max(m, n), eps) * s_max`` (default: that of ``x``'s dtype, e.g.
            ``2^-7`` for bfloat16 although the SVD runs in float32; ``eps_work`` is the working
            dtype's, so float32/float64 inputs keep the usual ``eps * max(m, n)`` cut).

    A vector-shaped input (``m == 1`` or ``n == 1``) gets its exact polar factor ``x / ||x||`` with
    either method. Huge finite inputs are handled (the factor is scale invariant: the input is divided
    by its max-abs entry first); a matrix with a NaN or infinite entry gives a NaN factor.

    Returns:
        ``(..., m, n)``, the same array type, device and dtype as ``x`` (contiguous).

    Raises:
        ValueError: ``x.ndim < 2``, an unknown ``method`` or ``coefficients``, a bad ``steps`` or
            ``dtype``.
        TypeError: ``x`` is not a numpy array / torch tensor, or not real floating point.
    """
    return _orthogonalize(x, False, method, steps, dtype, coefficients, rank, eps)


def msign(
    x: Any,
    *,
    method: str = "eigh",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
    coefficients: Coefficients = None,
    rank: int | None = None,
    eps: float | None = None,
) -> Any:
    """Matrix sign ``Q sign(Lambda) Q^T`` of the symmetric part of ``x = Q Lambda Q^T``, per matrix.

    For a symmetric matrix the matrix sign is its polar factor. Only ``sym(x) = (x + x^T) / 2`` is
    used.

    Args:
        x: ``(..., n, n)`` numpy array or torch tensor, real floating dtype. Never modified.
        method: ``"eigh"`` (exact, rank-aware: eigenvalues with ``|lambda|`` below ``eps * n *
            max|lambda|`` map to 0) or ``"newton_schulz"`` (the Newton–Schulz polar factor of
            ``sym(x)``).
        steps: Newton–Schulz iterations, as in :func:`polar`.
        dtype: Newton–Schulz working dtype, as in :func:`polar`.
        coefficients: Newton–Schulz coefficients, as in :func:`polar`.
        rank: the rank bound for the ``"eigh"`` path's cut, as in :func:`polar` (keeps the ``rank`` eigenvalues
            largest in magnitude).
        eps: the input's round-off for the ``"eigh"`` path's cut, as in :func:`polar`.

    Returns:
        ``(..., n, n)`` symmetric, same array type, device and dtype as ``x``.

    Raises:
        ValueError: ``x`` is not ``(..., n, n)``, an unknown ``method``, bad
            ``steps``/``dtype``/``coefficients``.
        TypeError: ``x`` is not a numpy array / torch tensor, or not real floating point.
    """
    return _orthogonalize(x, True, method, steps, dtype, coefficients, rank, eps)
