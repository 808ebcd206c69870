"""Ky Fan and F-Muon norms in the core, their solvers and block rules, against independent references.

References: float64 SVDs / eigh written out here, the closed forms of the dual norms, and brute force over random
feasible points of the norm balls (none may beat the LMO).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imuon_manopt import geometry as geo
from imuon_manopt.direction import intrinsic_direction
from imuon_manopt.lmo import dual_norm, lmo, resolve_polar

DT = torch.float64


def power_law(m: int, n: int, a: float = 1.0, seed: int = 0, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """A matrix with singular values ``i^-a`` (a gradient-like, power-law spectrum) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    d = min(m, n)
    u = torch.linalg.qr(torch.randn(*batch, m, d, generator=g, dtype=DT)).Q
    v = torch.linalg.qr(torch.randn(*batch, n, d, generator=g, dtype=DT)).Q
    s = torch.arange(1, d + 1, dtype=DT) ** -a
    return (u * s.unsqueeze(-2)) @ v.mT


def svd_topk(h: torch.Tensor, k: int) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(h, full_matrices=False)
    return u[..., :k] @ vh[..., :k, :]


def kf(h: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.svdvals(h)[..., :k].sum(-1)


def dual_kf(z: torch.Tensor, k: int) -> torch.Tensor:
    """The norm of the Ky Fan LMO's ball: max(||Z||_2, ||Z||_* / k)."""
    s = torch.linalg.svdvals(z)
    return torch.maximum(s[..., 0], s.sum(-1) / k)


# ------------------------------------------------------------------------------------------- Ky Fan, exact


@pytest.mark.parametrize(
    "shape", [(40, 25), (25, 40), (300, 30), (30, 300), (3, 64, 48)], ids=["tall", "wide", "thin", "flat", "batch"]
)
@pytest.mark.parametrize("k", [2, 6])
def test_kyfan_exact_is_svd_top_k_and_attains_the_dual(shape, k):
    h = power_law(*shape[-2:], batch=shape[:-2], seed=k)
    z, d = lmo(h, ("kyfan", k), return_dual=True)
    torch.testing.assert_close(z, svd_topk(h, k), atol=1e-10, rtol=0)  # Gram path too (thin, flat)
    torch.testing.assert_close(d, kf(h, k), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close((h * z).sum((-2, -1)), kf(h, k), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dual_norm(h, ("kyfan", k)), kf(h, k), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dual_kf(z, k), torch.ones_like(d), atol=1e-12, rtol=0)
    # numpy in, numpy out, same values
    np.testing.assert_allclose(lmo(h.numpy(), ("kyfan", k)), z.numpy(), atol=1e-12)


def test_kyfan_beats_every_random_feasible_point():
    """Brute force: no Z with max(||Z||_2, ||Z||_*/k) <= 1 (dense, low-rank, sign patterns) beats U_k V_k^T."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 25, generator=g, dtype=DT)
    k = 6
    best = float(kf(h, k))
    cands = [torch.randn(2000, 40, 25, generator=g, dtype=DT)]
    cands.append(torch.randn(2000, 40, 3, generator=g, dtype=DT) @ torch.randn(2000, 3, 25, generator=g, dtype=DT))
    u, s, vh = torch.linalg.svd(h, full_matrices=False)
    mix = torch.rand(2000, 25, generator=g, dtype=DT)  # shared singular vectors, random feasible weights
    cands.append((u * mix.unsqueeze(-2)) @ vh)
    for c in cands:
        c = c / dual_kf(c, k)[:, None, None]
        assert float((c * h).sum((-2, -1)).max()) <= best * (1 + 1e-12)
    z = lmo(h, ("kyfan", k))
    assert float((h * z).sum()) == pytest.approx(best, rel=1e-12)


def test_kyfan_is_rank_aware_and_spans_spectral_and_nuclear():
    g = torch.Generator().manual_seed(2)
    low = torch.randn(30, 3, generator=g, dtype=DT) @ torch.randn(3, 20, generator=g, dtype=DT)
    for method in ("svd", "randomized"):
        z = lmo(low, ("kyfan", 8), method=method, oversample=2)  # rank 3 < k: the three pairs, nothing else
        torch.testing.assert_close(z, svd_topk(low, 3), atol=1e-10, rtol=0)
    h = power_law(30, 20, seed=3)
    torch.testing.assert_close(lmo(h, ("kyfan", 20)), lmo(h, "spectral"), atol=1e-12, rtol=0)
    torch.testing.assert_close(lmo(h, ("kyfan", 50)), lmo(h, "spectral"), atol=1e-12, rtol=0)
    torch.testing.assert_close(lmo(h, ("kyfan", 1)), lmo(h, "nuclear"), atol=0, rtol=0)
    assert torch.all(lmo(torch.zeros(6, 5, dtype=DT), ("kyfan", 2)) == 0)


def test_symmetric_kyfan_keeps_the_k_largest_magnitudes_with_their_signs():
    g = torch.Generator().manual_seed(4)
    q = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=DT)).Q
    lam = torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0, 0.5, -0.25], dtype=DT)
    s = (q * lam) @ q.T
    z, d = lmo(s, ("kyfan", 3), symmetric=True, return_dual=True)
    ref = (q[:, :3] * torch.sign(lam[:3])) @ q[:, :3].T
    torch.testing.assert_close(z, ref, atol=1e-12, rtol=0)
    assert float(d) == pytest.approx(12.0, rel=1e-12)


# ------------------------------------------------------------------------------------------- Ky Fan, randomized


@pytest.mark.parametrize("shape", [(256, 256), (512, 128), (128, 384), (2, 192, 160)])
def test_randomized_kyfan_is_feasible_and_within_1e3_on_power_law_spectra(shape):
    """Defaults (oversample 8, power_iters 2), k = d/8, spectrum i^-1: <G, Z> / KF_k(G) >= 1 - 1e-3, and Z is
    always feasible: ||Z||_2 <= 1, rank <= k (truncated to k, not the polar of the whole sketch)."""
    h = power_law(*shape[-2:], batch=shape[:-2], seed=5)
    k = min(shape[-2:]) // 8
    z, d = lmo(h, ("kyfan", k), method="randomized", return_dual=True)
    ratio = (h * z).sum((-2, -1)) / kf(h, k)
    assert float(ratio.min()) >= 1 - 1e-3 and float(ratio.max()) <= 1 + 1e-12
    torch.testing.assert_close(d, (h * z).sum((-2, -1)), atol=1e-12, rtol=1e-12)  # the achieved value
    s = torch.linalg.svdvals(z)
    assert float(s[..., 0].max()) <= 1 + 1e-12
    assert float(s[..., k:].max()) <= 1e-12
    # deterministic (seeded sketch) unless a generator is given
    torch.testing.assert_close(lmo(h, ("kyfan", k), method="randomized"), z, atol=0, rtol=0)
    other = lmo(h, ("kyfan", k), method="randomized", generator=torch.Generator().manual_seed(7))
    assert not torch.equal(other, z)


def test_randomized_kyfan_falls_back_to_exact_on_small_blocks_and_other_norms():
    h = power_law(20, 12, seed=6)
    torch.testing.assert_close(lmo(h, ("kyfan", 6), method="randomized"), svd_topk(h, 6), atol=1e-12, rtol=0)
    torch.testing.assert_close(lmo(h, "spectral", method="randomized"), lmo(h, "spectral"), atol=0, rtol=0)


def test_polar_spec_validation():
    assert resolve_polar("randomized").oversample == 8 and resolve_polar("randomized").power_iters == 2
    spec = resolve_polar({"method": "randomized", "oversample": 16, "power_iters": 1, "dtype": torch.float32})
    assert (spec.oversample, spec.power_iters, spec.dtype) == (16, 1, torch.float32)
    for bad, match in [
        ({"method": "qr"}, "unknown polar method"),
        ({"steps": 3}, "'method'"),
        ({"method": "randomized", "sketch": "columns"}, "unknown keys"),
        ({"method": "randomized", "oversample": -1}, "oversample"),
        ({"method": "randomized", "power_iters": 1.5}, "power_iters"),
        ({"method": "newton_schulz", "steps": 0}, "steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            resolve_polar(bad)


# ------------------------------------------------------------------------------------------- F-Muon


@pytest.mark.parametrize("alpha", [0.2, 0.7])
def test_fmuon_lmo_is_the_formula_and_attains_its_dual(alpha):
    h = power_law(12, 9, seed=8) + 0.01 * torch.randn(12, 9, dtype=DT, generator=torch.Generator().manual_seed(8))
    u, s, vh = torch.linalg.svd(h, full_matrices=False)
    ref = alpha * (u @ vh) + (1 - alpha) * h / torch.linalg.matrix_norm(h)
    dual = alpha * s.sum() + (1 - alpha) * torch.linalg.matrix_norm(h)
    z, d = lmo(h, ("fmuon", alpha), return_dual=True)
    torch.testing.assert_close(z, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(d, dual, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dual_norm(h, ("fmuon", alpha)), dual, atol=1e-12, rtol=1e-12)
    # Z lies in the ball alpha B_spec + (1 - alpha) B_F: its support function is the dual norm, so <G', Z> <= N(G')
    g2 = torch.randn(5000, 12, 9, dtype=DT, generator=torch.Generator().manual_seed(9))
    s2 = torch.linalg.svdvals(g2)
    n2 = alpha * s2.sum(-1) + (1 - alpha) * s2.norm(dim=-1)
    assert float(((g2 * z).sum((-2, -1)) - n2).max()) <= 1e-12
    # Newton–Schulz for the polar part: close to the exact one
    zn = lmo(h, ("fmuon", alpha), method="newton_schulz", steps=10)
    assert float((zn - z).abs().max()) < 1e-2


# ------------------------------------------------------------------------------------------- block rules


def test_kyfan_block_rule_is_per_block_with_the_summed_gap():
    """Product of blocks under the max rule: each block its own U_k V_k^T (the separable maximizer), gap = sum
    of the blocks' KF_k; brute force over feasible block tuples never beats it."""
    k = 3
    xs = [torch.zeros(10, 8, dtype=DT), torch.zeros(2, 9, 12, dtype=DT)]
    es = [power_law(10, 8, seed=10), power_law(9, 12, batch=(2,), seed=11)]
    xi, gap = intrinsic_direction(geo.Product([geo.Euclidean(), geo.Euclidean()]), xs, es, ("kyfan", k))
    for x_b, e_b in zip(xi, es):
        torch.testing.assert_close(x_b, svd_topk(e_b, k), atol=1e-10, rtol=0)
    total = float(kf(es[0], k) + kf(es[1], k).sum())
    assert float(gap) == pytest.approx(total, rel=1e-12)
    g = torch.Generator().manual_seed(12)
    best = -np.inf
    for _ in range(200):
        cand = [torch.randn(e.shape, generator=g, dtype=DT) for e in es]
        cand = [c / dual_kf(c, k)[..., None, None] for c in cand]
        best = max(best, float(sum((c * e).sum() for c, e in zip(cand, es))))
    assert best < total


def test_fmuon_block_rule_polar_per_block_frobenius_joint():
    """Stiefel (embedded): blocks (Omega, K) of the whitened gradient; Z_b = alpha polar(H_b) + (1 - alpha) H_b /
    ||H||_F with the Frobenius norm over both blocks, gap alpha sum ||H_b||_* + (1 - alpha) ||H||_F."""
    alpha = 0.6
    g = torch.Generator().manual_seed(13)
    x = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=DT)).Q
    e = torch.randn(12, 4, generator=g, dtype=DT)
    stiefel = geo.Stiefel("embedded")
    state = stiefel.at(x)
    blocks = stiefel.whiten(state, stiefel.project(state, e))
    fro = torch.sqrt(sum((b * b).sum() for b in blocks))
    zs = [alpha * svd_topk(b, min(b.shape)) + (1 - alpha) * b / fro for b in blocks]
    zs = [0.5 * (zs[0] - zs[0].mT), zs[1]]  # the skew block Omega keeps its skew part
    ref = stiefel.tangent(state, stiefel.unwhiten(state, tuple(zs)))
    xi, gap = intrinsic_direction(stiefel, x, e, ("fmuon", alpha))
    torch.testing.assert_close(xi, ref, atol=1e-10, rtol=0)
    nuc = sum(torch.linalg.svdvals(b).sum() for b in blocks)
    assert float(gap) == pytest.approx(float(alpha * nuc + (1 - alpha) * fro), rel=1e-10)
    assert float(gap) == pytest.approx(float((e * xi).sum()), rel=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_kyfan_solvers_on_cuda_match_the_cpu():
    h = power_law(256, 192, batch=(2,), seed=14)
    k = 24
    for method in ("svd", "randomized"):
        zc = lmo(h, ("kyfan", k), method=method)
        zg = lmo(h.cuda(), ("kyfan", k), method=method).cpu()
        ratio = (h * zg).sum((-2, -1)) / kf(h, k)
        assert float(ratio.min()) >= 1 - 1e-3
        if method == "svd":
            torch.testing.assert_close(zg, zc, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------- both adapters


def test_kyfan_exact_in_both_adapters_is_svd_top_k():
    """One step without momentum: the torch optimizer moves a plain matrix by -lr U_k V_k^T, the Pymanopt solver
    (Euclidean manifold, constant step) by -eta U_k V_k^T, to 1e-10 in float64."""
    import pymanopt
    import pymanopt.manifolds as pm

    from imuon_manopt.optim import IMuon as TorchIMuon
    from imuon_manopt.optimizers import IMuon as PymanoptIMuon

    k, lr = 5, 0.1
    h = power_law(48, 40, seed=15)
    ref = svd_topk(h, k)
    w = torch.nn.Parameter(torch.zeros(48, 40, dtype=DT))
    w.grad = h.clone()
    TorchIMuon([w], lr=lr, momentum=0.0, norm=("kyfan", k), polar="svd").step()
    torch.testing.assert_close(w.detach(), -lr * ref, atol=1e-10, rtol=0)

    target = h.numpy()
    manifold = pm.Euclidean(48, 40)

    @pymanopt.function.numpy(manifold)
    def cost(x):
        return -float(np.sum(target * x))

    @pymanopt.function.numpy(manifold)
    def egrad(x):
        return -target

    problem = pymanopt.Problem(manifold, cost, euclidean_gradient=egrad)
    x0 = np.zeros((48, 40))
    for polar in ("svd", {"method": "svd"}):
        run = PymanoptIMuon(norm=("kyfan", k), polar=polar, step_size=lr, max_iterations=1, verbosity=0)
        res = run.run(problem, initial_point=x0)
        np.testing.assert_allclose(res.point, lr * ref.numpy(), atol=1e-10)
    # the randomized solver in both adapters: the core's (deterministic) randomized LMO
    rnd = {"method": "randomized", "oversample": 4, "power_iters": 1}
    want = lmo(h, ("kyfan", k), method="randomized", oversample=4, power_iters=1)
    run = PymanoptIMuon(norm=("kyfan", k), polar=rnd, step_size=lr, max_iterations=1, verbosity=0)
    np.testing.assert_allclose(run.run(problem, initial_point=x0).point, lr * want.numpy(), atol=1e-10)
    w = torch.nn.Parameter(torch.zeros(48, 40, dtype=DT))
    w.grad = h.clone()
    TorchIMuon([w], lr=lr, momentum=0.0, norm=("kyfan", k), polar=rnd).step()
    torch.testing.assert_close(w.detach(), -lr * want, atol=1e-10, rtol=0)
    assert float((want - ref).abs().max()) > 1e-6  # (it is an approximation: the check above is not vacuous)


@pytest.mark.parametrize("shape", [(40, 30), (200, 20)], ids=["svd", "gram"])
@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_kyfan_non_finite_and_huge_inputs(shape, method):
    """A matrix with a NaN gives NaN (never a solver error) and leaves its batch neighbours alone; huge finite
    inputs neither overflow nor fail; the optimizer routes a NaN gradient to its nonfinite policy."""
    from imuon_manopt.optim import IMuon

    h = power_law(*shape, batch=(2,), seed=16)
    h[0, 0, 0] = float("nan")
    z, d = lmo(h, ("kyfan", 3), method=method, oversample=2, return_dual=True)
    assert bool(torch.isnan(z[0]).all()) and bool(torch.isnan(d[0]))
    clean = lmo(h[1], ("kyfan", 3), method=method, oversample=2)
    torch.testing.assert_close(z[1], clean, atol=1e-12, rtol=0)
    big = lmo(h[1] * 1e300, ("kyfan", 3), method=method, oversample=2)
    torch.testing.assert_close(big, clean, atol=1e-10, rtol=0)
    w = torch.nn.Parameter(torch.zeros(shape, dtype=DT))
    w.grad = h[0].clone()
    opt = IMuon([w], lr=0.1, norm=("kyfan", 3), polar={"method": method, "oversample": 2})
    with pytest.raises(FloatingPointError):
        opt.step()
    assert bool((w == 0).all()) and "momentum_buffer" not in opt.state[w]


def test_gaussian_sketch_is_a_fixed_standard_normal_matrix():
    """The randomized solver's default test matrix: a function of the position only (row i the same whatever the
    number of rows, so sharded ranks slice it), with standard normal moments."""
    from imuon_manopt.lmo import gaussian_sketch

    big = gaussian_sketch(3000, 40, dtype=DT)
    torch.testing.assert_close(gaussian_sketch(100, 40, dtype=DT), big[:100], atol=0, rtol=0)
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1.0) < 0.01
    assert abs(float((big**4).mean()) - 3.0) < 0.1  # Gaussian kurtosis
    assert float(torch.linalg.cond(big)) < 1.5  # columns nearly orthogonal, as independent Gaussians are
    assert gaussian_sketch(64, 8, dtype=torch.float32).dtype == torch.float32


def test_randomized_kyfan_solver_traces_without_graph_breaks():
    """No random-number state inside the solver: torch.compile(fullgraph=True) traces it (what the optimizer's
    compile= needs) and gives the eager result."""
    from imuon_manopt.lmo import kyfan_factors

    h = power_law(24, 20, seed=17)

    def solve(x: torch.Tensor) -> torch.Tensor:
        p, r, _ = kyfan_factors(x, 3, {"method": "randomized", "oversample": 4})
        return p @ r

    compiled = torch.compile(solve, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(h), solve(h), atol=1e-12, rtol=0)


def test_core_transform_is_refused_on_symmetric_blocks_and_joint_norms():
    x = torch.eye(4, dtype=DT)
    e = power_law(4, 4, seed=20)
    with pytest.raises(ValueError, match="symmetric block"):
        intrinsic_direction(geo.SPD(), x, e, transform=("mimuon", 0.1))
    with pytest.raises(ValueError, match="max-rule norm"):
        intrinsic_direction(geo.Euclidean(), x, e, "frobenius", transform=("mimuon", 0.1))
    with pytest.raises(ValueError, match="unknown input_transform"):
        intrinsic_direction(geo.Euclidean(), x, e, transform="muoneq")
