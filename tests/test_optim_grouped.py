"""IMuon's grouped (batched) step against the per-parameter step, and the step's safety rules: half precision,
non-finite values arising inside the step, the device-side commit, canonical Stiefel's first-order motion, the
sphere's lr shape, rank-0 pairs, gradient shapes, stabilize, deprecated keywords and the state_dict layout.

Truths: one optimizer per parameter (the per-parameter path, a batch of one), the core's direction per parameter,
closed forms by SVD (the documented canonical Stiefel direction), first-order motion ``(x(lr) - x) / lr``.
"""

from __future__ import annotations

import copy
import math

import geoopt
import pytest
import torch

from imuon_manopt import geometry as geo
from imuon_manopt.direction import intrinsic_direction
from imuon_manopt.manifolds import Grassmann
from imuon_manopt.optim import IMuon
from imuon_manopt.optim._pairs import _stepped, step_lengths

DT = torch.float64


def _orth(*shape, dtype=DT):
    return torch.linalg.qr(torch.randn(*shape, dtype=DT))[0].to(dtype)


def _spd(n, dtype=DT):
    a = torch.randn(n, n, dtype=DT)
    return (a @ a.T / n + torch.eye(n, dtype=DT)).to(dtype)


def _params(dtype=DT):
    """Several parameters of each kind and shape, so that every kind forms groups of more than one."""
    torch.manual_seed(11)
    emb, can, spd, sph = (
        geoopt.EuclideanStiefel(),
        geoopt.CanonicalStiefel(),
        geoopt.SymmetricPositiveDefinite(),
        geoopt.Sphere(),
    )
    mats = [torch.nn.Parameter(torch.randn(6, 4, dtype=dtype)) for _ in range(3)]
    mats.append(torch.nn.Parameter(torch.randn(3, 2, 2, dtype=dtype)))  # a convolution-like tensor, alone
    biases = [torch.nn.Parameter(torch.randn(4, dtype=dtype)) for _ in range(2)]
    manifold = [geoopt.ManifoldParameter(_orth(7, 3, dtype=dtype), manifold=emb) for _ in range(3)]
    manifold += [
        geoopt.ManifoldParameter(_orth(7, 3, dtype=dtype), manifold=geoopt.CanonicalStiefel()) for _ in range(2)
    ]
    manifold += [geoopt.ManifoldParameter(_orth(2, 6, 2, dtype=dtype), manifold=can)]
    manifold += [geoopt.ManifoldParameter(_spd(4, dtype), manifold=spd) for _ in range(2)]
    manifold += [
        geoopt.ManifoldParameter(torch.nn.functional.normalize(torch.randn(3, 5, dtype=dtype), dim=-1), manifold=sph)
        for _ in range(2)
    ]
    manifold += [geoopt.ManifoldParameter(_orth(8, 2, dtype=dtype), manifold=Grassmann()) for _ in range(2)]
    pairs = [
        (torch.nn.Parameter(torch.randn(7, 2, dtype=dtype)), torch.nn.Parameter(torch.randn(2, 5, dtype=dtype)))
        for _ in range(3)
    ]
    return mats, biases, manifold, pairs


def _grads(params, steps, dtype=DT):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        gs = []
        for p in params:
            e = torch.randn(p.shape, generator=g, dtype=DT).to(dtype)
            if isinstance(getattr(p, "manifold", None), geoopt.SymmetricPositiveDefinite):
                e = 0.5 * (e + e.mT)
            gs.append(e)
        out.append(gs)
    return out


def _clone(p):
    q = p.detach().clone()
    if isinstance(p, geoopt.ManifoldParameter):
        return geoopt.ManifoldParameter(q, manifold=p.manifold)
    return torch.nn.Parameter(q)


@pytest.mark.parametrize("polar, tol", [("svd", 1e-12), ("newton_schulz", 1e-10)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_grouped_step_equals_the_per_parameter_step(polar, tol, momentum):
    mats, biases, manifold, pairs = _params()
    flat_pairs = [t for pair in pairs for t in pair]
    params = mats + biases + manifold + flat_pairs
    grads = _grads(params, 3)
    opt = IMuon(params, lr=0.05, momentum=momentum, polar=polar, pairs=pairs)

    clones = {id(p): _clone(p) for p in params}
    singles = []
    for p in mats + biases + manifold:
        q = clones[id(p)]
        singles.append(IMuon([q], lr=0.05, momentum=momentum, polar=polar))
    for b, a in pairs:
        qb, qa = clones[id(b)], clones[id(a)]
        singles.append(IMuon([qb, qa], lr=0.05, momentum=momentum, polar=polar, pairs=[(qb, qa)]))

    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
            clones[id(p)].grad = g.clone()
        opt.step()
        for o in singles:
            o.step()
    kinds = [g.kind for g in opt._groups]
    assert kinds.count("pair") == 1 and kinds.count("manifold") == 6 and kinds.count("matrix") == 2
    assert max(len(g.params) for g in opt._groups if g.kind == "manifold") == 3  # stacked
    for p in params:
        q = clones[id(p)]
        torch.testing.assert_close(p.detach(), q.detach(), atol=tol, rtol=tol)
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                other = [o for o in singles if q in o.state][0].state[q][key]
                # buffers carried by geoopt's SPD transport (eigh-based logm / expm) amplify rounding
                torch.testing.assert_close(value, other, atol=1e-9 * float(other.abs().max()), rtol=1e-9)


def test_grouped_step_matches_the_core_direction_per_parameter():
    """Independent of the optimizer's grouping code: each matrix of a stacked group moves by ``-lr xi`` with
    ``xi`` the core's direction for that matrix alone (polar='svd', float64, momentum 0)."""
    torch.manual_seed(2)
    ws = [torch.nn.Parameter(torch.randn(9, 5, dtype=DT)) for _ in range(4)]
    x0 = [w.detach().clone() for w in ws]
    for w in ws:
        w.grad = torch.randn_like(w)
    IMuon(ws, lr=0.1, momentum=0.0, polar="svd").step()
    for w, x in zip(ws, x0):
        xi = intrinsic_direction(geo.Euclidean(), x, w.grad, polar="svd").xi
        torch.testing.assert_close(w.detach(), x - 0.1 * xi, atol=1e-12, rtol=1e-12)


def test_state_dict_keeps_the_per_parameter_layout_and_resumes_in_a_per_parameter_optimizer():
    mats, biases, manifold, pairs = _params()
    params = mats + biases + manifold + [t for pair in pairs for t in pair]
    grads = _grads(params, 4)
    opt = IMuon(params, lr=0.02, pairs=pairs, polar="svd")
    for gs in grads[:2]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == list(range(len(params)))
    for i, p in enumerate(params):
        entry = sd["state"][i]
        assert entry["step"] == 2
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key in entry:
                assert entry[key].shape == p.shape
    # the saved state continues identically in a fresh optimizer (structure rebuilt from the parameters)
    clones = [_clone(p) for p in params]
    index = {id(p): i for i, p in enumerate(params)}
    cpairs = [(clones[index[id(b)]], clones[index[id(a)]]) for b, a in pairs]
    fresh = IMuon(clones, lr=0.02, pairs=cpairs, polar="svd")
    fresh.load_state_dict(copy.deepcopy(sd))
    for gs in grads[2:]:
        for p, q, g in zip(params, clones, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        fresh.step()
    for p, q in zip(params, clones):
        assert torch.equal(p.detach(), q.detach())


def test_structure_is_rebuilt_when_the_set_of_gradients_changes():
    ws = [torch.nn.Parameter(torch.randn(5, 3, dtype=DT)) for _ in range(3)]
    opt = IMuon(ws, lr=0.1, momentum=0.0, polar="svd")
    ws[0].grad = torch.randn(5, 3, dtype=DT)
    opt.step()
    assert [len(g.params) for g in opt._groups] == [1]
    for w in ws:
        w.grad = torch.randn(5, 3, dtype=DT)
    before = [w.detach().clone() for w in ws]
    opt.step()
    assert [len(g.params) for g in opt._groups] == [3]
    assert all(not torch.equal(w.detach(), b) for w, b in zip(ws, before))


# ---------------------------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype, big", [(torch.float16, 4000.0), (torch.bfloat16, 1e18)])
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_half_precision_buffers_do_not_overflow(dtype, big, nonfinite):
    """A steady large gradient: float16's momentum sum would reach 20 * 4000 > 65504 (from the 33rd step on), and
    AdamW's second moment big^2 overflows float16 (4000) and loses bfloat16's precision (1e18). Buffers and moments
    live in float32, so every step is taken. (float32 has bfloat16's range: sum-form momentum of |g| > ~1.7e37,
    or AdamW of |g| > ~1.8e19, overflows there as in torch's optimizers, and goes through the nonfinite policy.)"""
    w = torch.nn.Parameter(torch.randn(8, 8).to(dtype))
    bias = torch.nn.Parameter(torch.randn(8).to(dtype))
    b = torch.nn.Parameter((torch.randn(8, 2) / 3).to(dtype))
    a = torch.nn.Parameter((torch.randn(2, 8) / 3).to(dtype))
    params = [w, bias, b, a]
    opt = IMuon(params, lr=1e-3, pairs=[(b, a)], nonfinite=nonfinite)
    for _ in range(40):
        for p in params:
            p.grad = torch.full_like(p, big)
        opt.step()
        assert not opt.last_step_skipped
    for p in params:
        assert p.dtype == dtype and torch.isfinite(p).all()
        assert opt.state[p]["step"] == 40
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key in opt.state[p]:
                assert opt.state[p][key].dtype == torch.float32
                assert torch.isfinite(opt.state[p][key]).all()


def test_old_half_precision_buffers_load_as_float32():
    w = torch.nn.Parameter(torch.randn(6, 4).to(torch.bfloat16))
    w.grad = torch.randn(6, 4).to(torch.bfloat16)
    opt = IMuon([w], lr=0.01)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["momentum_buffer"] = sd["state"][0]["momentum_buffer"].to(torch.bfloat16)  # an older layout
    fresh = IMuon([w], lr=0.01)
    fresh.load_state_dict(sd)
    assert fresh.state[w]["momentum_buffer"].dtype == torch.float32
    fresh.step()
    assert torch.isfinite(w).all()


# ------------------------------------------------------------------------------ non-finite values inside the step


def _spd_param(dtype=torch.float32):
    return geoopt.ManifoldParameter(_spd(4, dtype), manifold=geoopt.SymmetricPositiveDefinite())


def _grassmann_param():
    return geoopt.ManifoldParameter(_orth(7, 3, dtype=torch.float32), manifold=Grassmann())


INSIDE = [
    ("plain-svd-2e38", lambda: torch.nn.Parameter(torch.randn(6, 4)), 2e38, dict(lr=0.1, polar="svd")),
    ("grassmann-svd", _grassmann_param, 2e38, dict(lr=0.1, polar="svd")),
    ("grassmann-ns", _grassmann_param, 2e38, dict(lr=0.1, polar="newton_schulz")),
    ("spd-svd", _spd_param, 2e38, dict(lr=0.1, polar="svd")),
    ("spd-ns", _spd_param, 2e38, dict(lr=0.1, polar="newton_schulz")),
    ("spd-lr-1e30-svd", _spd_param, 1.0, dict(lr=1e30, polar="svd")),
    ("spd-lr-1e30-ns", _spd_param, 1.0, dict(lr=1e30, polar="newton_schulz")),
]


@pytest.mark.parametrize("make, grad, kw", [c[1:] for c in INSIDE], ids=[c[0] for c in INSIDE])
def test_nonfinite_values_inside_the_step_follow_the_policy(make, grad, kw):
    p = make()
    x0 = p.detach().clone()
    p.grad = torch.full_like(p, grad)
    opt = IMuon([p], **kw)
    with pytest.raises(FloatingPointError, match="no parameter or optimizer state was changed"):
        opt.step()
    assert torch.equal(p.detach(), x0) and len(opt.state[p]) == 0
    opt.nonfinite = "skip"
    opt.step()
    assert opt.last_step_skipped
    assert torch.equal(p.detach(), x0) and len(opt.state[p]) == 0


def test_huge_finite_gradient_without_momentum_takes_the_step():
    """2e38 with momentum 0: nothing overflows (the LMO is scale invariant), the step is the unit one."""
    w = torch.nn.Parameter(torch.zeros(6, 4))
    g = torch.randn(6, 4)
    w.grad = g / g.abs().max() * 2e38
    IMuon([w], lr=0.1, momentum=0.0, polar="svd").step()
    s = torch.linalg.svdvals(w.detach().double())
    torch.testing.assert_close(s, torch.full_like(s, 0.1), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------- the device path (masked commit), on a CPU


@pytest.fixture
def deferred(monkeypatch):
    """Run the device path (finiteness decided on the device, masked commit, deferred policy) on the CPU."""
    monkeypatch.setattr(IMuon, "_defer_checks", staticmethod(lambda groups: True))


def test_device_path_equals_the_host_path(deferred):
    mats, biases, manifold, pairs = _params()
    params = mats + biases + manifold + [t for pair in pairs for t in pair]
    clones = {id(p): _clone(p) for p in params}
    grads = _grads(params, 3)
    opt = IMuon(params, lr=0.05, polar="svd", pairs=pairs)
    cl = [clones[id(p)] for p in params]
    ref = IMuon(cl, lr=0.05, polar="svd", pairs=[(clones[id(b)], clones[id(a)]) for b, a in pairs])
    ref._defer_checks = lambda groups: False
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad, clones[id(p)].grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p in params:
        assert torch.equal(p.detach(), clones[id(p)].detach())
        assert int(opt.state[p]["step"]) == 3


def test_device_path_skip_is_exact_and_raise_is_deferred(deferred):
    w = torch.nn.Parameter(torch.randn(5, 4, dtype=DT))
    bias = torch.nn.Parameter(torch.randn(4, dtype=DT))
    opt = IMuon([w, bias], lr=0.1, nonfinite="skip")
    ref_w, ref_b = _clone(w), _clone(bias)
    ref = IMuon([ref_w, ref_b], lr=0.1)
    grads = [(torch.randn(5, 4, dtype=DT), torch.randn(4, dtype=DT)) for _ in range(3)]
    for k, (gw, gb) in enumerate(grads):
        w.grad, bias.grad = gw.clone(), gb.clone()
        opt.step()
        if k == 0:  # a bad step in between: nothing changes, not even the AdamW step count
            w.grad[0, 0] = math.nan
            opt.step()
            assert opt.last_step_skipped
        ref_w.grad, ref_b.grad = gw.clone(), gb.clone()
        ref.step()
    assert torch.equal(w.detach(), ref_w.detach()) and torch.equal(bias.detach(), ref_b.detach())
    assert int(opt.state[bias]["step"]) == 3

    opt.nonfinite = "raise"
    x0 = w.detach().clone()
    w.grad = torch.full_like(w, math.inf)
    opt.step()  # decided on the device: nothing written, the error comes at the next check
    assert torch.equal(w.detach(), x0)
    with pytest.raises(FloatingPointError, match="step 5"):
        opt.check_finite()


# --------------------------------------------------------------------------- canonical Stiefel: first-order motion


def _polar(h):
    u, _, vh = torch.linalg.svd(h, full_matrices=False)
    return u @ vh


def _skew(a):
    return 0.5 * (a - a.mT)


def test_canonical_stiefel_moves_along_the_documented_direction():
    """One step with a tiny lr: ``(x(lr) - x) / lr = -(sqrt(2) X polar(Omega_E) + polar(K_E))`` (spec §2)."""
    torch.manual_seed(4)
    x = _orth(9, 4)  # p even: the skew block has full rank, so its polar factor is unique
    e = torch.randn(9, 4, dtype=DT)
    xi = math.sqrt(2) * x @ _polar(_skew(x.T @ e)) + _polar(e - x @ (x.T @ e))
    lr = 1e-7
    p = geoopt.ManifoldParameter(x.clone(), manifold=geoopt.Stiefel())
    p.grad = e.clone()
    IMuon([p], lr=lr, momentum=0.0, polar="svd").step()
    torch.testing.assert_close((p.detach() - x) / lr, -xi, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "manifold, x0, geometry",
    [
        (geoopt.EuclideanStiefel(), lambda: _orth(8, 3), geo.Stiefel()),
        (geoopt.CanonicalStiefel(), lambda: _orth(8, 3), geo.Stiefel("canonical")),
        (geoopt.SymmetricPositiveDefinite(), lambda: _spd(4), geo.SPD()),
        (geoopt.Sphere(), lambda: torch.nn.functional.normalize(torch.randn(3, 5, dtype=DT), dim=-1), geo.Sphere()),
        (Grassmann(), lambda: _orth(8, 3), geo.Grassmann()),
    ],
    ids=["euclidean-stiefel", "canonical-stiefel", "spd", "sphere", "grassmann"],
)
def test_first_order_motion_is_the_direction(manifold, x0, geometry):
    x = x0()
    e = torch.randn_like(x)
    if isinstance(manifold, geoopt.SymmetricPositiveDefinite):
        e = 0.5 * (e + e.T)
    xi = intrinsic_direction(geometry, x, e, polar="svd").xi
    lr = 1e-7
    p = geoopt.ManifoldParameter(x.clone(), manifold=manifold)
    p.grad = e.clone()
    IMuon([p], lr=lr, momentum=0.0, polar="svd").step()
    torch.testing.assert_close((p.detach() - x) / lr, -xi, atol=1e-5, rtol=1e-5)


def test_canonical_stiefel_momentum_is_transported_along_the_step():
    """The buffer is carried by the Cayley map of the step's generator ``A = f X^T - X f^T`` with ``f = flat(xi)``
    (the generator that moves X along xi): to first order ``buf(lr) = buf - lr A buf``, and tangent at the new
    point."""
    torch.manual_seed(6)
    x = _orth(9, 3)
    e = torch.randn(9, 3, dtype=DT)
    man = geoopt.CanonicalStiefel()
    buf0 = man.egrad2rgrad(x, e)  # the first buffer is the Riemannian gradient
    xi = intrinsic_direction(geo.Stiefel("canonical"), x, e, polar="svd").xi
    f = xi - 0.5 * x @ (x.T @ xi)
    gen = f @ x.T - x @ f.T
    torch.testing.assert_close(gen @ x, xi)  # the generator moves X along xi
    lr = 1e-7
    p = geoopt.ManifoldParameter(x.clone(), manifold=man)
    p.grad = e.clone()
    opt = IMuon([p], lr=lr, momentum=0.9, polar="svd")
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    torch.testing.assert_close((buf - buf0) / lr, -gen @ buf0, atol=1e-5, rtol=1e-5)
    y = p.detach()
    assert float((y.T @ buf + buf.T @ y).abs().max()) < 1e-12


def test_stabilize_keeps_a_tangent_canonical_buffer():
    """geoopt's canonical proju doubles the X Omega part of a tangent vector; stabilize must not."""
    man = geoopt.CanonicalStiefel()
    p = geoopt.ManifoldParameter(_orth(8, 3), manifold=man)
    opt = IMuon([p], lr=0.01, stabilize=1)
    p.grad = torch.randn(8, 3, dtype=DT)
    opt.step()
    buf = opt.state[p]["momentum_buffer"].clone()
    opt.stabilize_group(opt.param_groups[0])
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------- smaller defects


def test_sphere_lr_adjustment_does_not_depend_on_the_batch():
    """A sphere counts as (n, 1): the same point moves the same distance whatever the number of rows."""
    torch.manual_seed(8)
    row = torch.nn.functional.normalize(torch.randn(6, dtype=DT), dim=0)
    g = torch.randn(6, dtype=DT)
    moves = []
    for rows in (1, 3, 40):
        p = geoopt.ManifoldParameter(row.expand(rows, 6).clone(), manifold=geoopt.Sphere())
        p.grad = g.expand(rows, 6).clone()
        IMuon([p], lr=0.01, momentum=0.0, polar="svd", adjust_lr_fn="original").step()
        moves.append(float((p.detach()[0] - row).norm()))
    assert moves == pytest.approx([moves[0]] * 3, rel=1e-12)
    # and the step is the (n, 1) one: a tangent step of length h = lr * sqrt(n), then geoopt's projection
    h = 0.01 * math.sqrt(6)
    assert moves[0] == pytest.approx(math.hypot(1 - 1 / math.sqrt(1 + h * h), h / math.sqrt(1 + h * h)), rel=1e-9)


def test_rank_zero_pair_is_refused_by_the_constructor():
    b, a = torch.nn.Parameter(torch.randn(8, 0)), torch.nn.Parameter(torch.randn(0, 5))
    with pytest.raises(ValueError, match=r"pairs\[0\]: rank r = 0"):
        IMuon([b, a], lr=0.01, pairs=[(b, a)])


def test_gradient_of_the_wrong_shape_names_the_parameter():
    w, v = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    opt = IMuon([{"params": [w]}, {"params": [v]}], lr=0.01)
    w.grad, v.grad = torch.randn(4, 3), torch.randn(4, 3)
    v.grad.data = torch.randn(3, 4)  # torch checks shapes only on assignment to .grad
    w0 = w.detach().clone()
    with pytest.raises(ValueError, match=r"param group 1, parameter 0: gradient of shape \(3, 4\).*shape \(4, 3\)"):
        opt.step()
    assert torch.equal(w.detach(), w0)


def test_stabilize_runs_when_no_parameter_has_a_gradient():
    """geoopt's optimizers count every step() call towards stabilize, with or without gradients."""
    st = geoopt.EuclideanStiefel()
    p = geoopt.ManifoldParameter(_orth(6, 2), manifold=st)
    opt = IMuon([p], lr=0.01, stabilize=2)
    p.grad = torch.randn(6, 2, dtype=DT)
    opt.step()
    p.data.add_(1e-6)
    p.grad = None
    opt.step()  # the second call: stabilize projects back
    torch.testing.assert_close(p.detach().T @ p.detach(), torch.eye(2, dtype=DT), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------ options and deprecations


def test_one_spelling_per_option():
    """The constructor takes each option once (no deprecated keywords), param-group dicts take the same spellings and
    refuse the keys of the earlier flattened layout with the spelling that replaces them, and groups store the
    options as given."""
    w = torch.nn.Parameter(torch.randn(6, 4, dtype=DT))
    for old in ("ns_steps", "ns_dtype", "fallback_lr", "betas", "eps", "use_imuon", "pair_momentum", "p"):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{old}'"):
            IMuon([w], lr=0.1, **{old: 3})
    for key, advice in (("ns_steps", "polar="), ("betas", "fallback="), ("fallback_lr", "fallback=")):
        with pytest.raises(TypeError, match=f"{key} -> {advice}"):
            IMuon([{"params": [w], key: 3}], lr=0.1)
    polar = {"method": "newton_schulz", "steps": 3, "dtype": torch.float32}
    fallback = {"name": "adamw", "lr": 0.2, "betas": [0.8, 0.9], "eps": 1e-6}
    opt = IMuon([{"params": [w], "polar": polar, "use_imuon": True}], lr=0.1, fallback=fallback)
    group = opt.param_groups[0]
    assert group["polar"] == polar and group["polar"] is not polar  # a copy: later edits of the dict do nothing
    assert group["fallback"] == {**fallback, "betas": (0.8, 0.9)}
    assert not {"ns_steps", "ns_dtype", "fallback_lr", "betas", "eps", "oversample", "power_iters"} & set(group)


def test_schatten_norm_as_a_pair_and_use_imuon_as_a_group_option():
    w = torch.nn.Parameter(torch.randn(5, 4, dtype=DT))
    x0 = w.detach().clone()
    w.grad = torch.randn(5, 4, dtype=DT)
    IMuon([w], lr=0.1, momentum=0.0, norm=("schatten", 3.0), polar="svd").step()
    xi = intrinsic_direction(geo.Euclidean(), x0, w.grad, ("schatten", 3.0), polar="svd").xi
    torch.testing.assert_close(w.detach(), x0 - 0.1 * xi)
    w0 = w.detach().clone()
    w.grad = torch.randn(5, 4, dtype=DT)
    opt = IMuon([{"params": [w], "use_imuon": False}], lr=0.1, fallback="sgd", momentum=0.0)
    opt.step()
    torch.testing.assert_close(w.detach(), w0 - 0.1 * w.grad)  # plain SGD, no orthogonalization


def test_joint_norms_keep_each_parameter_its_own_budget():
    """Frobenius couples the matrices of one batch: equal-shaped parameters must not share a budget."""
    ws = [torch.nn.Parameter(torch.randn(4, 3, dtype=DT)) for _ in range(3)]
    x0 = [w.detach().clone() for w in ws]
    for w in ws:
        w.grad = torch.randn(4, 3, dtype=DT)
    IMuon(ws, lr=0.1, momentum=0.0, norm="frobenius").step()
    for w, x in zip(ws, x0):
        torch.testing.assert_close(float((w.detach() - x).norm()), 0.1)


# ------------------------------------------------------------------------------------------------ the rank guard


def test_lazy_and_batched_rank_guards_agree():
    """The CPU path (full step first) and the device path (all 13 candidates at once) pick the same lengths."""
    torch.manual_seed(10)
    b = torch.randn(6, 9, 2, dtype=DT)
    a = torch.randn(6, 2, 7, dtype=DT)
    xi_b = torch.randn_like(b)
    xi_a = torch.randn_like(a)
    xi_b[:3] = b[:3] * torch.tensor([0.0, 3.0], dtype=DT)  # B's second column is (1 - 3t) b_2: zero at t = 1/3
    for lr in (0.01, 0.5, 1.0 / 3.0, 2.0):
        lazy = _stepped(b, a, xi_b, xi_a, lr, lazy=True)
        full = _stepped(b, a, xi_b, xi_a, lr, lazy=False)
        torch.testing.assert_close(lazy, full, atol=0, rtol=0)
    t = step_lengths(b, a, xi_b, xi_a, 1.0 / 3.0)
    assert torch.equal(t[:3].flatten(), torch.full((3,), 1.0 / 6.0, dtype=DT))  # halved once


def test_register_manifold_takes_the_lowering_map_from_the_geometry_only():
    from imuon_manopt.optim import _dispatch, register_manifold

    saved = dict(_dispatch._RULES)
    try:
        with pytest.raises(TypeError, match="flat"):
            register_manifold(geoopt.PoincareBall, geo.Euclidean(), flat=lambda x, v: v)
        register_manifold(geoopt.PoincareBall, geo.Euclidean())
        rule, geometry = _dispatch.lookup(geoopt.PoincareBall())
        assert not hasattr(rule, "flat") and isinstance(geometry, geo.Euclidean)
    finally:
        _dispatch._RULES.clear()
        _dispatch._RULES.update(saved)


def test_off_cpu_rank_ratio_estimate_matches_the_singular_values():
    """The sync-free estimate used off the CPU (power / inverse-power iteration on the r x r core) against
    ``svdvals``: well inside the guard's needs (the threshold is sqrt(eps) or the current ratio)."""
    from imuon_manopt.optim._pairs import _ratio, _ratio_iterative

    torch.manual_seed(12)
    r = 4
    cb = torch.randn(50, 2 * r, r, dtype=DT)
    ca = torch.randn(50, 2 * r, r, dtype=DT)
    cb[:10, :, -1] *= 1e-4  # products near the guard's threshold
    cb[10:15, :, -1] = 0.0  # rank lost
    exact = _ratio(cb, ca, r)
    estimate = _ratio_iterative(cb, ca)
    torch.testing.assert_close(estimate[15:], exact[15:], rtol=5e-3, atol=1e-12)
    torch.testing.assert_close(estimate[:10], exact[:10], rtol=5e-3, atol=1e-12)
    assert (estimate[10:15] < 1e-6).all()


def test_off_cpu_rank_guard_picks_the_same_lengths(monkeypatch):
    """The device path's guard (all candidates, sync-free ratio estimate) against the CPU's exact one."""
    from imuon_manopt.optim import _pairs

    torch.manual_seed(13)
    b = torch.randn(6, 9, 2, dtype=DT)
    a = torch.randn(6, 2, 7, dtype=DT)
    xi_b, xi_a = torch.randn_like(b), torch.randn_like(a)
    xi_b[:3] = b[:3] * torch.tensor([0.0, 3.0], dtype=DT)  # B's second column vanishes at t = 1/3
    exact = {lr: step_lengths(b, a, xi_b, xi_a, lr) for lr in (0.01, 1.0 / 3.0, 2.0)}
    monkeypatch.setattr(_pairs, "_ratio", lambda cb, ca, r: _pairs._ratio_iterative(cb, ca).to(cb.dtype))
    for lr, t in exact.items():
        torch.testing.assert_close(step_lengths(b, a, xi_b, xi_a, lr), t, atol=0, rtol=0)


def test_chunked_groups_take_the_same_step(monkeypatch):
    """Large groups are stepped in cache-sized chunks: one item per call gives the one-call result."""
    from imuon_manopt.optim import _steps

    mats, biases, manifold, pairs = _params()
    params = mats + biases + manifold + [t for pair in pairs for t in pair]
    clones = {id(p): _clone(p) for p in params}
    grads = _grads(params, 2)
    opt = IMuon(params, lr=0.05, polar="svd", pairs=pairs)
    ref = IMuon(
        [clones[id(p)] for p in params], lr=0.05, polar="svd", pairs=[(clones[id(b)], clones[id(a)]) for b, a in pairs]
    )
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad, clones[id(p)].grad = g.clone(), g.clone()
        ref.step()
        monkeypatch.setattr(_steps, "CHUNK_ELEMENTS", 1)
        opt.step()
        monkeypatch.undo()
    for p in params:
        torch.testing.assert_close(p.detach(), clones[id(p)].detach(), atol=1e-12, rtol=1e-12)
