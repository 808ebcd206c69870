#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package in editable mode with the test, example, LoRA and docs
# extras (what scripts/test.sh, scripts/demo.sh and the docs build need).
#
# torch first, on its own, at the version constraints.txt pins:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh   # the CPU build from torch's index
#   bash scripts/setup.sh                                                        # pip's default: CUDA on Linux,
#                                                                                #  or a local CPU wheel if found
# An already installed torch of that version is kept (whichever build it is).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    .venv/bin/python -m pip install --quiet -c constraints.txt torch --index-url "$TORCH_INDEX_URL"
else
    .venv/bin/python -m pip install --quiet -c constraints.txt torch
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test,examples,peft,docs]"
