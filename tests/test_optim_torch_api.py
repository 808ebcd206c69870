"""IMuon as a torch optimizer: resume, schedulers, closures, groups, None grads, NaN/Inf."""

from __future__ import annotations

import copy
import io

import geoopt
import pytest
import torch

from imuon_manopt import geometry as geo
from imuon_manopt.direction import intrinsic_direction
from imuon_manopt.optim import IMuon

DT = torch.float64


class Mixed(torch.nn.Module):
    """Every kind of parameter IMuon routes: matrix, conv, bias, Stiefel, SPD, sphere, pair."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 5).double()
        self.conv = torch.nn.Conv1d(2, 3, 3).double()
        st, spd, sph = geoopt.Stiefel(), geoopt.SymmetricPositiveDefinite(), geoopt.Sphere()
        self.frame = geoopt.ManifoldParameter(st.random(2, 6, 2, dtype=DT), manifold=st)
        a = torch.randn(3, 3, dtype=DT)
        self.cov = geoopt.ManifoldParameter(a @ a.T + torch.eye(3, dtype=DT), manifold=spd)
        self.dirs = geoopt.ManifoldParameter(sph.random(2, 5, dtype=DT), manifold=sph)
        self.lora_b = torch.nn.Parameter(torch.randn(5, 2, dtype=DT))
        self.lora_a = torch.nn.Parameter(torch.randn(2, 6, dtype=DT))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x) + x[:, :5] @ (self.lora_b @ self.lora_a)[:, :5].T
        c = self.conv(x[:, None, :4].expand(-1, 2, -1)).sum()
        geo_terms = (
            (self.frame**2 * torch.arange(12, dtype=DT).reshape(6, 2)).sum()
            + torch.trace(self.cov @ self.cov)
            + (self.dirs[:, 0]).sum()
        )
        return (h**2).mean() + 0.1 * c + 0.01 * geo_terms

    def optimizer(self, **kw) -> IMuon:
        return IMuon(self.parameters(), lr=0.01, pairs=[(self.lora_b, self.lora_a)], polar="svd", **kw)


def _train(model: Mixed, opt: IMuon, data: list[torch.Tensor]) -> None:
    for x in data:
        opt.zero_grad()
        model.loss(x).backward()
        opt.step()


def test_resumed_run_is_bit_identical():
    torch.manual_seed(3)
    model = Mixed()
    start = copy.deepcopy(model.state_dict())
    data = [torch.randn(8, 6, dtype=DT) for _ in range(6)]

    opt = model.optimizer()
    _train(model, opt, data)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(start)
    opt = model.optimizer()
    _train(model, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    del model, opt

    torch.manual_seed(99)  # a different random state must not matter
    resumed = Mixed()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt = resumed.optimizer()
    opt.load_state_dict(ckpt["opt"])
    _train(resumed, opt, data[3:])
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, straight[k]), k


def test_step_lr_scheduler_drives_the_step_length():
    w = torch.nn.Parameter(torch.randn(6, 4, dtype=DT))
    opt = IMuon([w], lr=0.1, momentum=0.0, polar="svd")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lengths = []
    for _ in range(5):
        before = w.detach().clone()
        w.grad = torch.randn_like(w)
        opt.step()
        sched.step()
        lengths.append(float(torch.linalg.matrix_norm(w.detach() - before, ord=2)))
    assert lengths == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025], rel=1e-10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_closure_is_evaluated_with_grad_enabled():
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=DT))
    target = torch.randn(4, 3, dtype=DT)
    opt = IMuon([w], lr=0.01)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss

    before = w.detach().clone()
    loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert not torch.equal(before, w.detach())


def test_params_without_grad_are_skipped_and_zero_grad_clears():
    w, v = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    bias = torch.nn.Parameter(torch.randn(3))
    opt = IMuon([w, v, bias], lr=0.01)
    w.grad = torch.randn_like(w)
    v0, b0 = v.detach().clone(), bias.detach().clone()
    opt.step()
    assert torch.equal(v.detach(), v0) and torch.equal(bias.detach(), b0)
    assert len(opt.state[v]) == 0 and len(opt.state[bias]) == 0
    opt.zero_grad()
    assert w.grad is None
    w0 = w.detach().clone()
    assert opt.step() is None
    assert torch.equal(w.detach(), w0)


def test_param_groups_keep_their_own_options():
    w, v = (
        torch.nn.Parameter(torch.randn(5, 3, dtype=DT)),
        torch.nn.Parameter(torch.randn(5, 3, dtype=DT)),
    )
    w0, v0 = w.detach().clone(), v.detach().clone()
    w.grad, v.grad = torch.randn_like(w), torch.randn_like(v)
    opt = IMuon(
        [{"params": [w]}, {"params": [v], "lr": 0.02, "norm": "frobenius"}],
        lr=0.1,
        momentum=0.0,
        polar="svd",
    )
    opt.step()
    xi_w = intrinsic_direction(geo.Euclidean(), w0, w.grad, polar="svd").xi
    xi_v = intrinsic_direction(geo.Euclidean(), v0, v.grad, "frobenius").xi
    torch.testing.assert_close(w.detach(), w0 - 0.1 * xi_w)
    torch.testing.assert_close(v.detach(), v0 - 0.02 * xi_v)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))], "momentum": 0.5})
    assert opt.param_groups[-1]["momentum"] == 0.5 and opt.param_groups[-1]["norm"] == "spectral"
    with pytest.raises(ValueError, match="polar='qr'"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))], "polar": "qr"})


def _snapshot(model: torch.nn.Module, opt: IMuon):
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    return params, state


def _same(snap_a, snap_b) -> bool:
    (pa, sa), (pb, sb) = snap_a, snap_b
    if not all(torch.equal(x, y) for x, y in zip(pa, pb)) or sa.keys() != sb.keys():
        return False

    def eq(x, y) -> bool:
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y

    return all(sa[k].keys() == sb[k].keys() and all(eq(sa[k][n], sb[k][n]) for n in sa[k]) for k in sa)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["lin.weight", "lin.bias", "frame", "lora_a"])
def test_nonfinite_gradient_changes_nothing(bad, where):
    torch.manual_seed(4)
    model = Mixed()
    opt = model.optimizer()
    x = torch.randn(8, 6, dtype=DT)
    _train(model, opt, [x])  # state buffers exist
    model.loss(x).backward()
    grad = dict(model.named_parameters())[where].grad
    grad[(0,) * grad.ndim] = bad
    snap = _snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="non-finite gradient.*nonfinite='skip'"):
        opt.step()
    assert _same(snap, _snapshot(model, opt))

    opt.nonfinite = "skip"
    opt.step()
    assert opt.last_step_skipped
    assert _same(snap, _snapshot(model, opt))
    opt.zero_grad()
    model.loss(x).backward()
    opt.step()
    assert not opt.last_step_skipped and not _same(snap, _snapshot(model, opt))


def test_nonfinite_update_changes_nothing():
    """Finite gradients but an overflowing update (huge lr on a bias): still all-or-nothing."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    bias = torch.nn.Parameter(torch.randn(3))
    opt = IMuon(
        [{"params": [w]}, {"params": [bias], "lr": 1e38, "fallback": "sgd"}],
        lr=0.01,
        nonfinite="skip",
    )
    w.grad, bias.grad = torch.randn_like(w), torch.full_like(bias, 1e3)
    w0, b0 = w.detach().clone(), bias.detach().clone()
    opt.step()
    assert opt.last_step_skipped
    assert torch.equal(w.detach(), w0) and torch.equal(bias.detach(), b0)
    assert len(opt.state[w]) == 0


def test_off_manifold_parameter_is_reported_on_the_first_step():
    st = geoopt.EuclideanStiefel()
    p = geoopt.ManifoldParameter(st.random(6, 2, dtype=DT), manifold=st)
    p.data.mul_(1.5)
    p.grad = torch.randn_like(p)
    opt = IMuon([p], lr=0.01)
    with pytest.raises(ValueError, match="not on its manifold.*projx"):
        opt.step()
    assert len(opt.state[p]) == 0


def test_stabilize_projects_back_onto_the_manifold():
    st = geoopt.EuclideanStiefel()
    p = geoopt.ManifoldParameter(st.random(6, 2, dtype=DT), manifold=st)
    opt = IMuon([p], lr=0.01, stabilize=1)
    p.grad = torch.randn_like(p)
    opt.step()
    p.data.add_(1e-7)  # drift that the next stabilize removes
    p.grad = torch.randn_like(p)
    opt.step()
    torch.testing.assert_close(p.detach().mT @ p.detach(), torch.eye(2, dtype=DT), atol=1e-12, rtol=0)
