#!/usr/bin/env bash
# Set up, then run the end-to-end demo on the embedded synthetic cohort. Extra arguments go to `demist demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/demist demo "$@"
