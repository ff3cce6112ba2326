#!/usr/bin/env bash
# Checks lightning_viz's CUDA path in under 5 minutes on one GPU (see benchmarks/gpu_check.py); skips cleanly
# (exit 0, a message) where there is no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec timeout 300 env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/gpu_check.py "$@"
