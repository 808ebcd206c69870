#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main demonstration; plots and tables go to demo_output/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/demo.py --output demo_output "$@"
