"""The stacked state of IMuon's plain-matrix and pair groups: momentum kept as one tensor per group between steps,
seen per parameter by ``state_dict()``, rebuilt from whatever the state entries hold after ``load_state_dict`` or a
user's edit, and a step whose tensor copies do not grow with the number of parameters.

Truths: an uninterrupted run of the same optimizer (resume), one optimizer per parameter (each parameter its own
group: nothing stacked), and counts of aten operations seen by a ``TorchDispatchMode``.
"""

from __future__ import annotations

import copy
import io
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from imuon_manopt.optim import IMuon

DT = torch.float64
OPTS = dict(lr=0.05, polar="svd", momentum=0.9)


def _model(n_pairs: int = 4, n_mats: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.nn.Parameter(torch.randn(6, 4, generator=g, dtype=DT)) for _ in range(n_mats)]
    pairs = [
        (
            torch.nn.Parameter(torch.randn(9, 2, generator=g, dtype=DT)),
            torch.nn.Parameter(torch.randn(2, 7, generator=g, dtype=DT)),
        )
        for _ in range(n_pairs)
    ]
    return mats, pairs


def _flat(mats, pairs):
    return mats + [t for pair in pairs for t in pair]


def _set_grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=DT)


def _run(opt, params, steps: range) -> None:
    for k in steps:
        _set_grads(params, k)
        opt.step()


def _clone(mats, pairs):
    mats2 = [torch.nn.Parameter(m.detach().clone()) for m in mats]
    pairs2 = [(torch.nn.Parameter(b.detach().clone()), torch.nn.Parameter(a.detach().clone())) for b, a in pairs]
    return mats2, pairs2


def test_momentum_is_one_stacked_tensor_per_group_seen_per_parameter():
    mats, pairs = _model()
    opt = IMuon(_flat(mats, pairs), pairs=pairs, **OPTS)
    _run(opt, _flat(mats, pairs), range(2))
    sd = opt.state_dict()
    for i, p in enumerate(_flat(mats, pairs)):
        buf = sd["state"][i]["momentum_buffer"]
        assert buf.shape == p.shape and buf.dtype == DT
    # the rows of one tensor per run of equal shapes: the matrices, the B factors, the A factors
    for run in (mats, [b for b, _ in pairs], [a for _, a in pairs]):
        bases = {opt.state[p]["momentum_buffer"]._base.data_ptr() for p in run}
        assert len(bases) == 1


def test_resume_from_a_state_dict_of_independent_tensors_equals_the_uninterrupted_run():
    mats, pairs = _model()
    ref_m, ref_p = _clone(mats, pairs)
    ref = IMuon(_flat(ref_m, ref_p), pairs=ref_p, **OPTS)
    _run(ref, _flat(ref_m, ref_p), range(5))

    opt = IMuon(_flat(mats, pairs), pairs=pairs, **OPTS)
    _run(opt, _flat(mats, pairs), range(2))
    sd = copy.deepcopy(opt.state_dict())  # independent tensors per parameter (the layout older versions wrote)
    for st in sd["state"].values():
        st["momentum_buffer"] = st["momentum_buffer"].clone()
        assert st["momentum_buffer"]._base is None
    # a fresh optimizer on the same parameters, through a file
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = IMuon(_flat(mats, pairs), pairs=pairs, **OPTS)
    fresh.load_state_dict(torch.load(buf))
    _run(fresh, _flat(mats, pairs), range(2, 5))
    for p, q in zip(_flat(mats, pairs), _flat(ref_m, ref_p)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    for p, q in zip(_flat(mats, pairs), _flat(ref_m, ref_p)):
        torch.testing.assert_close(
            fresh.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], rtol=0, atol=1e-12
        )


def test_edits_of_state_entries_take_effect_like_in_the_per_parameter_optimizer():
    mats, pairs = _model()
    sep_m, sep_p = _clone(mats, pairs)
    grouped = IMuon(_flat(mats, pairs), pairs=pairs, **OPTS)
    # one param group per matrix and per pair: every group holds one item, nothing is stacked across parameters
    separate = IMuon(
        [{"params": [m]} for m in sep_m] + [{"params": [b, a]} for b, a in sep_p],
        pairs=sep_p,
        **OPTS,
    )
    _run(grouped, _flat(mats, pairs), range(2))
    _run(separate, _flat(sep_m, sep_p), range(2))
    for opt, (ms, ps) in ((grouped, (mats, pairs)), (separate, (sep_m, sep_p))):
        opt.state[ms[1]]["momentum_buffer"].zero_()  # in place
        opt.state[ps[2][1]]["momentum_buffer"] = torch.ones(2, 7, dtype=DT)  # replaced
    _run(grouped, _flat(mats, pairs), range(2, 4))
    _run(separate, _flat(sep_m, sep_p), range(2, 4))
    for p, q in zip(_flat(mats, pairs), _flat(sep_m, sep_p)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        torch.testing.assert_close(
            grouped.state[p]["momentum_buffer"], separate.state[q]["momentum_buffer"], rtol=0, atol=1e-12
        )


class _Count(TorchDispatchMode):
    """Counts aten operations that allocate or copy data (views and metadata operations are free)."""

    FREE = ("view", "detach", "unbind", "expand", "transpose", "t.", "alias", "slice", "select", "_unsafe_view")

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not any(f in name for f in self.FREE):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def test_step_operations_do_not_grow_with_the_number_of_parameters():
    counts = []
    for n in (3, 12):
        mats, pairs = _model(n_pairs=n, n_mats=n)
        opt = IMuon(_flat(mats, pairs), pairs=pairs, **OPTS)
        _run(opt, _flat(mats, pairs), range(2))
        _set_grads(_flat(mats, pairs), 2)
        mode = _Count()
        with mode:
            opt.step()
        counts.append(mode.ops)
    assert counts[0] == counts[1], (counts[0] - counts[1]) + (counts[1] - counts[0])
    copies = sum(v for k, v in counts[1].items() if any(c in k for c in ("copy", "stack", "cat", "clone")))
    # one gather of parameters and one of gradients per run of equal shapes (3 runs), one scatter
    assert counts[1]["aten.stack.default"] <= 2 * 3 + 1
    assert counts[1]["aten._foreach_copy_.default"] == 1
    assert copies <= 12
