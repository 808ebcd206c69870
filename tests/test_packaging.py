"""What a user sees of the package itself: import cost, one version, the lazy distributed code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, timeout: float = 120) -> str:
    """Runs ``code`` in a fresh interpreter that imports this checkout; returns its stdout."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_optim_does_not_load_distributed_tensor():
    # torch.distributed.tensor costs ~0.4 s; single-process users must not pay for it.
    out = _run(
        """
        import sys
        import imuon_manopt
        import imuon_manopt.optim
        import imuon_manopt.optimizers
        loaded = sorted(m for m in sys.modules if m.startswith("torch.distributed.tensor"))
        print(loaded)
        """
    )
    assert out.strip() == "[]", f"imported eagerly: {out.strip()}"


def test_import_imuon_manopt_is_light():
    # The top-level package holds the version and the public map only: neither host library nor torch.
    out = _run(
        """
        import sys
        import imuon_manopt
        print(sorted(m for m in ("torch", "pymanopt", "geoopt") if m in sys.modules))
        """
    )
    assert out.strip() == "[]"


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over tcp on localhost")
def test_dtensor_recognized_once_loaded():
    # The lazy check must still see a DTensor (world of one process, gloo), and its helpers must handle it.
    out = _run(
        """
        import torch
        import torch.distributed as dist
        from imuon_manopt.optim import _distributed as d

        plain = torch.ones(4, 3)
        assert not d.is_dtensor(plain) and d.local(plain) is plain and d.like(plain, plain) is plain
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import DTensor, Shard, distribute_tensor

            mesh = init_device_mesh("cpu", (1,))
            x = distribute_tensor(torch.arange(12.0).reshape(4, 3), mesh, [Shard(0)])
            assert d.is_dtensor(x) and not d.is_sharded(x)  # one rank: split over a mesh of size 1
            assert torch.equal(d.local(x), torch.arange(12.0).reshape(4, 3))
            y = d.like(x, torch.zeros(4, 3))
            assert isinstance(y, DTensor) and y.placements == x.placements
            print("ok")
        finally:
            dist.destroy_process_group()
        """
    )
    assert out.strip().endswith("ok")
