#!/usr/bin/env bash
# Creates (or updates) .venv with canvasrt and its test and TensorRT-RTX extras, pinned by constraints.txt.
# torch is pinned to the CPU build (2.13.0) so that no CUDA wheels are pulled on a machine without a GPU.
# TensorRT's type stubs (tensorrt-stubs) go to .venv/tensorrt-stubs, outside the environment's site-packages (there
# they would make a `tensorrt` namespace package that passes for TensorRT itself); the type check of the TensorRT
# executor reads them from there, so no test needs the network.
# Also creates .venv-triton, the environment of `canvasrt serve`: the tritonserver of the nvidia-pytriton wheel and
# what its Python-backend models import (canvasrt, numpy<2 as Triton 2.51's Python stub needs, onnxruntime,
# tokenizers; transformers and Pillow for the Gemma 4 image processor), pinned by constraints-triton.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[rtx,test]"
if [ ! -f .venv/tensorrt-stubs/tensorrt_bindings/tensorrt.pyi ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt \
    --target .venv/tensorrt-stubs tensorrt-stubs
fi
if [ ! -x .venv-triton/bin/python ]; then
  "$PYTHON" -m venv .venv-triton
fi
.venv-triton/bin/python -m pip install --quiet --upgrade pip
.venv-triton/bin/python -m pip install --quiet -c constraints-triton.txt nvidia-pytriton onnxruntime tokenizers transformers pillow
.venv-triton/bin/python -m pip install --quiet --no-deps -e .
