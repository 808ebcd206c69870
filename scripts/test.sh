#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the linter and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check imuon_manopt tests examples benchmarks
.venv/bin/ruff format --check imuon_manopt tests examples benchmarks
.venv/bin/python -m pytest -q "$@"
