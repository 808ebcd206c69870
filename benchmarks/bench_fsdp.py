"""Benchmark: bytes ``imuon_manopt.optim.IMuon`` communicates per step under FSDP2 (``fully_shard``), gloo, 2 CPU ranks.

Under FSDP2 every parameter is a ``DTensor`` split by rows over the ranks. The optimizer's per-matrix work goes
through :func:`imuon_manopt.optim._distributed.apply_full`: plain matrices and manifold parameters are gathered on
one owner rank each (``all_to_all``), stepped once there and sent back as shards (``all_to_all``); LoRA pairs are
all-gathered and stepped on every rank. Its counters (:func:`~imuon_manopt.optim._distributed.measure_comm`) give the
bytes each rank sends and receives in ``step()`` (payload between distinct ranks; FSDP's own all-gathers and
reduce-scatters of the forward and backward are not counted).

Cases:

=============  ====================================================================================================
case           what
=============  ====================================================================================================
test-model     the model of ``tests/test_optim_fsdp.py`` (float64): plain 5x6 and 3x4 matrices, a bias (AdamW, no
               traffic), Stiefel 5x3 (Euclidean metric) and 3x3 (canonical), a LoRA pair 3x2 / 2x4; real training
               steps with ``fully_shard`` (``polar="svd"``, momentum 0.9)
gpt2-lora      the GPT-2-small LoRA set of ``bench_optim.py`` (12 layers x q, k, v, o 768x768, up 3072x768, down
               768x3072; rank ``--rank``, default 8: 72 pairs), float32, random gradients; B (m, r) and A (r, n) are
               split by rows
gpt2-blocks    full fine-tuning of the same matrices of ``--blocks`` (default 1) layers as plain float32 matrices,
               random gradients; the traffic is linear in the number of layers. For comparison, the bytes the
               all-gather mode (``owner=False``) would move for the same matrices' inputs
kyfan-sketch-  plain float32 matrices (1024x1024 twice, 512x2048, 2048x512) under ``norm=("kyfan", d/8)`` with the
q0, -q1, -q2   randomized solver (0, 1, 2 power iterations): the low-rank sketch mode; for comparison, the bytes
               the full-matrix (owner) mode moves for the same matrices
=============  ====================================================================================================

Usage::

    python benchmarks/bench_fsdp.py                    # all cases (about a minute on 2 CPU cores)
    python benchmarks/bench_fsdp.py --case gpt2-lora --steps 2
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_optim import gpt2_lora_shapes  # noqa: E402

from imuon_manopt.optim import IMuon  # noqa: E402
from imuon_manopt.optim import _distributed as D  # noqa: E402

WORLD = 2
#: The low-rank sketch cases, by power iterations of the randomized Ky Fan solver.
SKETCH_CASES = ("kyfan-sketch-q0", "kyfan-sketch-q1", "kyfan-sketch-q2")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded(t: torch.Tensor, mesh) -> torch.nn.Parameter:
    from torch.distributed.tensor import Shard, distribute_tensor

    return torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None))


def _grads(params, mesh, gen: torch.Generator) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad = distribute_tensor(g, mesh, [Shard(0)], src_data_rank=None)


def _steps(opt: IMuon, before_each, steps: int) -> list[dict]:
    rows = []
    for _ in range(steps):
        before_each()
        t0 = time.perf_counter()
        with D.measure_comm() as s:
            opt.step()
        rows.append(
            dict(
                sent=s.bytes_sent,
                received=s.bytes_received,
                collectives=s.collectives,
                gathered=s.gathered,
                replicated=s.replicated,
                seconds=time.perf_counter() - t0,
            )
        )
    return rows


def _case_test_model(mesh, rank: int, steps: int) -> tuple[list[dict], int, dict]:
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_optim_fsdp import GLOBAL_BATCH, Net

    net = Net()
    with D.keep_manifolds(net):
        fully_shard(net, mesh=mesh)
    opt = IMuon(net.parameters(), lr=0.05, momentum=0.9, polar="svd", pairs=[(net.lora_b, net.lora_a)])
    gen = torch.Generator().manual_seed(1)
    shard = GLOBAL_BATCH // WORLD

    def forward_backward():
        x = torch.randn(GLOBAL_BATCH, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(GLOBAL_BATCH, 3, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        sl = slice(rank * shard, (rank + 1) * shard)
        torch.nn.functional.mse_loss(net(x[sl]), y[sl]).backward()

    rows = _steps(opt, forward_backward, steps)
    return rows, sum(p.numel() * p.element_size() for p in net.parameters()), {}


def _case_gpt2_lora(mesh, rank: int, steps: int, r: int) -> tuple[list[dict], int, dict]:
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for m, rr, n in gpt2_lora_shapes(r=r):
        b = torch.linalg.qr(torch.randn(m, rr, generator=gen))[0]  # full rank, as after the full-rank start
        a = torch.randn(rr, n, generator=gen) / n**0.5
        pairs.append((_sharded(b.contiguous(), mesh), _sharded(a, mesh)))
    params = [t for pair in pairs for t in pair]
    opt = IMuon(params, lr=1e-3, momentum=0.95, pairs=pairs)
    rows = _steps(opt, lambda: _grads(params, mesh, gen), steps)
    return rows, sum(p.numel() * p.element_size() for p in params), {}


def _case_gpt2_blocks(mesh, rank: int, steps: int, blocks: int) -> tuple[list[dict], int, dict]:
    gen = torch.Generator().manual_seed(0)
    params = [_sharded(torch.randn(m, n, generator=gen) / n**0.5, mesh) for m, _, n in gpt2_lora_shapes(layers=blocks)]
    opt = IMuon(params, lr=0.02, momentum=0.95)
    rows = _steps(opt, lambda: _grads(params, mesh, gen), steps)
    # the all-gather mode on the same (x, E~) inputs, for comparison (no compute: fn hands the inputs back)
    inputs = [(D.local(p).detach(), D.local(p.grad)) for p in params]
    with D.measure_comm() as s:
        D.apply_full(params, inputs, lambda full: [(x,) for x, _ in full], owner=False)
    return rows, sum(p.numel() * p.element_size() for p in params), dict(gather_sent=s.bytes_sent)


#: Plain matrices of the low-rank sketch case: square, wide and tall (rows split over the ranks either way).
SKETCH_SHAPES = ((1024, 1024), (1024, 1024), (512, 2048), (2048, 512))


def _case_kyfan_sketch(mesh, rank: int, steps: int, power_iters: int) -> tuple[list[dict], int, dict]:
    """Ky Fan k = d/8 (d the short side) with the randomized solver: the sketch mode. For comparison, what the
    full-matrix (owner) mode moves for the same matrices: ``apply_full`` with ``owner=True`` on the same ``(x,
    E~)`` inputs and one output per matrix (no compute), exactly the traffic of the owner-mode step."""
    gen = torch.Generator().manual_seed(0)
    rows, full_sent = [], 0
    params_bytes = 0
    for m, n in SKETCH_SHAPES:  # one group per shape: k differs only by shape here, so one optimizer each
        p = _sharded(torch.randn(m, n, generator=gen) / n**0.5, mesh)
        params_bytes += p.numel() * p.element_size()
        k = min(m, n) // 8
        polar = {"method": "randomized", "oversample": 8, "power_iters": power_iters}
        opt = IMuon([p], lr=0.02, momentum=0.95, norm=("kyfan", k), polar=polar)
        shape_rows = _steps(opt, lambda p=p: _grads([p], mesh, gen), steps)
        rows = shape_rows if not rows else [{key: a[key] + b[key] for key in a} for a, b in zip(rows, shape_rows)]
        inputs = [(D.local(p).detach(), D.local(p.grad))]
        with D.measure_comm() as s:
            D.apply_full([p], inputs, lambda full: [(x,) for x, _ in full], owner=True)
        full_sent += s.bytes_sent
    return rows, params_bytes, dict(owner_sent=full_sent)


def _worker(rank: int, world: int, port: int, out_dir: str, cases: list[str], args: dict) -> None:
    torch.set_num_threads(args["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        results = {}
        for case in cases:
            if case == "test-model":
                results[case] = _case_test_model(mesh, rank, args["steps"])
            elif case.startswith("kyfan-sketch"):
                results[case] = _case_kyfan_sketch(mesh, rank, args["steps"], int(case[-1]))
            elif case == "gpt2-lora":
                results[case] = _case_gpt2_lora(mesh, rank, args["steps"], args["rank"])
            else:
                results[case] = _case_gpt2_blocks(mesh, rank, args["steps"], args["blocks"])
        torch.save(results, os.path.join(out_dir, f"bench{rank}.pt"))
        gc.collect()  # the cases' modules and optimizers are freed before their process group
    finally:
        dist.destroy_process_group()


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.2f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case",
        action="append",
        choices=("test-model", "gpt2-lora", "gpt2-blocks", *SKETCH_CASES),
        help="run only this case (repeatable; default: all)",
    )
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case (default 3)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of gpt2-lora (default 8)")
    parser.add_argument("--blocks", type=int, default=1, help="GPT-2 small blocks of gpt2-blocks (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank (default 1)")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds before the ranks are killed (default 900)"
    )
    args = parser.parse_args()
    cases = args.case or ["test-model", "gpt2-lora", "gpt2-blocks", *SKETCH_CASES]
    opts = dict(steps=args.steps, rank=args.rank, blocks=args.blocks, threads=args.threads)

    import tempfile

    with tempfile.TemporaryDirectory() as out:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        ctx = mp.start_processes(
            _worker, args=(WORLD, _free_port(), out, cases, opts), nprocs=WORLD, join=False, start_method=method
        )
        deadline = time.monotonic() + args.timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    sys.exit(f"bench_fsdp: the ranks had not finished after {args.timeout:g} s; killed them")
        finally:
            for p in ctx.processes:  # a hung or orphaned rank never outlives the benchmark
                if p.is_alive():
                    p.kill()
                    p.join(10)
        res = [torch.load(Path(out) / f"bench{r}.pt", weights_only=False) for r in range(WORLD)]

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# bench_fsdp: torch {torch.__version__}, gloo, {WORLD} ranks on {platform.machine()} CPU, "
        f"{args.threads} thread(s) per rank, {args.steps} steps, load average {load:.2f}"
    )
    print(f"# command: python benchmarks/bench_fsdp.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print(
        "| case | parameters | sent per step, rank 0 / rank 1 | world per step | world / params "
        "| collectives per step | matrices stepped, rank 0 / rank 1 | step (s, median, rank 0) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        rows = [res[r][case][0] for r in range(WORLD)]
        params = res[0][case][1]
        last = [rw[-1] for rw in rows]  # every step moves the same bytes; the last one is representative
        steady = {r: {rw["sent"] for rw in rows[r]} for r in range(WORLD)}
        world = sum(x["sent"] for x in last)
        stepped = " / ".join(str(x["gathered"] + x["replicated"]) for x in last)
        seconds = statistics.median(x["seconds"] for x in rows[0])
        note = "" if all(len(v) == 1 for v in steady.values()) else " (varies by step)"
        per_rank = f"{_size(last[0]['sent'])} / {_size(last[1]['sent'])}{note}"
        print(
            f"| {case} | {_size(params)} | {per_rank} | {_size(world)} | {world / params:.2f} | "
            f"{last[0]['collectives']} | {stepped} | {seconds:.3f} |"
        )
        extra = res[0][case][2]
        if "owner_sent" in extra:
            owner_world = sum(res[r][case][2]["owner_sent"] for r in range(WORLD))
            print(
                f"| {case}, full-matrix (owner) mode instead | {_size(params)} | "
                f"{_size(res[0][case][2]['owner_sent'])} / {_size(res[1][case][2]['owner_sent'])} | "
                f"{_size(owner_world)} | {owner_world / params:.2f} | - | - | - |"
            )
            print(f"| {case}: sketch / full-matrix bytes | | | **{world / owner_world:.2f}x** | | | | |")
        if "gather_sent" in extra:
            gather_world = sum(res[r][case][2]["gather_sent"] for r in range(WORLD))
            print(
                f"| {case}, all-gather mode instead (inputs only) | {_size(params)} | "
                f"{_size(res[0][case][2]['gather_sent'])} / {_size(res[1][case][2]['gather_sent'])} | "
                f"{_size(gather_world)} | {gather_world / params:.2f} | 1 | every matrix on both | - |"
            )


if __name__ == "__main__":
    main()
