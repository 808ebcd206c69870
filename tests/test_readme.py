"""The README: its Python examples run as written (each block in a fresh namespace, in order), its first screen
is what it is, install and one ten-line example per host, and it works as the package description on PyPI (no
relative links, which break there)."""

from __future__ import annotations

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _text() -> str:
    with open(README, encoding="utf-8") as handle:
        return handle.read()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", _text(), flags=re.DOTALL)


def test_readme_has_python_examples():
    assert len(_python_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs(index, capsys):
    code = _python_blocks()[index]
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(code, f"README.md[python block {index}]", "exec"), namespace)  # noqa: S102
    if "IMuon(verbosity=0).run(" in code:  # the Pymanopt block reaches the known optimum
        result, c, p = namespace["result"], namespace["C"], namespace["p"]
        import numpy as np

        want = -np.sort(np.linalg.eigvalsh(c))[-p:].sum()
        assert abs(result.cost - want) <= 1e-6 * abs(want)
    if "stiefel.random" in code:  # the torch block stays on the manifold
        w = namespace["W"].detach()
        import torch

        assert torch.dist(w.T @ w, torch.eye(w.shape[1])) < 1e-5


def test_first_screen_is_install_then_one_short_example_per_host():
    text = _text()
    headings = [h for h in re.findall(r"^(#{2,3} .*)$", text, flags=re.MULTILINE)]
    assert headings[:2] == ["## Install", "## Quick start"], headings[:4]
    first_screen = text[: text.index(headings[4])]  # up to the section after the two examples
    blocks = re.findall(r"```python\n(.*?)```", first_screen, flags=re.DOTALL)
    assert len(blocks) == 2
    assert "from imuon_manopt.optimizers import IMuon" in blocks[0]  # Pymanopt
    assert "from imuon_manopt.optim import IMuon" in blocks[1]  # torch / geoopt
    for block in blocks:
        code_lines = [line for line in block.splitlines() if line.strip()]
        assert len(code_lines) <= 12, block
    assert "download.pytorch.org/whl/cpu" in first_screen  # how to get the CPU build of torch


def test_no_relative_links():
    # On PyPI the README is the package description, rendered away from the repository: a relative link (docs,
    # examples, images) points nowhere there. Links are absolute; files are named in code spans instead.
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)", _text())
    relative = [t for t in targets if not re.match(r"https?://|#", t)]
    assert relative == []
