#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py), the single GPU verification, in under 10 minutes: the conformance
# suite on every executor present, step and loop parity of ONNX Runtime CUDA and a full-TensorRT engine (where
# installed), bench side by side with the bytes crossed per step, one request served in process, the released-width
# torch checks; what the machine cannot do is reported as skipped. One JSON summary: $OUT/gpu_check.json.
#
# For a machine whose python3 has a CUDA build of torch and nothing else canvasrt needs (the device tool's H200):
#   here:   bash scripts/gpu_check.sh --fetch           # cp312 wheels of what that machine lacks -> gpu-wheels/ (~20 MB)
#   there:  bash scripts/gpu_check.sh [gpu_check.py options]   (carry gpu-wheels; figures go to $OUT/gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-gpu-wheels}"
# transformers 5.23 (the reference; such machines have an older one) and the packages whose versions it checks.
# pytest and its two dependencies run the conformance suite.
PACKAGES=(transformers==5.23.0 huggingface_hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 pytest==9.2.0
  pluggy==1.7.0 iniconfig==2.3.1)
if [ "${1:-}" = "--fetch" ]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$WHEELS" "${PACKAGES[@]}"
  ls -la "$WHEELS"
  exit 0
fi
DEPS="$(mktemp -d)"
trap 'rm -rf "$DEPS"' EXIT
python3 -m pip install --quiet --no-index --no-deps --target "$DEPS" "$WHEELS"/*.whl
PYTHONPATH="$PWD/src:$DEPS" timeout 570 python3 scripts/gpu_check.py "$@"
