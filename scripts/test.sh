#!/usr/bin/env bash
# Set up, check the import layers (pyproject.toml [tool.importlinter]) and lint (ruff, [tool.ruff]), then run the
# test suite. Extra arguments go to pytest (e.g. -k phantom).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/lint-imports --no-cache
.venv/bin/ruff check --no-cache src tests benchmarks scripts
exec .venv/bin/python -m pytest "$@"
