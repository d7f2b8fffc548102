#!/usr/bin/env bash
# The main job: generate a synthetic regression set (X ~ N(0, I), y = Xw + b + noise)
# into a local store, stream it with a fresh block order each epoch, fit w and b by
# SGD, and print what was recovered and the throughput.
# Usage: scripts/demo.sh [STORE] (default data/demo.zarr; ROWS, FEATURES, EPOCHS override sizes)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
STORE=${1:-data/demo.zarr}
.venv/bin/shardset generate "$STORE" --rows "${ROWS:-8000000}" --features "${FEATURES:-16}" --block-mb 64 --seed 0
.venv/bin/shardset info "$STORE"
.venv/bin/shardset train "$STORE" --epochs "${EPOCHS:-3}" --batch-size 1024 --lr 0.1
