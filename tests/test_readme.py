"""The README's Python examples run as written (each block in a fresh namespace, in order)."""

from __future__ import annotations

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_has_python_examples():
    assert len(_python_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs(index, capsys):
    code = _python_blocks()[index]
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(code, f"README.md[python block {index}]", "exec"), namespace)  # noqa: S102
    if "IMuon(verbosity=0).run(problem)" in code:  # the Pymanopt block reaches the known optimum
        result, c, p = namespace["result"], namespace["C"], namespace["p"]
        import numpy as np

        want = -np.sort(np.linalg.eigvalsh(c))[-p:].sum()
        assert abs(result.cost - want) <= 1e-6 * abs(want)
    if "stiefel.random" in code:  # the torch block stays on the manifold
        w = namespace["W"].detach()
        import torch

        assert torch.dist(w.T @ w, torch.eye(w.shape[1])) < 1e-5
