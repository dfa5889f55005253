#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py): released-width torch-backend step and generate parity against
# transformers on CUDA, step timings at 2 and 4 layers, and the extrapolation to 30 layers, in under 8 minutes.
#
# For a machine whose python3 has a CUDA build of torch and nothing else canvasrt needs (the device tool's H200):
#   here:   bash scripts/gpu_check.sh --fetch           # cp312 wheels of what that machine lacks -> gpu-wheels/ (~20 MB)
#   there:  bash scripts/gpu_check.sh [gpu_check.py options]   (carry gpu-wheels; figures go to $OUT/gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-gpu-wheels}"
# transformers 5.23 (the reference; such machines have an older one) and the packages whose versions it checks.
PACKAGES=(transformers==5.23.0 huggingface_hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0)
if [ "${1:-}" = "--fetch" ]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$WHEELS" "${PACKAGES[@]}"
  ls -la "$WHEELS"
  exit 0
fi
DEPS="$(mktemp -d)"
trap 'rm -rf "$DEPS"' EXIT
python3 -m pip install --quiet --no-index --no-deps --target "$DEPS" "$WHEELS"/*.whl
PYTHONPATH="$PWD/src:$DEPS" timeout 480 python3 scripts/gpu_check.py "$@"
