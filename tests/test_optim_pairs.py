"""Fixed-rank factor pairs: gauge invariance, rank safety, LoRA helpers (hand-made PEFT layout)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from imuon_manopt.optim import IMuon, full_rank_lora_init_, full_rank_lora_model_init_, lora_pairs

DT = torch.float64


def _loss(b: torch.Tensor, a: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = b @ a
    return 0.5 * ((x - target) ** 2).sum() + 0.05 * (x**4).sum()


def _train_pair(b0, a0, target, steps, make_opt):
    b, a = nn.Parameter(b0.clone()), nn.Parameter(a0.clone())
    opt = make_opt(b, a)
    for _ in range(steps):
        opt.zero_grad()
        _loss(b, a, target).backward()
        opt.step()
    return b.detach() @ a.detach()


@pytest.mark.parametrize("norm", ["spectral", "frobenius"])
def test_gauge_invariance_of_the_pair_trajectory(norm):
    """(B M, M^{-1} A) follows the same product trajectory as (B, A); AdamW does not."""
    torch.manual_seed(5)
    m, r, n = 8, 3, 6
    b0, a0 = torch.randn(m, r, dtype=DT), torch.randn(r, n, dtype=DT)
    target = torch.randn(m, n, dtype=DT)
    gauge = torch.randn(r, r, dtype=DT) + 2 * torch.eye(r, dtype=DT)

    def imuon(b, a):
        return IMuon([b, a], lr=0.02, momentum=0.9, polar="svd", norm=norm, pairs=[(b, a)])

    x_ref = _train_pair(b0, a0, target, 6, imuon)
    x_gauge = _train_pair(b0 @ gauge, torch.linalg.solve(gauge, a0), target, 6, imuon)
    torch.testing.assert_close(x_gauge, x_ref, atol=1e-9, rtol=1e-9)
    assert (x_ref - b0 @ a0).abs().max() > 0.05  # it moved

    def adamw(b, a):
        return torch.optim.AdamW([b, a], lr=0.02)

    y_ref = _train_pair(b0, a0, target, 6, adamw)
    y_gauge = _train_pair(b0 @ gauge, torch.linalg.solve(gauge, a0), target, 6, adamw)
    assert (y_ref - y_gauge).abs().max() > 1e-3


def test_ambient_mode_is_only_orthogonally_invariant():
    torch.manual_seed(6)
    b0, a0 = torch.randn(7, 2, dtype=DT), torch.randn(2, 5, dtype=DT)
    target = torch.randn(7, 5, dtype=DT)
    q = torch.linalg.qr(torch.randn(2, 2, dtype=DT))[0]
    g = torch.tensor([[2.0, 1.0], [0.0, 0.5]], dtype=DT)

    def ambient(b, a):
        return IMuon([{"params": [b, a], "pair_momentum": "ambient"}], lr=0.02, polar="svd", pairs=[(b, a)])

    x_ref = _train_pair(b0, a0, target, 4, ambient)
    torch.testing.assert_close(_train_pair(b0 @ q, q.T @ a0, target, 4, ambient), x_ref)
    x_gl = _train_pair(b0 @ g, torch.linalg.solve(g, a0), target, 4, ambient)
    assert (x_gl - x_ref).abs().max() > 1e-4


def test_rank_deficient_factor_raises_a_helpful_error():
    b = nn.Parameter(torch.zeros(6, 2, dtype=DT))  # LoRA's B = 0 start
    a = nn.Parameter(torch.randn(2, 5, dtype=DT))
    w = nn.Parameter(torch.randn(3, 3, dtype=DT))
    opt = IMuon([w, b, a], lr=0.01, pairs=[(b, a)])
    b.grad, a.grad, w.grad = torch.randn_like(b), torch.randn_like(a), torch.randn_like(w)
    w0 = w.detach().clone()
    with pytest.raises(ValueError, match=r"pairs\[0\].*rank-deficient.*full_rank_lora_init_"):
        opt.step()
    assert torch.equal(w.detach(), w0) and not opt.state[w]  # nothing written


def test_backtracking_keeps_factors_full_rank():
    """A has orthonormal rows (R_A = I): xi_B = polar(E_B); a unit step zeroes B's second column."""
    b0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=DT)
    a0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=DT)
    e_b = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=DT)
    # batch of two: the first pair needs backtracking, the second (half the gradient direction)
    # does not
    b = nn.Parameter(torch.stack([b0, 2 * b0]))
    a = nn.Parameter(torch.stack([a0, a0]))
    b.grad = torch.stack([e_b, e_b])
    a.grad = torch.zeros_like(a)
    IMuon([b, a], lr=1.0, momentum=0.0, polar="svd", pairs=[(b, a)]).step()
    torch.testing.assert_close(b.detach()[0], b0 - 0.5 * e_b)  # halved once
    torch.testing.assert_close(b.detach()[1], 2 * b0 - e_b)  # full step
    torch.testing.assert_close(a.detach(), torch.stack([a0, a0]))


def test_ill_conditioned_factor_may_not_degrade_further():
    """Below the sqrt(eps) guard the product's s_min / s_max may not shrink: such a step is refused."""
    b0 = torch.tensor([[1.0, 0.0], [0.0, 1e-5], [0.0, 0.0]])  # float32, ratio 1e-5 < sqrt(eps) ~ 3.5e-4
    a0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b, a = nn.Parameter(b0.clone()), nn.Parameter(a0.clone())
    b.grad = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # pushes the small column to zero
    a.grad = torch.zeros_like(a)
    opt = IMuon([b, a], lr=1e-6, momentum=0.0, polar="svd", pairs=[(b, a)])  # does not jump across 0
    opt.step()
    assert torch.equal(b.detach(), b0) and torch.equal(a.detach(), a0)
    b.grad = -b.grad  # the opposite direction improves the conditioning: taken in full
    opt.step()
    torch.testing.assert_close(b.detach()[1, 1], torch.tensor(1e-5 + 1e-6))


def test_rank_guard_is_gauge_invariant():
    """The rank guard looks at the product B A, not at the factors: a pair written in an extreme gauge
    (factor condition numbers 1e9, below the float64 guard sqrt(eps) ~ 1.5e-8) takes the same step as
    the balanced pair."""
    torch.manual_seed(7)
    m, r, n = 9, 3, 7
    b0, a0 = torch.randn(m, r, dtype=DT), torch.randn(r, n, dtype=DT)
    target = torch.randn(m, n, dtype=DT)
    q1 = torch.linalg.qr(torch.randn(r, r, dtype=DT))[0]
    q2 = torch.linalg.qr(torch.randn(r, r, dtype=DT))[0]
    gauge = q1 @ torch.diag(torch.tensor([1.0, 1e-4, 1e-9], dtype=DT)) @ q2

    def imuon(b, a):
        return IMuon([b, a], lr=0.05, momentum=0.0, polar="svd", pairs=[(b, a)])

    x_ref = _train_pair(b0, a0, target, 3, imuon)
    x_gauge = _train_pair(b0 @ gauge, torch.linalg.solve(gauge, a0), target, 3, imuon)
    assert (x_ref - b0 @ a0).abs().max() > 0.05  # it moved
    torch.testing.assert_close(x_gauge, x_ref, atol=1e-6, rtol=1e-6)


class LoraLinear(nn.Module):
    """PEFT-style LoRA layer: base_layer, lora_A / lora_B ModuleDicts, scaling dict, B = 0."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float = 4.0, fan_in_fan_out: bool = False):
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out, bias=True).double()
        if fan_in_fan_out:  # GPT-2 Conv1D stores the weight as (in, out)
            self.base_layer.weight = nn.Parameter(self.base_layer.weight.detach().T.clone())
        self.fan_in_fan_out = fan_in_fan_out
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, r, bias=False).double()})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, d_out, bias=False).double()})
        nn.init.zeros_(self.lora_B["default"].weight)
        self.scaling = {"default": alpha / r}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight.T if self.fan_in_fan_out else self.base_layer.weight
        base = nn.functional.linear(x, w, self.base_layer.bias)
        return base + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling["default"]


class TinyPeftModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = LoraLinear(6, 5, 2)
        self.v_proj = LoraLinear(5, 4, 3, fan_in_fan_out=True)
        self.norm = nn.LayerNorm(4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.v_proj(torch.tanh(self.q_proj(x))))


def test_lora_pairs_finds_peft_layout():
    model = TinyPeftModel()
    pairs = lora_pairs(model)
    assert len(pairs) == 2
    for (b, a), layer in zip(pairs, (model.q_proj, model.v_proj)):
        assert b is layer.lora_B["default"].weight and a is layer.lora_A["default"].weight
    assert lora_pairs(model, adapter="other") == []
    model.q_proj.lora_A["default"].weight.requires_grad_(False)
    assert len(lora_pairs(model)) == 1 and len(lora_pairs(model, trainable_only=False)) == 2


def test_lora_pairs_by_parameter_name():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Module()
            self.block.lora_A = nn.Module()  # no lora_B attribute on the same module: names must do it
            self.block.lora_A.default = nn.Parameter(torch.randn(2, 6))
            self.block.extra = nn.Module()
            self.block.extra.lora_B = nn.Module()

    holder = Holder()
    holder.register_module("x", nn.Module())
    holder.x.lora_A = nn.ParameterDict({"default": nn.Parameter(torch.randn(2, 6))})
    holder.x.lora_B_store = nn.ParameterDict({"default": nn.Parameter(torch.randn(5, 2))})
    # name rule: "<prefix>.lora_A.<rest>" pairs with "<prefix>.lora_B.<rest>"
    holder.y = nn.Module()
    holder.y.lora_A = nn.ParameterDict({"default": nn.Parameter(torch.randn(3, 4))})
    holder.y.lora_B = nn.ParameterDict({"default": nn.Parameter(torch.randn(7, 3))})
    # containers without weights: only the parameter names tie them together
    holder.z = nn.Module()
    holder.z.lora_A, holder.z.lora_B = nn.Module(), nn.Module()
    holder.z.lora_A.default = nn.Parameter(torch.randn(2, 8))
    holder.z.lora_B.default = nn.Parameter(torch.randn(9, 2))
    pairs = lora_pairs(holder)
    assert len(pairs) == 2
    (b, a), (b2, a2) = pairs
    assert b is holder.y.lora_B["default"] and a is holder.y.lora_A["default"]
    assert b2 is holder.z.lora_B.default and a2 is holder.z.lora_A.default


def test_full_rank_lora_init_keeps_the_function():
    torch.manual_seed(7)
    model = TinyPeftModel()
    x = torch.randn(9, 6, dtype=DT)
    before = model(x).detach()
    assert full_rank_lora_model_init_(model) == 2
    torch.testing.assert_close(model(x).detach(), before, atol=1e-12, rtol=1e-12)
    for b, a in lora_pairs(model):
        assert torch.linalg.matrix_rank(b) == b.shape[1] and torch.linalg.matrix_rank(a) == a.shape[0]

    # and IMuon now trains the adapters (base frozen, norm via AdamW)
    base = model.q_proj.base_layer.weight.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = IMuon(params, lr=0.01, pairs=lora_pairs(model), polar="svd")
    target = torch.randn(9, 4, dtype=DT)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(model.q_proj.base_layer.weight.detach(), base)


def test_full_rank_lora_init_single_layer_and_errors():
    w = torch.randn(5, 6, dtype=DT)
    b, a = torch.zeros(5, 2, dtype=DT), torch.zeros(2, 6, dtype=DT)
    w_before = w.clone()
    full_rank_lora_init_(w, b, a, scaling=2.0)
    torch.testing.assert_close(w + 2.0 * b @ a, w_before, atol=1e-14, rtol=0)
    assert torch.linalg.matrix_rank(b) == 2 and torch.linalg.matrix_rank(a) == 2
    b_keep, a_keep = b.clone(), a.clone()
    full_rank_lora_init_(w, b, a)  # already full rank: untouched
    assert torch.equal(b, b_keep) and torch.equal(a, a_keep)
    with pytest.raises(ValueError, match="base_weight has shape"):
        full_rank_lora_init_(torch.zeros(6, 5), torch.zeros(5, 2), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="B must have shape"):
        full_rank_lora_init_(torch.zeros(5, 6), torch.zeros(5, 2), torch.zeros(3, 6))


# ----------------------------------------------------------------------- fast paths of the pair step


def test_full_step_screen_answers_as_the_exact_check():
    """The Gram screen of ``_full_step_passes`` gives the exact QR-based answer: on well-conditioned products, on
    products whose ratio sits just above and below the tolerance, and on non-finite factors."""
    from imuon_manopt.optim import _pairs
    from imuon_manopt.optim._pairs import _full_step_passes, _full_step_passes_exact

    g = torch.Generator().manual_seed(0)
    tol = math.sqrt(torch.finfo(torch.float32).eps)
    for ratio in (1.0, 0.1, 30 * tol, 17 * tol, 2 * tol, 1.01 * tol, 0.99 * tol, 0.5 * tol, 0.0):
        # big enough for the screen to run (small groups go straight to the exact check)
        qb = torch.linalg.qr(torch.randn(40, 400, 4, generator=g, dtype=torch.float64))[0]
        qa = torch.linalg.qr(torch.randn(40, 300, 4, generator=g, dtype=torch.float64))[0]
        s = torch.tensor([1.0, 0.5, 0.3, ratio], dtype=torch.float64)
        b = (qb * s).float()  # the product's singular values are s (A has orthonormal rows)
        a = qa.mT.float()
        assert b.numel() + a.numel() >= _pairs._SCREEN_MIN_ELEMENTS
        assert _full_step_passes(b, a, tol) == _full_step_passes_exact(b, a, tol), ratio
    b[2, 0, 0] = float("nan")  # the screen defers to the exact check, whose factorization reports it
    for check in (_full_step_passes, _full_step_passes_exact):
        with pytest.raises(torch.linalg.LinAlgError):
            check(b, a, tol)


@pytest.mark.parametrize("dtype, cond", [(torch.float64, 1e6), (torch.float32, 1e3)])
def test_thin_triangular_solves_match_the_solver(dtype, cond):
    """FixedRank's whitening multiplies long blocks by the inverse of the r x r triangle instead of a triangular
    solve; both agree to the solve's own accuracy, also for an ill-conditioned triangle."""
    from imuon_manopt.geometry.fixed_rank import _solve_triangular

    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(3, 8, 8, generator=g, dtype=torch.float64))[0]
    r = torch.linalg.qr(u * torch.logspace(0, -math.log10(cond), 8, dtype=torch.float64), mode="r")[1]
    long = torch.randn(3, 200, 8, generator=g, dtype=torch.float64)
    for upper, mat in ((True, r), (False, r.mT)):
        for left, rhs in ((True, long.mT), (False, long)):
            ref = torch.linalg.solve_triangular(mat, rhs, upper=upper, left=left)
            got = _solve_triangular(mat.to(dtype), rhs.to(dtype), upper=upper, left=left).double()
            err = (got - ref).abs().max() / ref.abs().max()
            assert err <= 50 * cond * torch.finfo(dtype).eps, (upper, left, float(err))
