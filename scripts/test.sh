#!/usr/bin/env bash
# Set up, check the import layers (pyproject.toml [tool.importlinter]), then run the test suite. Extra arguments go to
# pytest (e.g. -k phantom).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest "$@"
