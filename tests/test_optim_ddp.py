"""IMuon under DDP (gloo, 2 CPU processes) equals single-process training on the global batch."""

from __future__ import annotations

import gc
import os

import geoopt
import pytest
import torch
import torch.distributed as dist
from _multiprocess import run_ranks

from imuon_manopt.optim import IMuon

STEPS = 4
GLOBAL_BATCH = 8


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 5).double()  # Muon matrix + AdamW bias
        st = geoopt.EuclideanStiefel()
        self.frame = geoopt.ManifoldParameter(st.random(5, 3, dtype=torch.float64), manifold=st)
        self.lora_b = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
        self.lora_a = torch.nn.Parameter(torch.randn(2, 4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x)) @ self.frame
        return h @ self.lora_b @ self.lora_a


def _data():
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, 4, generator=g, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def _train(model: torch.nn.Module, net: Net, batches) -> None:
    opt = IMuon(model.parameters(), lr=0.02, polar="svd", pairs=[(net.lora_b, net.lora_a)])
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _train_ddp(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    net = Net()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    shard = GLOBAL_BATCH // world
    batches = [(x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]) for x, y in _data()]
    _train(ddp, net, batches)
    torch.save(net.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # the DDP module lives only in _train_ddp's frame: it (and its Reducer, which holds the process group)
        # is freed before destroy_process_group; freed after it, a forked rank can deadlock in the gloo teardown
        _train_ddp(rank, world, out_dir)
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_matches_single_process(tmp_path):
    net = Net()
    _train(net, net, _data())
    single = net.state_dict()

    run_ranks(_worker, 2, str(tmp_path))  # killed (and failed) if the ranks hang
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, v in single.items():
            torch.testing.assert_close(result[k], v, atol=1e-10, rtol=1e-10, msg=f"rank {rank} {k}")
