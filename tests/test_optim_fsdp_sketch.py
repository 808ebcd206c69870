"""The low-rank sketch mode under FSDP2: the randomized Ky Fan LMO of row-sharded matrices from sketches only.

- ``sketch_kyfan_lmo`` on rows split over 2 gloo ranks (wide and tall, even and uneven splits, 0 and 2 power
  iterations, a batch of 2) equals the core's single-process randomized solver (``lmo(..., method="randomized")``,
  the same seed) to rounding, and moves fewer bytes than the matrices;
- ``IMuon(norm=("kyfan", k), polar={"method": "randomized", ...})`` under ``fully_shard`` takes the sketch mode for
  its plain matrices (no owner traffic) and 4 training steps equal the single-process run to 1e-10 (float64).

Each test starts 2 processes once under the deadline of ``run_ranks`` (marker ``distributed``).
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
from _multiprocess import run_ranks

from imuon_manopt.lmo import lmo

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
    ),
]

WORLD = 2
K, OVERSAMPLE = 5, 4
#: (m, n): wide and tall, rows split evenly and unevenly (37 = 19 + 18), the long side split or the short one.
SHAPES = [(40, 64), (64, 40), (37, 50), (50, 37)]
STEPS = 4


def _rank_main(rank: int, world: int, port: int, out_dir: str, fn) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, out_dir)
        gc.collect()  # modules and optimizers are freed before their process group
    finally:
        dist.destroy_process_group()


def _matrices(m: int, n: int) -> torch.Tensor:
    """Two float64 matrices with gradient-like spectra (singular values decaying as 1 / (1 + i))."""
    g = torch.Generator().manual_seed(m * 1000 + n)
    out = []
    for _ in range(2):
        u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64)).Q
        s = 1.0 / (1.0 + torch.arange(min(m, n), dtype=torch.float64))
        out.append((u * s) @ v.T)
    return torch.stack(out)


def _span(m: int, rank: int, world: int) -> tuple[int, int]:
    chunk = -(-m // world)  # torch.chunk, as FSDP2's Shard(0)
    start = min(rank * chunk, m)
    return start, max(0, min(chunk, m - start))


def _lmo_worker(rank: int, world: int, out_dir: str) -> None:
    from imuon_manopt.optim import _distributed as D
    from imuon_manopt.optim import measure_comm

    group = dist.group.WORLD
    out = {}
    for m, n in SHAPES:
        h = _matrices(m, n)
        start, length = _span(m, rank, world)
        for power in (0, 2):
            with measure_comm() as stats:
                z = D.sketch_kyfan_lmo(
                    h[:, start : start + length], m, start, K, OVERSAMPLE, power, group=group, rank=rank, world=world
                )
            out[(m, n, power)] = (z, stats.bytes_sent, dict(stats.by_mode))
    torch.save(out, os.path.join(out_dir, f"lmo{rank}.pt"))


def test_sketch_kyfan_lmo_equals_the_single_process_solver(tmp_path):
    """Rows on 2 ranks, only sketches communicated: the rows of Z joined equal the core's randomized Ky Fan LMO of
    the whole matrices (same seed), which is a feasible point of the dual Ky Fan ball; each rank sends exactly the
    sketches of the design, never a matrix."""
    run_ranks(_rank_main, WORLD, str(tmp_path), _lmo_worker)
    res = [torch.load(tmp_path / f"lmo{r}.pt", weights_only=False) for r in range(WORLD)]
    for m, n in SHAPES:
        h = _matrices(m, n)
        for power in (0, 2):
            z = torch.cat([res[r][(m, n, power)][0] for r in range(WORLD)], dim=-2)
            ref = lmo(h, ("kyfan", K), method="randomized", oversample=OVERSAMPLE, power_iters=power)
            torch.testing.assert_close(z, ref, rtol=0, atol=1e-10, msg=f"{m}x{n}, power_iters={power}")
            assert float(torch.linalg.matrix_norm(z, ord=2).max()) < 1 + 1e-10  # feasible: rank <= k, ||Z||_2 <= 1
            # the design's traffic (float64, 2 matrices, to the one other rank): two numbers per matrix, an n x l
            # reduction per power iteration and one more, an l x l triangle per TSQR (one per power iteration and
            # one more); no matrix moves
            ell = K + OVERSAMPLE
            expected = 2 * 8 * (2 + (power + 1) * (n * ell + ell * ell))  # 2: the scale and a finiteness flag
            for r in range(WORLD):
                sent, modes = res[r][(m, n, power)][1:]
                assert set(modes) == {"sketch"} and sent == expected, (m, n, power, sent, expected)


class _Net(torch.nn.Module):
    """Three plain matrices under the Ky Fan step (48 x 40 by rows 24 + 24, 30 x 48 and 40 x 30 with an uneven
    split) and a bias on AdamW."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(40, 48, bias=False).double()
        self.b = torch.nn.Linear(48, 31).double()
        self.c = torch.nn.Linear(31, 40, bias=False).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _opt(net: torch.nn.Module):
    from imuon_manopt.optim import IMuon

    polar = {"method": "randomized", "oversample": OVERSAMPLE, "power_iters": 2}
    return IMuon(net.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1, norm=("kyfan", K), polar=polar)


def _data():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 40, generator=g, dtype=torch.float64), torch.randn(8, 40, generator=g, dtype=torch.float64))
        for _ in range(STEPS)
    ]


def _train_worker(rank: int, world: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from imuon_manopt.optim import _distributed as D
    from imuon_manopt.optim import measure_comm

    mesh = init_device_mesh("cpu", (world,))
    net = _Net()
    fully_shard(net, mesh=mesh)
    assert all(D.is_sharded(p) for p in net.parameters())
    opt = _opt(net)
    shard = 8 // world
    modes = []
    for x, y in _data():
        opt.zero_grad()
        torch.nn.functional.mse_loss(
            net(x[rank * shard : (rank + 1) * shard]), y[rank * shard : (rank + 1) * shard]
        ).backward()
        with measure_comm() as stats:
            opt.step()
        modes.append(dict(stats.by_mode))
    params = {k: v.full_tensor() for k, v in net.state_dict().items()}
    # a NaN in one rank's rows of one gradient only: every rank skips the step, nothing is half-updated
    opt.nonfinite = "skip"
    opt.zero_grad()
    torch.nn.functional.mse_loss(net(x[:shard]), y[:shard]).backward()
    if rank == 0:
        D.local(net.a.weight.grad).view(-1)[3] = float("nan")
    opt.step()
    after = {k: v.full_tensor() for k, v in net.state_dict().items()}
    out = {"params": params, "modes": modes, "skipped": opt.last_step_skipped, "after": after}
    torch.save(out, os.path.join(out_dir, f"train{rank}.pt"))


def test_fsdp_sketch_mode_training_equals_single_process(tmp_path):
    """4 steps of the randomized Ky Fan iMuon (momentum, weight decay) under fully_shard on 2 ranks equal the
    single-process run on the global batch to 1e-10; the plain matrices took the sketch mode (no owner traffic). A
    NaN in one rank's rows of a gradient makes every rank skip the next step with nothing changed."""
    net = _Net()
    opt = _opt(net)
    for x, y in _data():
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    run_ranks(_rank_main, WORLD, str(tmp_path), _train_worker)
    for r in range(WORLD):
        res = torch.load(tmp_path / f"train{r}.pt", weights_only=False)
        for name, p in net.state_dict().items():
            torch.testing.assert_close(res["params"][name], p, rtol=0, atol=1e-10, msg=name)
        for modes in res["modes"]:
            assert "sketch" in modes and "owner" not in modes, modes
        assert res["skipped"]
        for name, p in res["params"].items():
            torch.testing.assert_close(res["after"][name], p, rtol=0, atol=0, msg=name)
