#!/usr/bin/env bash
# The main job on the built-in tiny preset: random checkpoint -> ONNX export -> generate (live canvas) -> parity.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
WORK="${WORK:-runs/demo}"
mkdir -p "$WORK"
canvasrt random-checkpoint "$WORK/checkpoint" --preset tiny
canvasrt export "$WORK/checkpoint" -o "$WORK/artifacts" --max-context 256 --debug-logits
canvasrt generate "$WORK/artifacts" --prompt "Block diffusion writes a canvas at a time." --watch
canvasrt parity "$WORK/checkpoint" "$WORK/artifacts" --level step --report "$WORK/parity-step.json"
canvasrt parity "$WORK/checkpoint" "$WORK/artifacts" --level loop --report "$WORK/parity-loop.json"
