"""IMuon's compiled and capturable steps: ``compile=`` (each plain-matrix and pair group's numerical step under
``torch.compile(fullgraph=True)``) and ``capturable=True`` (device-side finiteness, state written in place, a
CUDA-graph-capturable step).

Truths: torch._dynamo's own graph-break count, and the eager optimizer run on the same gradients (float64, exact
polar factors, so the compiled and eager steps must agree to rounding).
"""

from __future__ import annotations

import functools

import pytest
import torch

from imuon_manopt.optim import IMuon, _pairs, _steps

DT = torch.float64


def _model(dtype=DT, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.nn.Parameter(torch.randn(6, 4, generator=g, dtype=dtype)) for _ in range(2)]
    pairs = [
        (
            torch.nn.Parameter(torch.randn(9, 2, generator=g, dtype=dtype)),
            torch.nn.Parameter(torch.randn(2, 7, generator=g, dtype=dtype)),
        )
        for _ in range(2)
    ]
    params = mats + [t for pair in pairs for t in pair]
    if bias:
        params.append(torch.nn.Parameter(torch.randn(5, generator=g, dtype=dtype)))  # the AdamW fallback
    return params, pairs


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _run_pair(opt_a, pa, opt_b, pb, steps, lrs=None):
    for k in range(steps):
        for p, q, gr in zip(pa, pb, _grads(pa, k)):
            p.grad, q.grad = gr.clone(), gr.clone()
        if lrs is not None:
            for opt in (opt_a, opt_b):
                for group in opt.param_groups:
                    if isinstance(group["lr"], torch.Tensor):
                        group["lr"].fill_(lrs[k])
                    else:
                        group["lr"] = lrs[k]
        opt_a.step()
        opt_b.step()


def _close(pa, pb, atol=1e-12):
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


@pytest.mark.parametrize("kind", ["matrix", "pair"])
def test_group_steps_trace_without_graph_breaks(kind):
    params, pairs = _model(torch.float32, bias=False)
    group = IMuon(params, lr=0.05, pairs=pairs, weight_decay=0.01).param_groups[0]
    if kind == "matrix":
        shape2d = (6, 4)
        body = _steps.matrix_body(group, shape2d, torch.float32)
        xs, gs = [torch.randn(3, 6, 4)], [torch.randn(3, 6, 4)]
    else:
        shape2d = (9, 7)
        body = _pairs.pair_body(group, shape2d, torch.float32, lazy=False)
        xs, gs = [torch.randn(3, 9, 2), torch.randn(3, 2, 7)], [torch.randn(3, 9, 2), torch.randn(3, 2, 7)]
    fn = functools.partial(_steps.group_step, body, beta=0.95, use_nesterov=True, feedback=False, wdt=torch.float32)
    bufs = [torch.randn_like(g) for g in gs]
    scalars = _steps.step_scalars(group, shape2d, tensor=True)
    explanation = torch._dynamo.explain(fn)(xs, gs, bufs, scalars)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_step_equals_the_eager_step_and_follows_the_lr():
    torch._dynamo.reset()
    pa, pairs_a = _model()
    pb, pairs_b = _model()
    eager = IMuon(pa, lr=0.05, pairs=pairs_a, polar="svd", weight_decay=0.1)
    # fullgraph=True: any graph break would raise; the eager backend keeps the test's compile time small
    compiled = IMuon(pb, lr=0.05, pairs=pairs_b, polar="svd", weight_decay=0.1, compile={"backend": "eager"})
    _run_pair(eager, pa, compiled, pb, 4, lrs=[0.05, 0.05, 0.02, 0.01])
    _close(pa, pb)
    for p, q in zip(pa[:-1], pb[:-1]):
        torch.testing.assert_close(
            eager.state[p]["momentum_buffer"], compiled.state[q]["momentum_buffer"], rtol=0, atol=1e-12
        )
    assert all(grp.step_fn is not None for grp in compiled._groups if grp.kind != "fallback")


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    x0 = [torch.randn(8, 4, generator=g) for _ in range(2)]
    pa = [torch.nn.Parameter(x.clone()) for x in x0]
    pb = [torch.nn.Parameter(x.clone()) for x in x0]
    eager, compiled = IMuon(pa, lr=0.05), IMuon(pb, lr=0.05, compile=True)
    _run_pair(eager, pa, compiled, pb, 3)
    _close(pa, pb, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(capturable=1), "capturable must be a bool"),
        (dict(compile="yes"), "compile must be a bool or a dict"),
        (dict(compile={"fullgraph": False}), "'fullgraph' is always True"),
    ],
)
def test_compile_and_capturable_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IMuon([torch.nn.Parameter(torch.randn(3, 3))], lr=0.1, **kwargs)


def test_capturable_step_on_the_cpu_equals_the_default_and_writes_state_in_place():
    pa, pairs_a = _model()
    pb, pairs_b = _model()
    ref = IMuon(pa, lr=0.05, pairs=pairs_a, polar="svd")
    cap = IMuon(pb, lr=0.05, pairs=pairs_b, polar="svd", capturable=True)
    _run_pair(ref, pa, cap, pb, 1)
    addresses = {id(q): cap.state[q]["momentum_buffer"].data_ptr() for q in pb[:-1]}
    _run_pair(ref, pa, cap, pb, 3)
    _close(pa, pb)
    for q in pb[:-1]:  # fixed addresses, as a captured graph needs
        assert cap.state[q]["momentum_buffer"].data_ptr() == addresses[id(q)]
    assert isinstance(cap.state[pb[0]]["step"], torch.Tensor) and int(cap.state[pb[0]]["step"]) == 4
    assert cap.check_finite() and not cap.last_step_skipped


def test_capturable_step_with_a_tensor_lr_follows_it():
    pa, pairs_a = _model(bias=False)
    pb, pairs_b = _model(bias=False)
    ref = IMuon(pa, lr=0.05, pairs=pairs_a, polar="svd", weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    lr = torch.tensor(0.05, dtype=DT)
    cap = IMuon(
        pb, lr=lr, pairs=pairs_b, polar="svd", weight_decay=0.1, adjust_lr_fn="match_rms_adamw", capturable=True
    )
    _run_pair(ref, pa, cap, pb, 4, lrs=[0.05, 0.03, 0.03, 0.01])
    _close(pa, pb)


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_capturable_non_finite_step_is_not_applied_and_the_flag_tells(policy):
    params, pairs = _model()
    opt = IMuon(params, lr=0.05, pairs=pairs, capturable=True, nonfinite=policy)
    for p, gr in zip(params, _grads(params, 0)):
        p.grad = gr
    opt.step()
    before = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params[:-1]]
    grads = _grads(params, 1)
    grads[0][0, 0] = float("nan")  # a plain matrix: no factorization raises on the way (as on a GPU)
    for p, gr in zip(params, grads):
        p.grad = gr
    opt.step()  # no raise inside the step: the decision stays on the device
    _close(params, before, atol=0)
    for p, b in zip(params[:-1], bufs):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=0, atol=0)
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="not applied"):
            opt.check_finite()
    else:
        assert opt.last_step_skipped and not opt.check_finite()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capturable_step_captured_in_a_cuda_graph_replays_like_eager_steps():
    dev = torch.device("cuda")
    pa, pairs_a = _model(torch.float32)
    pb, pairs_b = _model(torch.float32)
    pa = [torch.nn.Parameter(p.detach().to(dev)) for p in pa]
    pb = [torch.nn.Parameter(p.detach().to(dev)) for p in pb]
    pairs_a = [(pa[2], pa[3]), (pa[4], pa[5])]
    pairs_b = [(pb[2], pb[3]), (pb[4], pb[5])]
    lr = torch.tensor(0.05, device=dev)
    eager = IMuon(pa, lr=0.05, pairs=pairs_a)
    cap = IMuon(pb, lr=lr, pairs=pairs_b, capturable=True)
    static_grads = [torch.zeros_like(p) for p in pb]
    for p, gr in zip(pb, static_grads):
        p.grad = gr
    # warm-up (allocates state, first-step checks) on a side stream, as torch.cuda.graph requires
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for p, q, gr in zip(pa, pb, _grads(pa, 0)):
            p.grad = gr.to(dev)
            q.grad.copy_(gr.to(dev))
        eager.step()
        cap.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cap.step()
    for k, new_lr in zip(range(1, 5), [0.05, 0.05, 0.02, 0.02]):
        lr.fill_(new_lr)
        eager.param_groups[0]["lr"] = new_lr
        for p, q, gr in zip(pa, pb, _grads(pa, k)):
            p.grad = gr.to(dev)
            q.grad.copy_(gr.to(dev))
        eager.step()
        graph.replay()
    torch.cuda.synchronize()
    assert cap.check_finite()
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
