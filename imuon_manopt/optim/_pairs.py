"""Fixed-rank factor pairs ``(B, A)``: the batched pair step and its rank guard.

The direction is the core's (:class:`imuon_manopt.geometry.FixedRank`, or :class:`~imuon_manopt.geometry.
AmbientFixedRank` for ``pair_momentum="ambient"``); this module only batches it and keeps the factors' product at
full rank by shortening the step where needed. Never forms an ``m x n`` matrix.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..geometry import AmbientFixedRank, FixedRank
from ._steps import Body, direction, per_item, step_scalars

#: Halvings of a pair's step before the pair stays put for this step (2^-12 ~ 2.4e-4 of the step).
MAX_BACKTRACKS = 12
# No host synchronization inside the step: a rank-deficient factor shows up as non-finite directions, which the
# optimizer's finiteness check routes to its nonfinite policy (new pairs are checked once, on their first step).
_FIXED_RANK = FixedRank(check=False)
_AMBIENT = AmbientFixedRank(check=False)


#: Power and inverse-power iterations of the off-CPU ratio estimate. The Rayleigh quotients' error decays like the
#: ratio of neighbouring eigenvalues to the power 2 * _ITERATIONS; two close eigenvalues at an end leave the estimate
#: between them (random 4 x 4 cores: median relative error 2e-15, worst of 1500 ~7%), which only moves where a step
#: is halved by that much.
_ITERATIONS = 24


def _ratio(cb: torch.Tensor, ca: torch.Tensor, r: int) -> torch.Tensor:
    """``s_min / s_max`` of the rank-r product ``Q_B cb ca^T Q_A^T`` (0 for a zero product).

    On the CPU: singular values (``svdvals``). On other devices ``svdvals`` (like ``eigh``) synchronizes with the
    host to check its result, so the ratio comes from sync-free kernels instead: with ``cb^T cb = L L^T``
    (``cholesky_ex``) the product's squared singular values are the eigenvalues of ``S = L^T (ca^T ca) L`` (r x r,
    float64), whose largest and smallest are estimated by power and inverse-power iteration (``cholesky_ex`` and
    triangular solves, which check nothing on the host); a failed factorization (rank lost) gives 0.
    """
    if cb.device.type == "cpu":
        s = torch.linalg.svdvals(cb @ ca.mT)
        top = s[..., 0]
        safe = torch.where(top > 0, top, torch.ones_like(top))
        return torch.where(top > 0, s[..., r - 1] / safe, torch.zeros_like(top))
    return _ratio_iterative(cb, ca).to(cb.dtype)


def _ratio_iterative(cb: torch.Tensor, ca: torch.Tensor) -> torch.Tensor:
    """The estimate of :func:`_ratio` without host synchronization (any device), float64."""
    cb, ca = cb.to(torch.float64), ca.to(torch.float64)
    l_b, info_b = torch.linalg.cholesky_ex(cb.mT @ cb)
    s = l_b.mT @ (ca.mT @ ca) @ l_b
    s = 0.5 * (s + s.mT)
    l_s, info_s = torch.linalg.cholesky_ex(s)
    r = s.shape[-1]
    start = 1.0 + torch.arange(r, dtype=s.dtype, device=s.device) / (2 * r)  # not orthogonal to any eigenvector
    v = w = start.expand(*s.shape[:-1]).unsqueeze(-1)
    for _ in range(_ITERATIONS):
        v = s @ v
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        w = torch.linalg.solve_triangular(l_s.mT, torch.linalg.solve_triangular(l_s, w, upper=False), upper=True)
        w = w / torch.linalg.vector_norm(w, dim=-2, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    top = (v.mT @ s @ v)[..., 0, 0]
    low = (w.mT @ s @ w)[..., 0, 0]
    ok = (info_b == 0) & (info_s == 0) & (top > 0) & torch.isfinite(low)
    safe = torch.where(ok, top, torch.ones_like(top))
    return torch.where(ok, (low.clamp_min(0) / safe).sqrt(), torch.zeros_like(top))


def _ratios(rb: torch.Tensor, ra: torch.Tensor, t: torch.Tensor, r: int) -> torch.Tensor:
    """``s_min / s_max`` of ``(B - t xi_B)(A - t xi_A)`` for step lengths ``t`` (k, *batch), from the R factors of
    ``[B, xi_B]`` and ``[A^T, xi_A^T]``: ``B - t xi_B = Q_B (R_B[:, :r] - t R_B[:, r:])``, so the product's nonzero
    singular values are those of a ``2r x 2r`` matrix. Never forms ``m x n``."""
    tt = t[..., None, None]
    return _ratio(rb[..., :r] - tt * rb[..., r:], ra[..., :r] - tt * ra[..., r:], r)


def step_lengths(
    b: torch.Tensor, a: torch.Tensor, xi_b: torch.Tensor, xi_a: torch.Tensor, step_lr: float | torch.Tensor
) -> torch.Tensor:
    """Per-pair step lengths ``t`` (shape ``(*batch, 1, 1)``): the largest ``step_lr * 2^-k``, ``k = 0..12``, that
    keeps the product's ``s_min / s_max`` at least ``min(sqrt(eps), its current value)``; ``0`` if none does.

    The guard looks at the product ``B A``, so it is invariant to the gauge like the step itself. All candidates
    come from one thin QR of ``[B, xi_B]`` (m x 2r) and one of ``[A^T, xi_A^T]`` (n x 2r) and batched small
    matrices, with tensor ops only (no host synchronization off the CPU, see :func:`_ratio`).
    """
    batch = b.shape[:-2]
    if isinstance(step_lr, torch.Tensor):  # read where it lives (a compiled or captured step)
        full = (step_lr * torch.ones(batch, dtype=b.dtype, device=b.device)).to(b.dtype)
    else:
        full = torch.full(batch, float(step_lr), dtype=b.dtype, device=b.device)
        if step_lr == 0:
            return full[..., None, None]
    r = b.shape[-1]
    tol = math.sqrt(torch.finfo(b.dtype).eps)
    rb = torch.linalg.qr(torch.cat([b, xi_b], -1), mode="r")[1]
    ra = torch.linalg.qr(torch.cat([a.mT, xi_a.mT], -1), mode="r")[1]
    # made on the device (a host-to-device copy would wait for the stream)
    halvings = torch.pow(0.5, torch.arange(MAX_BACKTRACKS + 1, dtype=b.dtype, device=b.device))
    scales = torch.cat([torch.zeros(1, dtype=b.dtype, device=b.device), halvings])
    cand = scales.reshape(-1, *([1] * len(batch))) * full  # (14, *batch): t = 0, then step_lr * 2^-k
    ratios = _ratios(rb, ra, cand, r)
    threshold = torch.clamp(ratios[0], max=tol)
    ok = ratios[1:] >= threshold  # (13, *batch)
    first = torch.argmax(ok.to(torch.uint8), dim=0, keepdim=True)  # the first passing candidate
    t = torch.take_along_dim(cand[1:], first, dim=0)[0]
    return torch.where(ok.any(0), t, torch.zeros_like(t))[..., None, None]


#: The Gram screen of :func:`_full_step_passes` accepts ratios above this multiple of the tolerance only.
_SCREEN_MARGIN = 16.0
#: Factor entries of a group below which the exact check is cheaper than the screen (CPU, 1 thread: 0.14 vs 0.15 ms
#: for 2 pairs of 384x4 / 4x128; 1.7 vs 0.9 ms for 48 pairs of 768x8 / 8x768).
_SCREEN_MIN_ELEMENTS = 2**15


def _full_step_passes(b1: torch.Tensor, a1: torch.Tensor, tol: float) -> bool:
    """Does every stepped pair ``(b1, a1)`` keep ``s_min / s_max >= tol``? From the r x r cores (host reads).

    First a cheap screen on the Gram matrices ``b1^T b1`` and ``a1 a1^T`` (two batched products, no copies of the
    factors): the product's squared singular values are the eigenvalues of ``L^T (a1 a1^T) L`` with ``L L^T = b1^T
    b1``. Rounding in the Grams moves a squared ratio by about ``eps / ratio^2`` relative, negligible where the screen
    accepts (ratio >= 16 tol, i.e. >= 16 sqrt(eps)); anything else (a smaller ratio, a failed factorization,
    non-finite values) is decided exactly, from thin QR factors. So the answer is the exact check's. Small groups
    (fewer than :data:`_SCREEN_MIN_ELEMENTS` factor entries) go straight to the exact check, which costs fewer
    calls there."""
    if b1.numel() + a1.numel() < _SCREEN_MIN_ELEMENTS:
        return _full_step_passes_exact(b1, a1, tol)
    g_b = (b1.mT @ b1).to(torch.float64)
    g_a = (a1 @ a1.mT).to(torch.float64)
    chol, info = torch.linalg.cholesky_ex(g_b)
    if not bool((info == 0).all() & torch.isfinite(g_a).all()):
        return _full_step_passes_exact(b1, a1, tol)
    lam = torch.linalg.eigvalsh(chol.mT @ g_a @ chol)
    top = lam[..., -1]
    ok = torch.isfinite(lam).all(-1) & (top > 0) & (lam[..., 0] >= (_SCREEN_MARGIN * tol) ** 2 * top)
    if bool(ok.all()):
        return True
    return _full_step_passes_exact(b1, a1, tol)


def _full_step_passes_exact(b1: torch.Tensor, a1: torch.Tensor, tol: float) -> bool:
    """:func:`_full_step_passes` from thin QR factors of both factors."""
    r_b = torch.linalg.qr(b1, mode="r")[1]
    r_a = torch.linalg.qr(a1.mT, mode="r")[1]
    return bool((_ratio(r_b, r_a, b1.shape[-1]) >= tol).all())


def _stepped(b, a, xi_b, xi_a, step_lr: float | torch.Tensor, lazy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B - t xi_B, A - t xi_A)`` with ``t`` from :func:`step_lengths`. ``lazy`` (CPUs, where reading a flag costs
    nothing) first tries the full step alone, the common case, and returns it when every pair passes the guard;
    :func:`step_lengths` evaluates all candidates only otherwise. The result is the same either way."""
    if lazy and not isinstance(step_lr, torch.Tensor) and step_lr != 0:
        b1, a1 = b - step_lr * xi_b, a - step_lr * xi_a
        if _full_step_passes(b1, a1, math.sqrt(torch.finfo(b.dtype).eps)):
            return b1, a1
    t = step_lengths(b, a, xi_b, xi_a, step_lr)
    return b - t * xi_b, a - t * xi_a


def pair_body(group: dict[str, Any], shape2d: tuple[int, int], out: torch.dtype, lazy: bool) -> Body:
    """The fixed-rank step of stacked pairs of one shape: ``(B, A, E~_B, E~_A, lr', decay) -> (B_new, A_new)``,
    ``(B - t xi_B, A - t xi_A)``, each factor scaled by ``decay = 1 - lr wd`` (:func:`~imuon_manopt.optim._steps.
    step_scalars`), with ``t`` from :func:`step_lengths`, in the parameters' dtype ``out``; with error feedback
    also the new summed momenta ``(M_B, M_A)``."""
    wd = group["weight_decay"]
    geometry = _FIXED_RANK if group["pair_momentum"] == "factor" else _AMBIENT
    feedback = bool(group.get("error_feedback"))
    fade = 1.0 - group["momentum"]
    transform = group.get("input_transform")  # only MiMuon's switch reaches pairs (gauge-safe; the optimizer checks)

    def body(b, a, e_b, e_a, step_lr, decay) -> tuple[torch.Tensor, ...]:
        xi_b, xi_a = direction(geometry, (b, a), (e_b, e_a), group, transform)
        new_b, new_a = _stepped(b, a, xi_b, xi_a, step_lr, lazy)
        if wd > 0:  # per factor, as AdamW decays LoRA factors: the product by its square
            new_b, new_a = new_b * decay, new_a * decay
        if not feedback:
            return new_b.to(out), new_a.to(out)
        # error feedback (inputs are the summed momenta M_B, M_A): the used part decays by beta, the rest stays
        cap_b, cap_a = _FIXED_RANK.captured(_FIXED_RANK.at((b, a)), (e_b, e_a), (xi_b, xi_a))
        return new_b.to(out), new_a.to(out), e_b - fade * cap_b, e_a - fade * cap_a

    return body


def pair_fn(group: dict[str, Any], shape2d: tuple[int, int], wdt: torch.dtype, out: torch.dtype, lazy: bool):
    """:func:`pair_body` per item: one input ``(B, A, E~_B, E~_A)`` and one output ``(B_new, A_new)`` per pair
    (``(B_new, A_new, M_B, M_A)`` with error feedback)."""
    return per_item(pair_body(group, shape2d, out, lazy), wdt, *step_scalars(group, shape2d, False))
