#!/usr/bin/env bash
# Create (or reuse) .venv with demist, its dependencies and its extras (test; preprocess: ANTsPy, deepbet, pybids). Idempotent: a second run with an unchanged
# pyproject.toml does nothing. torch comes from pip's configured index (the CPU or the CUDA build is the index's
# choice); TORCH_SPEC (default torch==2.13.0) overrides the version.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.demist-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test,preprocess]"
echo "$want" > "$stamp"
