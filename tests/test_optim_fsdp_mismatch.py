"""FSDP2 ranks that do not step the same sharded parameters fail with the same clear error on every rank, before any
of the step's collectives (2 gloo processes under a deadline): an optimizer that lacks a parameter on one rank (it
used to raise a misleading "not on its manifold" or pair mismatched shards), a gradient set to ``None`` on one
rank only (it used to abort gloo). Matching ranks take the step."""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
from _multiprocess import run_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
    ),
]

WORLD = 2


def _case(rank: int, world: int, out_dir: str) -> dict[str, str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from imuon_manopt.optim import IMuon

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, str] = {}

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False), torch.nn.Linear(4, 2, bias=False)).double()
        fully_shard(net, mesh=mesh)
        return net

    def backward(net: torch.nn.Module) -> None:
        net(torch.ones(3, 6, dtype=torch.float64)).square().sum().backward()

    net = model()
    params = list(net.parameters())
    # rank 1 builds its optimizer without the first weight
    opt = IMuon(params if rank == 0 else params[1:], lr=0.1, polar="svd")
    backward(net)
    before = [p.detach().to_local().clone() for p in params]
    try:
        opt.step()
        out["missing"] = "stepped"
    except ValueError as err:
        out["missing"] = str(err)
    out["missing unchanged"] = str(all(torch.equal(p.detach().to_local(), b) for p, b in zip(params, before)))

    # both ranks hold both weights; rank 0 drops one gradient
    opt = IMuon(params, lr=0.1, polar="svd")
    opt.zero_grad()
    backward(net)
    if rank == 0:
        params[1].grad = None
    try:
        opt.step()
        out["grad"] = "stepped"
    except ValueError as err:
        out["grad"] = str(err)

    # matching ranks: the step runs (and the check costs one small all_reduce)
    opt.zero_grad()
    backward(net)
    opt.step()
    out["matching"] = "stepped"
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = _case(rank, world, out_dir)
        gc.collect()
        torch.save(out, os.path.join(out_dir, f"mismatch{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_mismatched_ranks_fail_clearly_on_every_rank(tmp_path):
    run_ranks(_worker, WORLD, str(tmp_path), timeout=120.0)
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"mismatch{rank}.pt", weights_only=True)
        assert "do not step the same sharded parameters" in out["missing"], out["missing"]
        assert "param group 0 parameter 0 (shape (4, 6)" in out["missing"], out["missing"]  # the missing weight
        assert out["missing unchanged"] == "True"
        assert "do not step the same sharded parameters" in out["grad"], out["grad"]
        assert "without a gradient" in out["grad"] and "with a gradient" in out["grad"], out["grad"]
        assert out["matching"] == "stepped"
