#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the linter and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check imuon_manopt tests examples benchmarks
.venv/bin/ruff format --check imuon_manopt tests examples benchmarks
# The sdist and wheel build, pass twine's metadata check, and the wheel works in a clean venv (~1-2 min, mostly
# installing torch there).
# Type check of the package (configuration: [tool.mypy] in pyproject.toml).
.venv/bin/mypy
bash scripts/check_package.sh
# The docs site (mkdocs.yml: README, math, API reference from the docstrings, examples, results), warnings as
# errors: a broken link, a missing include or a docstring parameter that is not in the signature fails CI (~5 s).
.venv/bin/mkdocs build --strict --quiet
# The whole pytest run is bounded (20 minutes by default, TEST_TIMEOUT=seconds to change it): timeout kills
# pytest's whole process group, so a hung run fails CI instead of using up its budget. Each multi-process
# test also has its own deadline (tests/_multiprocess.py).
limit=${TEST_TIMEOUT:-1200}
status=0
timeout --kill-after=30 "$limit" .venv/bin/python -m pytest -q "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "scripts/test.sh: the test suite did not finish within ${limit} s and was killed" >&2
fi
exit "$status"
