#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its test and example extras.
# torch is pinned through constraints.txt so a CPU machine gets the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test,examples,peft]"
