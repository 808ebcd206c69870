"""CUDA: the core and the torch optimizer on a GPU agree with the CPU, keep every result on the
device, stay feasible with bfloat16 Newton–Schulz, and keep the LoRA pair's memory at
O((m + n) r). Truths: the float64 CPU computation, SVD polar factors, geoopt's own manifold checks,
and the CUDA allocator's peak counter. Skipped without a CUDA device (see conftest)."""

from __future__ import annotations

import geoopt
import pytest
import torch

from imuon_manopt import geometry as geo
from imuon_manopt.direction import intrinsic_direction
from imuon_manopt.lmo import msign, polar
from imuon_manopt.manifolds import Grassmann
from imuon_manopt.optim import IMuon

pytestmark = pytest.mark.cuda

DT = torch.float64
NORMS = [("spectral", None), ("frobenius", None), ("nuclear", None), ("schatten", 3.0)]


def _orth(*shape):
    return torch.linalg.qr(torch.randn(*shape, dtype=DT))[0]


def _spd(*shape):
    a = torch.randn(*shape, dtype=DT)
    return a @ a.mT / shape[-1] + torch.eye(shape[-1], dtype=DT)


def _sym(*shape):
    a = torch.randn(*shape, dtype=DT)
    return a + a.mT


GEOMETRIES = {
    "euclidean": (geo.Euclidean(), lambda: torch.randn(3, 9, 5, dtype=DT), None),
    "sphere": (geo.Sphere(), lambda: torch.nn.functional.normalize(torch.randn(4, 6, dtype=DT), dim=-1), None),
    "stiefel": (geo.Stiefel(), lambda: _orth(2, 9, 4), None),
    "stiefel-canonical": (geo.Stiefel("canonical"), lambda: _orth(9, 4), None),
    "grassmann": (geo.Grassmann(), lambda: _orth(2, 9, 3), None),
    "grassmann-general": (geo.Grassmann("general"), lambda: torch.randn(9, 3, dtype=DT), None),
    "spd": (geo.SPD(), lambda: _spd(2, 5, 5), _sym),
    "fixed-rank": (geo.FixedRank(), lambda: (torch.randn(9, 3, dtype=DT), torch.randn(3, 7, dtype=DT)), None),
    "fixed-rank-gram": (
        geo.FixedRank("gram"),
        lambda: (torch.randn(9, 3, dtype=DT), torch.randn(3, 7, dtype=DT)),
        None,
    ),
    "product": (geo.Product([geo.Stiefel(), geo.SPD()]), lambda: [_orth(9, 4), _spd(5, 5)], None),
}


def _tree(fn, x):
    if isinstance(x, torch.Tensor):
        return fn(x)
    return type(x)(_tree(fn, t) for t in x)


def _leaves(x):
    return [x] if isinstance(x, torch.Tensor) else [leaf for t in x for leaf in _leaves(t)]


def _gradient(x, sym):
    if isinstance(x, list):  # the product: a symmetric gradient for its SPD factor
        return [torch.randn_like(x[0]), _sym(*x[1].shape)]
    return _tree(lambda t: sym(*t.shape) if sym else torch.randn_like(t), x)


@pytest.mark.parametrize("norm,p", NORMS, ids=[n for n, _ in NORMS])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_directions_on_cuda_match_the_cpu(name, norm, p):
    geometry, point, sym = GEOMETRIES[name]
    x = point()
    e = _gradient(x, sym)
    ref = intrinsic_direction(geometry, x, e, norm, p=p)
    out = intrinsic_direction(geometry, _tree(torch.Tensor.cuda, x), _tree(torch.Tensor.cuda, e), norm, p=p)
    assert all(t.is_cuda and t.dtype == DT for t in _leaves(out.xi))
    for got, want in zip(_leaves(out.xi), _leaves(ref.xi)):
        torch.testing.assert_close(got.cpu(), want, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.gap.cpu(), ref.gap, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_half_precision_inputs_on_cuda(method, dtype):
    """Half inputs are computed in float32 and come back in their own dtype, on the device."""
    q1, q2 = _orth(4, 64, 32), _orth(4, 32, 32)
    x64 = q1 @ torch.diag_embed(torch.linspace(0.3, 1.0, 32, dtype=DT).expand(4, 32)) @ q2.mT
    x = x64.to("cuda", dtype)
    z = polar(x, method=method, steps=8)
    assert z.is_cuda and z.dtype == dtype
    u, _, vh = torch.linalg.svd(x.double().cpu(), full_matrices=False)
    assert float((z.cpu().double() - u @ vh).abs().max()) < 2e-2
    sym = (x.float() @ x.float().mT - 0.1 * torch.eye(64, device="cuda")).to(dtype)
    s = msign(sym, method="eigh" if method == "svd" else method, steps=8)
    assert s.is_cuda and s.dtype == dtype
    lam, v = torch.linalg.eigh(sym.double().cpu())
    assert float((s.cpu().double() - v @ torch.diag_embed(torch.sign(lam)) @ v.mT).abs().max()) < 5e-2


def test_bfloat16_newton_schulz_direction_on_cuda():
    """The Stiefel direction with a bfloat16 Newton–Schulz is the exact (SVD) one to bfloat16
    accuracy, and float32 inputs give float32 directions."""
    x, e = _orth(1024, 64), torch.randn(1024, 64, dtype=DT)
    ref = intrinsic_direction(geo.Stiefel(), x, e, polar="svd").xi
    out = intrinsic_direction(
        geo.Stiefel(), x.float().cuda(), e.float().cuda(), polar="newton_schulz", steps=8, dtype=torch.bfloat16
    ).xi
    assert out.is_cuda and out.dtype == torch.float32
    assert float((out.cpu().double() - ref).norm() / ref.norm()) < 3e-2


def test_optimizer_on_cuda_keeps_every_parameter_feasible():
    """Fifty bfloat16-NS steps on every manifold kind, a plain matrix, a bias and a pair."""
    manifolds = {
        "stiefel": (geoopt.EuclideanStiefel(), _orth(3, 64, 8)),
        "canonical": (geoopt.CanonicalStiefel(), _orth(32, 4)),
        "spd": (geoopt.SymmetricPositiveDefinite(), _spd(2, 8, 8)),
        "sphere": (geoopt.Sphere(), torch.nn.functional.normalize(torch.randn(5, 16, dtype=DT), dim=-1)),
        "grassmann": (Grassmann(), _orth(40, 6)),
    }
    mparams = {k: geoopt.ManifoldParameter(x.float().cuda(), manifold=m) for k, (m, x) in manifolds.items()}
    w = torch.nn.Parameter(torch.randn(64, 32, device="cuda"))
    bias = torch.nn.Parameter(torch.zeros(32, device="cuda"))
    b = torch.nn.Parameter(torch.randn(128, 4, device="cuda") / 128**0.5)
    a = torch.nn.Parameter(torch.randn(4, 96, device="cuda") / 96**0.5)
    params = [*mparams.values(), w, bias, b, a]
    opt = IMuon(params, lr=0.05, pairs=[(b, a)], polar={"method": "newton_schulz", "dtype": torch.bfloat16})
    for _ in range(50):
        for t in params:
            g = torch.randn_like(t)
            t.grad = 0.5 * (g + g.mT) if t is mparams["spd"] else g
        opt.step()
    for t in params:
        assert t.is_cuda and t.dtype == torch.float32 and torch.isfinite(t).all()
    for k, t in mparams.items():
        ok, why = t.manifold.check_point_on_manifold(t.detach(), explain=True, atol=1e-4, rtol=1e-4)
        assert ok, f"{k}: {why}"
    s = torch.linalg.svdvals(b.detach().double() @ a.detach().double())
    assert float(s[3] / s[0]) > 1e-3  # the pair kept its rank


def test_lora_pair_step_on_cuda_never_allocates_m_by_n():
    """Peak device memory of pair steps above what parameters, gradients and state hold: a small
    multiple of (m + n) r floats, far below one m x n float32 matrix (64 MiB here)."""
    m, n, r = 4096, 4096, 16
    b = torch.nn.Parameter(torch.randn(m, r, device="cuda") / m**0.5)
    a = torch.nn.Parameter(torch.randn(r, n, device="cuda") / n**0.5)
    b.grad, a.grad = torch.randn_like(b), torch.randn_like(a)
    opt = IMuon([b, a], lr=1e-3, pairs=[(b, a)])
    opt.step()  # creates the momentum buffers
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    factor_bytes = 4 * (m + n) * r  # 0.5 MiB; bound 16 MiB, a quarter of one m x n float32 matrix
    assert peak < 32 * factor_bytes, (peak, factor_bytes)
