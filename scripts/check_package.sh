#!/usr/bin/env bash
# Packaging check (run by scripts/test.sh): builds the sdist and the wheel, checks their metadata with twine,
# checks what the sdist carries, installs the wheel into a clean virtualenv (torch pinned as scripts/setup.sh does;
# no extras) and there imports the three entry points and runs the README's examples that need no extra.
# Uses the pip cache, so after the first run nothing is downloaded. TORCH_INDEX_URL as in scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON_BIN:-.venv/bin/python}
# The clean venv (~0.8 GB, torch) goes to memory where there is room: on disk, deleting it right after writing it
# took a minute under load (writeback), longer than the whole check.
if [ -d /dev/shm ] && [ -w /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR == 2 {print $4}')" -gt 2000000 ]; then
    WORK=$(mktemp -d -p /dev/shm)
else
    WORK=$(mktemp -d)
fi
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
phase=$SECONDS
lap() { echo "packaging check: $1 $((SECONDS - phase)) s"; phase=$SECONDS; }

"$PY" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
"$PY" -m twine check --strict "$WORK"/dist/*
lap "build + twine check"

sdist=$(ls "$WORK"/dist/*.tar.gz)
wheel=$(ls "$WORK"/dist/*.whl)
tar -tzf "$sdist" >"$WORK/sdist.txt"  # listed to files first: `tar | grep -q` fails under pipefail (SIGPIPE)
"$PY" -m zipfile -l "$wheel" >"$WORK/wheel.txt"
for required in LICENSE CITATION.cff CHANGELOG.md docs/math.md docs/results/digits_stiefel.png examples/pca.py \
    imuon_manopt/py.typed; do
    grep -q "^[^/]*/$required\$" "$WORK/sdist.txt" || { echo "sdist lacks $required"; exit 1; }
done
for required in imuon_manopt/py.typed imuon_manopt/optim/__init__.py imuon_manopt/optimizers/__init__.py; do
    grep -q "^$required " "$WORK/wheel.txt" || { echo "wheel lacks $required"; exit 1; }
done

"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# --no-compile: byte-compiling torch's thousands of modules is most of an install's time; imports compile lazily.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$VPY" -m pip install --quiet --no-compile -c constraints.txt torch --index-url "$TORCH_INDEX_URL"
fi
"$VPY" -m pip install --quiet --no-compile -c constraints.txt "$wheel"
lap "clean venv + wheel install"
if "$VPY" -m pip show --quiet autograd pytest >/dev/null 2>&1; then
    echo "the plain install pulled a test extra (autograd or pytest)"; exit 1
fi

# Outside the source tree, so the installed wheel is what gets imported.
cd "$WORK"
"$VPY" - "$ROOT/README.md" <<'PYEOF'
import re
import sys

import imuon_manopt
import imuon_manopt.optim
import imuon_manopt.optimizers

assert imuon_manopt.__file__.startswith(sys.prefix), imuon_manopt.__file__  # the wheel, not the checkout
blocks = re.findall(r"```python\n(.*?)```", open(sys.argv[1], encoding="utf-8").read(), flags=re.DOTALL)
extras = re.compile(r"^\s*(from|import) (peft|transformers|sklearn|matplotlib|autograd)\b", flags=re.MULTILINE)
ran, skipped = [], []
for i, code in enumerate(blocks):  # every example the plain install can run (the first two: one per host)
    if extras.search(code):
        skipped.append(i + 1)
        continue
    exec(compile(code, f"README.md[python block {i}]", "exec"), {"__name__": f"readme_{i}"})
    ran.append(i + 1)
assert ran[:2] == [1, 2], ran
print(f"wheel imuon_manopt {imuon_manopt.__version__}: three entry points import; README examples {ran} run, "
      f"{skipped} need extras")
PYEOF
lap "imports + README examples"
echo "packaging check: $((SECONDS - start)) s in all"
