"""Reliability of :class:`imuon_manopt.optim.IMuon` under what users do besides stepping: resuming half-precision
training from a state dict, SPD parameters with momentum, schedulers, pickling, tensors with more than two dims,
and malformed input."""

from __future__ import annotations

import io

import pytest
import torch

from imuon_manopt.optim import IMuon

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
