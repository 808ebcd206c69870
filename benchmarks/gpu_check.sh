#!/usr/bin/env bash
# The prepared GPU check (issue 13): CUDA tests, bench_polar and bench_optim on CUDA (eager and CUDA graphs), and a
# GPT-2-small-sized PEFT LoRA fine-tune with AdamW, Muon and iMuon; writes one markdown table to
# benchmarks/gpu_check.md (see benchmarks/gpu_check.py). At most 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh             # on a machine with a CUDA device
#   bash benchmarks/gpu_check.sh --dry-run   # CPU, tiny sizes, seconds (what CI runs)
#
# Further arguments go to gpu_check.py (e.g. --out FILE, --steps N, --skip tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=10 480 "$PY" benchmarks/gpu_check.py "$@"
