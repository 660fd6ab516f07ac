#!/usr/bin/env bash
# Reproduce the prior shipped in src/demist/priors/tiny (docs/prior.md): pretrain the tiny PSR and condition
# autoencoders and the backbone on 40 synthetic subjects of seed 1000, then install the result in the package.
# About 80 minutes on 2 CPU cores without native bf16. Usage: scripts/train_prior.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
work="${1:-prior-work}"
.venv/bin/demist train prior --out "$work" --config tiny --subjects 40 --seed 1000 --device cpu
rm -rf src/demist/priors/tiny
mkdir -p src/demist/priors
cp -r "$work/prior" src/demist/priors/tiny
echo "prior installed: src/demist/priors/tiny"
