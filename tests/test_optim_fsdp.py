"""IMuon under FSDP2 (``fully_shard``, gloo, 2 CPU processes) and the collectives behind it.

- ``apply_full`` (owner and all-gather modes, uneven and column shards, unsharded inputs, outputs of
  other shapes, mixed process groups) against numpy SVD polar factors of the full matrices, with one
  orthogonalization per matrix in the world in owner mode; a failure on one owner raises on every rank;
- training a float64 model with plain matrices, a LoRA pair and Stiefel parameters (Euclidean and
  canonical metric) for 5 steps under ``fully_shard`` equals the single-process run to 1e-10 (also on an
  HSDP-shaped mesh with column shards); so do the full momentum buffers from
  ``torch.distributed.checkpoint`` and a step after resuming from them; a NaN in one rank's shard of a
  gradient makes every rank skip the step; ``keep_manifolds`` keeps the manifolds through
  ``fully_shard`` and a meta-device ``to_empty``.

Each test starts 2 processes once (forked: no re-import); they run in CI on the CPU (marker ``distributed``).
"""

from __future__ import annotations

import gc
import os

import geoopt
import numpy as np
import pytest
import torch
import torch.distributed as dist
from _multiprocess import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from imuon_manopt.optim import IMuon, keep_manifolds, measure_comm
from imuon_manopt.optim import _distributed as D

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
    ),
]

WORLD = 2
STEPS = 5
GLOBAL_BATCH = 8
#: Shapes of the apply_full checks: uneven row splits (5 = 3 + 2, 1 = 1 + 0) and a square one.
SHAPES = [(5, 3), (5, 3), (7, 4), (1, 4), (4, 4)]


def _spawn(fn, out_dir) -> None:
    """Run ``fn(rank, WORLD, out_dir)`` in WORLD processes (forked where the platform allows) inside a gloo
    process group; killed and failed if they have not finished by the deadline of ``run_ranks``."""
    run_ranks(_rank_main, WORLD, str(out_dir), fn)


def _rank_main(rank: int, world: int, port: int, out_dir: str, fn) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, out_dir)
        gc.collect()  # the worker's modules and optimizers are freed before their process group
    finally:
        dist.destroy_process_group()


def _np_polar(x: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


# ------------------------------------------------------------------------------------ apply_full


def _matrices() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in SHAPES]


class _Polar:
    """A batched ``fn``: per item ``(x,) -> (polar(x), ||x||_*)``; counts the matrices it saw."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, full_inputs):
        self.seen += len(full_inputs)
        out = []
        for (x,) in full_inputs:
            u, s, vh = torch.linalg.svd(x, full_matrices=False)
            out.append((u @ vh, s.sum()))
        return out


def _apply_full_worker(rank: int, world: int, out_dir: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    fulls = _matrices()
    placements = [[Shard(0)]] * 4 + [[Shard(1)]]
    params = [distribute_tensor(x, mesh, pl) for x, pl in zip(fulls, placements)]
    inputs = [(D.local(p),) for p in params]
    res: dict[str, object] = {}
    for mode in (True, False):
        fn = _Polar()
        with measure_comm() as stats:
            outs = D.apply_full(params, inputs, fn, owner=mode)
        # a result's base (what the optimizer's check of batched outputs reduces) has the result's dtype
        assert all(t._base is None or t._base.dtype == t.dtype for o in outs for t in o)
        res[f"owner={mode}"] = {
            "outs": [tuple(t.clone() for t in o) for o in outs],
            "seen": fn.seen,
            "sent": stats.bytes_sent,
            "received": stats.bytes_received,
            "collectives": stats.collectives,
        }

    # a pair-like item: inputs split like B and like A, one whole input; an output of another shape
    b, a = params[2], distribute_tensor(fulls[2].mT.contiguous(), mesh, [Shard(0)])  # B 7x4, A 4x7
    scale = torch.tensor(2.0, dtype=torch.float64)

    def pair_fn(full_inputs):
        return [(s * xb, s * xa, xb @ xa) for xb, xa, s in full_inputs]

    for mode in (True, False):
        out = D.apply_full([(b, a, None)], [(D.local(b), D.local(a), scale)], pair_fn, owner=mode)
        res[f"pair owner={mode}"] = tuple(t.clone() for t in out[0])

    # inputs of one item split over two different process groups: the DTensor fallback
    mesh2 = init_device_mesh("cpu", (world,), mesh_dim_names=("other",))
    c = distribute_tensor(fulls[0], mesh2, [Shard(0)])
    mixed = D.apply_full(
        [(params[0], c)], [(D.local(params[0]), D.local(c))], lambda fi: [(x + 2 * y,) for x, y in fi], owner=True
    )
    res["mixed"] = mixed[0][0].clone()

    # fn fails on one owner (a NaN that only rank 0's shard holds): every rank raises, none waits forever
    def checked(full_inputs):
        if any(bool(torch.isnan(x).any()) for (x,) in full_inputs):
            raise torch.linalg.LinAlgError("non-finite input")
        return [(x,) for (x,) in full_inputs]

    bad = D.local(params[0]).clone()
    if rank == 0:
        bad[0, 0] = float("nan")
    try:
        D.apply_full(params[:2], [(bad,), inputs[1]], checked, owner=True)
        res["failure"] = None
    except torch.linalg.LinAlgError as err:
        res["failure"] = str(err)

    # plain tensors: exactly fn(inputs), the very objects
    plain_in = [(fulls[0],)]
    sentinel = [(fulls[1],)]
    res["plain_is_fn"] = (
        D.apply_full([fulls[0]], plain_in, lambda fi: sentinel if fi is plain_in else None, owner=True) is sentinel
    )
    torch.save(res, os.path.join(out_dir, f"apply{rank}.pt"))


def _join(parts: list[torch.Tensor], dim: int) -> np.ndarray:
    return torch.cat(parts, dim=dim).numpy()


def test_apply_full_owner_and_gather(tmp_path):
    _spawn(_apply_full_worker, tmp_path)
    res = [torch.load(tmp_path / f"apply{r}.pt", weights_only=False) for r in range(WORLD)]
    fulls = [x.numpy() for x in _matrices()]
    dims = [0, 0, 0, 0, 1]
    for mode in (True, False):
        key = f"owner={mode}"
        for i, (x, dim) in enumerate(zip(fulls, dims)):
            got = _join([res[r][key]["outs"][i][0] for r in range(WORLD)], dim)
            np.testing.assert_allclose(got, _np_polar(x), atol=1e-12, err_msg=f"{key} item {i}")
            for r in range(WORLD):  # an output of another shape reaches every rank whole
                nuc = np.linalg.svd(x, compute_uv=False).sum()
                np.testing.assert_allclose(float(res[r][key]["outs"][i][1]), nuc, rtol=1e-12)
        seen = [res[r][key]["seen"] for r in range(WORLD)]
        sent = sum(res[r][key]["sent"] for r in range(WORLD))
        received = sum(res[r][key]["received"] for r in range(WORLD))
        assert sent == received > 0
        if mode:
            # one orthogonalization per matrix in the world, shared out between the ranks
            assert sum(seen) == len(SHAPES) and min(seen) >= 1, seen
        else:
            assert seen == [len(SHAPES)] * WORLD
    # the all-gather mode sends every shard to every rank; the owner mode only the owners' share and back
    payload = sum(x.nbytes for x in fulls)
    assert sum(res[r]["owner=False"]["sent"] for r in range(WORLD)) >= payload

    b = fulls[2]
    for mode in (True, False):
        key = f"pair owner={mode}"
        np.testing.assert_allclose(_join([res[r][key][0] for r in range(WORLD)], 0), 2 * b, atol=0)
        np.testing.assert_allclose(_join([res[r][key][1] for r in range(WORLD)], 0), 2 * b.T, atol=0)
        for r in range(WORLD):
            np.testing.assert_allclose(res[r][key][2].numpy(), b @ b.T, atol=1e-12)
    np.testing.assert_allclose(_join([res[r]["mixed"] for r in range(WORLD)], 0), 3 * fulls[0], atol=0)
    assert all(res[r]["plain_is_fn"] for r in range(WORLD))
    assert all(res[r]["failure"] is not None for r in range(WORLD)), [res[r]["failure"] for r in range(WORLD)]


# ------------------------------------------------------------------------------------ training


class Net(torch.nn.Module):
    """A plain matrix (5 x 6, split 3 + 2) with an AdamW bias, two Stiefel frames (Euclidean and
    canonical metric), a LoRA pair (B 3 x 2, A 2 x 4) and a second plain matrix (3 x 4)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 5).double()
        euc, can = geoopt.EuclideanStiefel(), geoopt.Stiefel()
        # fully_shard needs contiguous parameters; geoopt's random Stiefel point is a transposed QR factor
        self.frame = geoopt.ManifoldParameter(euc.random(5, 3, dtype=torch.float64).contiguous(), manifold=euc)
        self.rot = geoopt.ManifoldParameter(can.random(3, 3, dtype=torch.float64).contiguous(), manifold=can)
        self.lora_b = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
        self.lora_a = torch.nn.Parameter(torch.randn(2, 4, dtype=torch.float64))
        self.head = torch.nn.Linear(4, 3, bias=False).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x)) @ self.frame @ self.rot
        return self.head(torch.tanh(h @ self.lora_b @ self.lora_a))


def _data():
    """``STEPS + 1`` global batches: ``STEPS`` to train, one more after resuming from a checkpoint."""
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=torch.float64),
        )
        for _ in range(STEPS + 1)
    ]


def _optimizer(net: Net) -> IMuon:
    return IMuon(net.parameters(), lr=0.05, momentum=0.9, polar="svd", pairs=[(net.lora_b, net.lora_a)])


def _step(net: Net, opt: IMuon, x: torch.Tensor, y: torch.Tensor) -> int:
    """One training step; returns the bytes this process sent in ``opt.step()``."""
    opt.zero_grad()
    torch.nn.functional.mse_loss(net(x), y).backward()
    with measure_comm() as stats:
        opt.step()
    return stats.bytes_sent


def _buffers(net: Net, state_of) -> dict[str, torch.Tensor]:
    """Copies (the optimizer updates its buffers in place) of the momentum buffers of the 2-D parameters."""
    return {name: state_of(name, p)["momentum_buffer"].clone() for name, p in net.named_parameters() if p.ndim == 2}


def _sharded_net(mesh, **kwargs) -> Net:
    net = Net()
    manifolds = (net.frame.manifold, net.rot.manifold)
    with keep_manifolds(net) as kept:
        fully_shard(net, mesh=mesh, **kwargs)
    # fully_shard makes every parameter a plain DTensor parameter; keep_manifolds put the manifolds back
    assert sorted(kept) == ["frame", "rot"]
    assert not isinstance(net.frame, geoopt.ManifoldParameter)
    assert (net.frame.manifold, net.rot.manifold) == manifolds
    assert all(D.is_sharded(p) for p in net.parameters())
    return net


def _fsdp_worker(rank: int, world: int, out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))
    # meta-device init: to_empty swaps in new tensors (attributes included); keep_manifolds spans it too
    euc = geoopt.EuclideanStiefel()
    with torch.device("meta"):
        meta = torch.nn.Module()
        meta.frame = geoopt.ManifoldParameter(torch.empty(5, 3, dtype=torch.float64), manifold=euc)
    with keep_manifolds(meta):
        fully_shard(meta, mesh=mesh)
        meta.to_empty(device="cpu")
    assert meta.frame.manifold is euc and D.is_sharded(meta.frame)

    net = _sharded_net(mesh)
    opt = _optimizer(net)
    shard = GLOBAL_BATCH // world
    batches = [(x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]) for x, y in _data()]
    sent = [_step(net, opt, x, y) for x, y in batches[:STEPS]]
    out = {"sent": sent}
    out["params"] = {k: v.full_tensor() for k, v in net.state_dict().items()}  # collective: every rank
    # state of a sharded parameter is a DTensor with its placements, as torch.optim keeps it under FSDP2
    for p in net.parameters():
        for key, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.ndim:
                assert isinstance(v, DTensor) and v.placements == p.placements, key
    # torch.distributed.checkpoint's full (unsharded) state dicts, and a resume from them
    full = StateDictOptions(full_state_dict=True)
    osd = get_optimizer_state_dict(net, opt, options=full)
    msd = get_model_state_dict(net, options=full)
    out["buffers"] = _buffers(net, lambda name, p: osd["state"][name])
    net2 = _sharded_net(mesh)
    opt2 = _optimizer(net2)
    set_model_state_dict(net2, msd, options=full)
    set_optimizer_state_dict(net2, opt2, osd, options=full)
    for model, optim in ((net, opt), (net2, opt2)):
        _step(model, optim, *batches[STEPS])
    # HSDP layout (mesh "replicate" x "shard", here 1 x 2) with matrices split by columns where FSDP allows it
    # (Shard(1) needs an even split: lin.weight, the LoRA pair and head; the 3-column frames stay by rows)
    mesh2d = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    net3 = _sharded_net(
        mesh2d, shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 and p.shape[1] % 2 == 0 else Shard(0)
    )
    assert net3.lin.weight.placements == (Replicate(), Shard(1))
    opt3 = _optimizer(net3)
    for x, y in batches[:STEPS]:
        _step(net3, opt3, x, y)
    out["columns"] = {k: v.full_tensor() for k, v in net3.state_dict().items()}

    out["continued"] = {k: v.full_tensor() for k, v in net.state_dict().items()}
    out["resumed"] = {k: v.full_tensor() for k, v in net2.state_dict().items()}

    # a NaN in one rank's shard of a gradient only: every rank skips the step, no parameter is half-updated
    # (the bias: AdamW on shards, where only rank 0 sees it; the weight: its owner's SVD fails)
    opt2.nonfinite = "skip"
    for name in ("lin.bias", "lin.weight"):
        opt2.zero_grad()
        torch.nn.functional.mse_loss(net2(batches[0][0]), batches[0][1]).backward()
        if rank == 0:
            D.local(dict(net2.named_parameters())[name].grad).view(-1)[0] = float("nan")
        opt2.step()
        out[f"skipped {name}"] = opt2.last_step_skipped
        out[f"after {name}"] = {k: v.full_tensor() for k, v in net2.state_dict().items()}
    torch.save(out, os.path.join(out_dir, f"fsdp{rank}.pt"))


def test_fsdp_matches_single_process(tmp_path):
    """5 steps under fully_shard (plain matrices and Stiefel frames stepped on owner ranks, the LoRA pair
    all-gathered) equal the single-process run on the global batch; so do the full momentum buffers from
    torch.distributed.checkpoint, and a 6th step after resuming from them."""
    net = Net()
    opt = _optimizer(net)
    data = _data()
    for x, y in data[:STEPS]:
        _step(net, opt, x, y)
    single = {k: v.clone() for k, v in net.state_dict().items()}
    single_buffers = _buffers(net, lambda name, p: opt.state[p])
    _step(net, opt, *data[STEPS])
    single_next = net.state_dict()

    _spawn(_fsdp_worker, tmp_path)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"fsdp{rank}.pt", weights_only=True)
        for got, want, what in (
            (result["params"], single, "parameters"),
            (result["columns"], single, "parameters, HSDP mesh, column shards"),
            (result["buffers"], single_buffers, "momentum buffer"),
            (result["continued"], single_next, "6th step"),
            (result["resumed"], single_next, "6th step after resuming"),
        ):
            assert got.keys() == want.keys()
            for k, v in want.items():
                torch.testing.assert_close(got[k], v, atol=1e-10, rtol=1e-10, msg=f"rank {rank} {what} {k}")
        assert all(s > 0 for s in result["sent"])
        for name in ("lin.bias", "lin.weight"):
            assert result[f"skipped {name}"], (rank, name)
            for k, v in result[f"after {name}"].items():
                torch.testing.assert_close(v, result["resumed"][k], atol=0, rtol=0, msg=f"rank {rank} {name} {k}")
