"""Reliability of :class:`imuon_manopt.optim.IMuon` under what users do besides stepping: resuming half-precision
training from a state dict, SPD parameters with momentum, schedulers, pickling, tensors with more than two dims,
and malformed input."""

from __future__ import annotations

import io
import math

import geoopt
import pytest
import torch

from imuon_manopt.direction import intrinsic_direction
from imuon_manopt.geometry import SPD
from imuon_manopt.optim import IMuon, register_adjust_lr_fn

# ------------------------------------------------------------------------------------ half-precision resume


def _half_model(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=g).to(dtype))  # iMuon, momentum buffer
    b = torch.nn.Parameter(torch.randn(6, generator=g).to(dtype))  # AdamW fallback, exp_avg / exp_avg_sq
    return [w, b]


def _half_grads(params: list[torch.Tensor], k: int) -> None:
    g = torch.Generator().manual_seed(100 + k)
    for p in params:
        # bias gradients of ~2e4 (representable in float16): AdamW's second moment grows past float16's 65504
        scale = 2e4 if p.ndim == 1 else 1.0
        p.grad = (scale * torch.randn(p.shape, generator=g)).to(p.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_state_survives_state_dict_round_trip_bit_for_bit(dtype):
    params = _half_model(dtype)
    opt = IMuon(params, lr=0.01, momentum=0.9, fallback={"name": "adamw", "lr": 1e-3})
    for k in range(3):
        _half_grads(params, k)
        opt.step()
    st = opt.state[params[1]]
    assert st["exp_avg_sq"].dtype == torch.float32 and st["exp_avg_sq"].max() > 65504  # not a float16 number
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # as a checkpoint would

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = IMuon(resumed_params, lr=0.01, momentum=0.9, fallback={"name": "adamw", "lr": 1e-3})
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for p, q in zip(params, resumed_params):
        want, got = opt.state[p], resumed.state[q]
        assert want.keys() == got.keys()
        for key, v in want.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and key != "step":
                assert got[key].dtype == torch.float32, key
                assert torch.equal(got[key], v), f"{dtype} {key} changed on load"
                assert got[key].data_ptr() != v.data_ptr()
    # continuing equals the uninterrupted run, bit for bit
    for k in range(3, 6):
        for ps in (params, resumed_params):
            _half_grads(ps, k)
        opt.step()
        resumed.step()
    for p, q in zip(params, resumed_params):
        assert torch.isfinite(q).all()
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------ SPD with momentum


def _spd_run(dtype, lr, beta, steps, target, x0=None):
    """``||X - T||_F^2`` on geoopt's SPD manifold from ``X0 = I``; returns the smallest eigenvalue per step and
    the last loss."""
    n = target.shape[0]
    x = geoopt.ManifoldParameter(
        torch.eye(n, dtype=dtype) if x0 is None else x0.to(dtype), manifold=geoopt.SymmetricPositiveDefinite()
    )
    t = target.to(dtype)
    opt = IMuon([x], lr=lr, momentum=beta)
    lowest = []
    for _ in range(steps):
        opt.zero_grad()
        ((x - t) ** 2).sum().backward()
        opt.step()
        lowest.append(float(torch.linalg.eigvalsh(x.detach().double())[0]))
    return lowest, float(((x.detach() - t) ** 2).sum())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_spd_with_default_momentum_converges_instead_of_collapsing(dtype):
    """The reported case: lr=0.1, default momentum 0.95, T = 0.2 I. The eigenvalues used to fall geometrically
    (1e-9 by step 180; float32, float16 and bfloat16 raised from geoopt's eigh at steps ~162, ~78, ~50); now they
    settle at 0.2 like the plain step's."""
    target = 0.2 * torch.eye(3, dtype=torch.float64)
    lowest, loss = _spd_run(dtype, 0.1, 0.95, 150, target)
    plain_lowest, plain_loss = _spd_run(dtype, 0.1, 0.0, 150, target)
    assert min(lowest[-50:]) > 0.15 and max(lowest[-50:]) < 0.25, lowest[-50:]
    if dtype in (torch.float64, torch.float32):  # within the sign method's +-lr oscillation
        assert loss < 3 * 0.2**2 * (math.exp(0.1) - 1) ** 2 + 1e-3, loss
    assert min(plain_lowest[-50:]) > 0.15 and plain_loss < 1e-2


@pytest.mark.parametrize("beta", [0.8, 0.9, 0.95, 0.99])
def test_spd_momentum_is_safe_where_the_plain_step_is(beta):
    """lr = 0.3 is above -ln(beta) for every beta here, where the transported momentum used to collapse; float32."""
    target = 0.2 * torch.eye(3, dtype=torch.float64)
    lowest, loss = _spd_run(torch.float32, 0.3, beta, 120, target)
    plain, _ = _spd_run(torch.float32, 0.3, 0.0, 120, target)
    assert min(plain[-40:]) > 0.1
    assert min(lowest[-40:]) > 0.05, (beta, lowest[-40:])
    assert loss < 0.1, loss


def test_spd_momentum_with_a_non_commuting_target_recovers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    target = a @ a.T / 3 + 0.05 * torch.eye(3, dtype=torch.float64)
    t_min = float(torch.linalg.eigvalsh(target)[0])
    lowest, _ = _spd_run(torch.float64, 0.1, 0.95, 300, target)
    assert 0.3 * t_min < min(lowest[-100:]) and max(lowest[-100:]) < 3 * t_min, (t_min, lowest[-100:])


def test_spd_momentum_is_the_sum_of_euclidean_gradients_by_hand():
    """SPD is open in the symmetric matrices: the buffer sums Euclidean gradients (no transport), and the step is the
    core's direction at the current point for ``E~``, through geoopt's retraction (spec §2-§3)."""
    beta, lr = 0.9, 0.05
    manifold = geoopt.SymmetricPositiveDefinite()
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    x = a @ a.T + 0.5 * torch.eye(4, dtype=torch.float64)
    p = geoopt.ManifoldParameter(x.clone(), manifold=manifold)
    opt = IMuon([p], lr=lr, momentum=beta, polar="svd")
    buf = torch.zeros_like(x)
    for _ in range(4):
        e = torch.randn(4, 4, generator=g, dtype=torch.float64)
        p.grad = e.clone()
        opt.step()
        buf = beta * buf + e
        xi = intrinsic_direction(SPD(), x, e + beta * buf, polar="svd").xi
        x = manifold.retr(x, -lr * xi)
        torch.testing.assert_close(p.detach(), x, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, atol=1e-14, rtol=0)


def test_spd_momentum_trajectory_is_congruence_equivariant():
    """At ``P X P^T`` with gradients ``P^{-T} E P^{-1}`` the whole momentum trajectory is ``P X_k P^T`` (spec §6)."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    x0 = a @ a.T + torch.eye(4, dtype=torch.float64)
    pm = torch.randn(4, 4, generator=g, dtype=torch.float64) + 2 * torch.eye(4, dtype=torch.float64)
    pinv = torch.linalg.inv(pm)
    manifold = geoopt.SymmetricPositiveDefinite()
    p = geoopt.ManifoldParameter(x0.clone(), manifold=manifold)
    q = geoopt.ManifoldParameter(pm @ x0 @ pm.T, manifold=manifold)
    opts = [IMuon([t], lr=0.05, momentum=0.9, polar="svd") for t in (p, q)]
    for _ in range(5):
        e = torch.randn(4, 4, generator=g, dtype=torch.float64)
        p.grad, q.grad = e.clone(), pinv.T @ e @ pinv
        for o in opts:
            o.step()
        torch.testing.assert_close(q.detach(), pm @ p.detach() @ pm.T, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_spd_retraction_losing_definiteness_goes_through_the_nonfinite_policy(nonfinite):
    """float32, an eigenvalue of 1e-7: geoopt's retraction ``X + U + U X^{-1} U / 2`` comes out indefinite in
    rounding (it used to be committed: an SPD parameter with a negative eigenvalue). The step now fails as a whole
    under the ``nonfinite`` policy; parameter and state are unchanged."""
    g = torch.Generator().manual_seed(0)
    qm, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    x0 = (qm @ torch.diag(torch.tensor([1e-7, 1.0, 2.0, 3.0], dtype=torch.float64)) @ qm.T).float()
    x = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.SymmetricPositiveDefinite())
    opt = IMuon([x], lr=1.0, momentum=0.9, nonfinite=nonfinite)
    x.grad = torch.eye(4)
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="SymmetricPositiveDefinite"):
            opt.step()
    else:
        opt.step()
        assert opt.last_step_skipped
    assert torch.equal(x.detach(), x0) and not opt.state[x]


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_raw_runtime_error_of_the_host_retraction_goes_through_the_nonfinite_policy(nonfinite, monkeypatch):
    """geoopt's scripted ``eigh`` fails with a plain ``RuntimeError`` (TorchScript's), not ``LinAlgError``."""

    def failing(self, x, u, *rest):
        raise RuntimeError("linalg.eigh: The algorithm failed to converge because the input matrix is ill-conditioned")

    monkeypatch.setattr(geoopt.EuclideanStiefel, "retr_transp", failing)
    monkeypatch.setattr(geoopt.EuclideanStiefel, "retr", failing)
    manifold = geoopt.EuclideanStiefel()
    x0 = manifold.random(5, 3, dtype=torch.float64)
    x = geoopt.ManifoldParameter(x0.clone(), manifold=manifold)
    opt = IMuon([x], lr=0.1, nonfinite=nonfinite)
    x.grad = torch.randn(5, 3, dtype=torch.float64)
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="failed to converge"):
            opt.step()
    else:
        opt.step()
        assert opt.last_step_skipped
    assert torch.equal(x.detach(), x0) and not opt.state[x]


# ------------------------------------------------------------------------------------ schedulers, pickling, repr


def _matrix_and_bias():
    return [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(4))]


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20),
        lambda opt: torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=0.01, max_lr=0.1, step_size_up=5, base_momentum=0.8, max_momentum=0.95
        ),
    ],
    ids=["OneCycleLR", "CyclicLR"],
)
def test_schedulers_that_cycle_momentum_drive_imuons_momentum(make):
    """torch's own schedule on SGD's ``momentum`` is the reference; the AdamW fallback's betas stay as set."""
    params = _matrix_and_bias()
    opt = IMuon(params, lr=0.1, momentum=0.9, fallback={"name": "adamw", "betas": (0.9, 0.999)})
    ref = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    sched, ref_sched = make(opt), make(ref)
    seen = []
    for _ in range(8):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
        seen.append(opt.param_groups[0]["momentum"])
        assert opt.param_groups[0]["momentum"] == pytest.approx(ref.param_groups[0]["momentum"])
        assert opt.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"])
    assert len(set(seen)) > 4  # it cycles
    assert opt.param_groups[0]["fallback"]["betas"] == (0.9, 0.999)
    assert "betas" not in opt.defaults and "betas" not in opt.param_groups[0]


def test_state_dict_pickles_with_every_option_form(tmp_path):
    register_adjust_lr_fn("test_half", lambda lr, shape: 0.5 * lr)
    params = _matrix_and_bias()
    opt = IMuon(
        params,
        lr=0.1,
        norm=("schatten", 3.0),
        polar={"method": "newton_schulz", "steps": 4, "dtype": torch.bfloat16},
        adjust_lr_fn="test_half",
        fallback={"name": "adamw", "lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-7},
    )
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=False)
    fresh = IMuon(_matrix_and_bias(), lr=0.1)
    fresh.load_state_dict(sd)
    for key in ("norm", "polar", "adjust_lr_fn", "fallback"):
        assert fresh.param_groups[0][key] == opt.param_groups[0][key]


def test_a_callable_adjust_lr_fn_is_refused_with_the_registry_as_the_fix():
    with pytest.raises(TypeError, match=r"register_adjust_lr_fn\('my_rule', fn\)"):
        IMuon(_matrix_and_bias(), lr=0.1, adjust_lr_fn=lambda lr, shape: lr)
    with pytest.raises(ValueError, match="built-in"):
        register_adjust_lr_fn("original", lambda lr, shape: lr)


def test_repr_keeps_torchs_format_and_lists_only_what_matters():
    opt = IMuon(_matrix_and_bias(), lr=0.1)
    assert repr(opt) == "IMuon (\nParameter Group 0\n    lr: 0.1\n    momentum: 0.95\n)"
    opt = IMuon([{"params": _matrix_and_bias(), "use_imuon": False}], lr=0.1, polar="svd", weight_decay=0.01)
    lines = repr(opt).splitlines()
    assert lines[:2] == ["IMuon (", "Parameter Group 0"] and lines[-1] == ")"
    assert sorted(line.split(":")[0].strip() for line in lines[2:-1]) == [
        "lr",
        "momentum",
        "polar",
        "use_imuon",
        "weight_decay",
    ]


# ------------------------------------------------------------------------------------ state dicts that do not fit


def _two_groups(swap: bool = False):
    w, b = torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(4))
    groups = [{"params": [w], "lr": 0.1}, {"params": [b], "lr": 0.01}]
    return [w, b], IMuon(groups[::-1] if swap else groups, lr=0.1)


def test_a_state_dict_with_param_groups_in_another_order_is_refused():
    params, opt = _two_groups()
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    params2, swapped = _two_groups(swap=True)
    before = [dict(g) for g in swapped.param_groups]
    with pytest.raises(ValueError, match=r"param group 0, parameter 0: the saved .* another order"):
        swapped.load_state_dict(sd)
    assert [dict(g) for g in swapped.param_groups] == before and not swapped.state  # nothing loaded
    one = IMuon([torch.nn.Parameter(torch.randn(5, 4))], lr=0.1)
    with pytest.raises(ValueError, match="2 param groups, this optimizer 1"):
        one.load_state_dict(sd)


# ------------------------------------------------------------------------------------ tensors with ndim > 2


def _svd_polar(g: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return u @ vh


def test_flatten_false_takes_one_lmo_per_slice_against_svd():
    """(E, m, n) with flatten=False: each (m, n) slice moves by -lr polar(E_slice) (float64 SVD); the default
    (flatten=True) moves the (E, m*n) view by -lr polar(E viewed as (E, m*n))."""
    g = torch.randn(3, 5, 4, dtype=torch.float64)
    x0 = torch.randn(3, 5, 4, dtype=torch.float64)
    per_slice = torch.nn.Parameter(x0.clone())
    per_slice.grad = g.clone()
    IMuon([{"params": [per_slice], "flatten": False}], lr=0.1, momentum=0.0, polar="svd").step()
    want = torch.stack([x0[i] - 0.1 * _svd_polar(g[i]) for i in range(3)])
    torch.testing.assert_close(per_slice.detach(), want, atol=1e-12, rtol=0)
    flat = torch.nn.Parameter(x0.clone())
    flat.grad = g.clone()
    IMuon([flat], lr=0.1, momentum=0.0, polar="svd").step()
    torch.testing.assert_close(
        flat.detach(), x0 - 0.1 * _svd_polar(g.reshape(3, 20)).reshape(3, 5, 4), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("norm", ["spectral", "frobenius", ("kyfan", 2)])
def test_flatten_false_equals_a_loop_of_the_two_dimensional_step(norm):
    """Momentum, Nesterov, weight decay and adjust_lr_fn over several steps: a 4-D (2, 3, 6, 4) tensor with
    flatten=False is exactly six 6 x 4 matrices stepped one by one (a joint norm too: each slice its own budget)."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64)
    grads = [torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1, polar="svd", norm=norm, adjust_lr_fn="original")
    big = torch.nn.Parameter(x0.clone())
    opt = IMuon([{"params": [big], "flatten": False}], **kw)
    slices = [torch.nn.Parameter(x0[i, j].clone()) for i in range(2) for j in range(3)]
    loops = [IMuon([s], **kw) for s in slices]
    for e in grads:
        big.grad = e.clone()
        opt.step()
        for k, (s, o) in enumerate(zip(slices, loops)):
            s.grad = e[k // 3, k % 3].clone()
            o.step()
    want = torch.stack([s.detach() for s in slices]).reshape(2, 3, 6, 4)
    torch.testing.assert_close(big.detach(), want, atol=1e-12, rtol=0)


def test_flatten_false_is_one_batched_call(monkeypatch):
    from imuon_manopt.optim import _steps

    calls = []
    real = _steps.direction

    def counting(geometry, x, e, group):
        calls.append(tuple(x.shape))
        return real(geometry, x, e, group)

    monkeypatch.setattr(_steps, "direction", counting)
    ps = [torch.nn.Parameter(torch.randn(4, 3, 5, 2)) for _ in range(2)]
    for p in ps:
        p.grad = torch.randn_like(p)
    IMuon([{"params": ps, "flatten": False}], lr=0.1).step()
    assert calls == [(24, 5, 2)]  # both tensors, every slice: one stacked call


def test_flatten_must_be_a_bool():
    with pytest.raises(ValueError, match="flatten must be a bool"):
        IMuon([{"params": [torch.nn.Parameter(torch.randn(2, 3, 4))], "flatten": "slices"}], lr=0.1)


# ------------------------------------------------------------------------------------ malformed input, meta device


@pytest.mark.parametrize("bad", [3.0, "w", None, [torch.randn(2, 2)]])
def test_a_non_tensor_in_params_is_a_type_error(bad):
    with pytest.raises(TypeError, match="parameter 1: IMuon optimizes tensors"):
        IMuon([torch.nn.Parameter(torch.randn(3, 3)), bad], lr=0.1)
    with pytest.raises(TypeError, match="param group 1, parameter 0: IMuon optimizes tensors"):
        IMuon([{"params": [torch.nn.Parameter(torch.randn(3, 3))]}, {"params": [bad]}], lr=0.1)


def test_meta_device_parameters_step_like_torchs_adamw():
    """Shapes only (as torch's own AdamW does on the meta device): every kind of parameter steps, the state has the
    shapes and the working dtypes a real step gives, and the AdamW fallback does not take the capturable path."""
    with torch.device("meta"):
        w = torch.nn.Parameter(torch.randn(4, 3))
        bias = torch.nn.Parameter(torch.randn(4))
        half = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))
        b, a = torch.nn.Parameter(torch.randn(5, 2)), torch.nn.Parameter(torch.randn(2, 3))
        frame = geoopt.ManifoldParameter(torch.empty(5, 3), manifold=geoopt.EuclideanStiefel())
    params = [w, bias, half, b, a, frame]
    opt = IMuon(params, lr=0.1, pairs=[(b, a)])
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        assert p.is_meta
        st = opt.state[p]
        assert st["step"] == 2
        keys = ("exp_avg", "exp_avg_sq") if p.ndim == 1 else ("momentum_buffer",)
        for key in keys:
            assert st[key].is_meta and st[key].shape == p.shape and st[key].dtype == torch.float32
