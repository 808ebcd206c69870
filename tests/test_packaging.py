"""What a user sees of the package itself: import cost, one version, the lazy distributed code."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
from _multiprocess import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, timeout: float = 120) -> str:
    """Runs ``code`` in a fresh interpreter that imports this checkout; returns its stdout."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = run_command([sys.executable, "-c", textwrap.dedent(code)], timeout=timeout, env=env, cwd=ROOT)
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


def _pyproject() -> dict:
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)


def test_one_version_source():
    import re

    import imuon_manopt

    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "imuon_manopt.__version__"}
    with open(os.path.join(ROOT, "CITATION.cff"), encoding="utf-8") as handle:
        cited = re.search(r"^version: (\S+)$", handle.read(), flags=re.MULTILINE)
    assert cited is not None and cited.group(1) == imuon_manopt.__version__  # bump both (CONTRIBUTING)


def test_license_and_changelog():
    project = _pyproject()["project"]
    assert project["license"] == "BSD-3-Clause" and project["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as handle:
        assert "Redistribution and use in source and binary forms" in handle.read()
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as handle:
        assert "## [Unreleased]" in handle.read()


def test_plain_install_pulls_no_test_or_unused_packages():
    # The package never imports scipy or autograd (tests and examples get them through extras), and the plain
    # install carries no test tools.
    import re

    required = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in _pyproject()["project"]["dependencies"]}
    assert required == {"numpy", "torch", "pymanopt", "geoopt"}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "imuon_manopt")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), encoding="utf-8") as handle:
                    source = handle.read()
                assert not re.search(r"^\s*(import|from) (scipy|autograd)\b", source, flags=re.MULTILINE), name


def test_every_public_module_has_an_api_page():
    # The docs site's API reference (mkdocs.yml, docs/api/*.md) covers each public top-level module and package.
    import glob
    import re

    pages = ""
    for path in glob.glob(os.path.join(ROOT, "docs", "api", "*.md")):
        with open(path, encoding="utf-8") as handle:
            pages += handle.read()
    documented = set(re.findall(r"^::: (imuon_manopt\.\w+)\s*$", pages, flags=re.MULTILINE))
    public = {
        "imuon_manopt." + name.removesuffix(".py")
        for name in os.listdir(os.path.join(ROOT, "imuon_manopt"))
        if not name.startswith("_")
        and (name.endswith(".py") or os.path.isdir(os.path.join(ROOT, "imuon_manopt", name)))
    }
    assert public - documented == set()


def test_no_private_names_cross_module_boundaries():
    # A helper one module takes from another is part of the package's internal API: it has a public name (no
    # leading underscore; `__all__` still lists only the user-facing names). Private modules (`optim/_steps.py`)
    # are fine to import; a private *name* from another module is not.
    import ast

    crossings = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "imuon_manopt")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as handle:
                tree = ast.parse(handle.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module is not None:  # `from . import _mod`: a module
                    crossings += [
                        f"{os.path.relpath(path, ROOT)}: {a.name} from {'.' * node.level}{node.module or ''}"
                        for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")
                    ]
    assert crossings == []


def test_metric_operator_contract_is_stated_once_in_its_docstring():
    # The class docstring names every member a geometry can provide; the adapters' errors point to it instead of
    # restating a list of their own.
    import inspect

    from imuon_manopt.geometry import MetricOperator

    doc = inspect.getdoc(MetricOperator) or ""
    members = {n for n, _ in inspect.getmembers(MetricOperator) if not n.startswith("_")}
    assert members >= {"at", "project", "whiten", "unwhiten", "tangent", "block_ranks", "flat", "structure"}
    missing = sorted(m for m in members if f"``{m}" not in doc)
    assert missing == [], f"MetricOperator's docstring does not describe {missing}"


def test_adapter_errors_point_to_the_metric_operator_contract():
    import geoopt
    import numpy as np
    import pymanopt
    import torch

    from imuon_manopt.optim import IMuon as TorchIMuon
    from imuon_manopt.optimizers import IMuon as PymanoptIMuon

    p = geoopt.ManifoldParameter(torch.zeros(3, 2), manifold=geoopt.PoincareBall())
    p.grad = torch.ones(3, 2)
    with pytest.raises(TypeError, match=r"help\(MetricOperator\)"):
        TorchIMuon([p], lr=0.1).step()

    oblique = pymanopt.manifolds.Oblique(4, 3)
    cost = pymanopt.function.numpy(oblique)(lambda x: float(np.sum(x)))
    egrad = pymanopt.function.numpy(oblique)(lambda x: np.ones_like(x))
    with pytest.raises(TypeError, match=r"help\(MetricOperator\)"):
        PymanoptIMuon(verbosity=0, max_iterations=2).run(pymanopt.Problem(oblique, cost, euclidean_gradient=egrad))
