#!/usr/bin/env bash
# Creates (or updates) .venv with canvasrt and its test and TensorRT-RTX extras, pinned by constraints.txt.
# torch is pinned to the CPU build (2.13.0) so that no CUDA wheels are pulled on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[rtx,test]"
