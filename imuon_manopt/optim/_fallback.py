"""The fallback for tensors iMuon does not step (``ndim < 2``, or ``use_imuon=False``): torch's own AdamW or SGD.

The update is torch's public functional implementation (``torch.optim.adamw.adamw`` / ``torch.optim.sgd.sgd``,
``foreach``) run on *copies* of the parameters and state in the working dtype (at least float32), so nothing is
written before the optimizer has checked the whole step. SGD's weight decay is decoupled here (``p <- (1 - lr wd)
p``, as AdamW's), so that one ``weight_decay`` means the same for every kind of parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from ._distributed import local
from ._lr import fallback_lr
from ._options import fallback_spec
from ._state import host_step, work_dtype


def _copy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if t is None else local(t).to(like.dtype, copy=True)  # a DTensor's shard


def fallback_outputs(
    group: dict[str, Any],
    xs: list[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    states: list[dict[str, Any]],
    capturable: bool,
) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """New parameter values (working dtype) and new state entries for one group's fallback tensors.

    ``xs`` and ``grads`` are the (local) parameter and gradient tensors; ``states`` their state dicts, read only.
    ``capturable`` keeps AdamW's step counters on the parameters' device (no host synchronization).
    """
    new_x = [x.to(work_dtype(x), copy=True) for x in xs]
    g = [torch.zeros_like(x) if gr is None else gr.to(x.dtype) for gr, x in zip(grads, new_x)]
    spec = fallback_spec(group)
    lr = fallback_lr(group, spec.lr)
    wd = group["weight_decay"]
    if spec.name == "sgd":
        beta = group["momentum"]
        if wd > 0:
            torch._foreach_mul_(new_x, 1.0 - lr * wd)
        bufs: list[Any] = [  # torch's sgd fills the None entries with new buffers
            None if beta == 0 or "momentum_buffer" not in s else _copy(s["momentum_buffer"], x)
            for s, x in zip(states, new_x)
        ]
        sgd(
            new_x,
            g,
            bufs,
            foreach=True,
            weight_decay=0.0,
            momentum=beta,
            lr=lr,
            dampening=0.0,
            nesterov=group["nesterov"] and beta > 0,
            maximize=False,
        )
        return new_x, ({"momentum_buffer": bufs} if beta > 0 else {})
    m = [_copy(s.get("exp_avg"), x) for s, x in zip(states, new_x)]
    v = [_copy(s.get("exp_avg_sq"), x) for s, x in zip(states, new_x)]
    if capturable:
        steps = [
            torch.as_tensor(s.get("step", 0), dtype=torch.float32, device=x.device).clone()
            for s, x in zip(states, new_x)
        ]
    else:
        steps = [torch.tensor(float(host_step(s.get("step", 0)))) for s in states]
    beta1, beta2 = spec.betas
    adamw(
        new_x,
        g,
        m,
        v,
        [],
        steps,
        foreach=True,
        capturable=capturable,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=wd,
        eps=spec.eps,
        maximize=False,
    )
    return new_x, {"exp_avg": m, "exp_avg_sq": v}
