#!/usr/bin/env bash
# The main job. On the trained sort model (tests/fixtures/sort-tiny): export, generate with the live canvas, accuracy
# of the reference against the ONNX graphs, step and loop parity, FP8 calibration with its accuracy cost, an FP8
# TensorRT-RTX engine for SM89, and the FP8 model served by Triton. On the random tiny preset: random checkpoint,
# export with logits, step and loop parity.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
WORK="${WORK:-runs/demo}"
SORT=tests/fixtures/sort-tiny
mkdir -p "$WORK"

canvasrt export "$SORT" -o "$WORK/sort" --max-context 64
canvasrt generate "$WORK/sort" --prompt "sort 7 3 9 1 4 =" --watch
canvasrt eval "$SORT" --task sort --samples 100 --backend transformers
canvasrt eval "$WORK/sort" --task sort --samples 100
canvasrt parity "$SORT" "$WORK/sort" --level step --report "$WORK/sort-step.json"
canvasrt parity "$SORT" "$WORK/sort" --level loop --report "$WORK/sort-loop.json"
canvasrt calibrate "$SORT" "$WORK/sort" -o "$WORK/sort-fp8" --task sort
canvasrt eval "$WORK/sort-fp8" --task sort --samples 100
canvasrt parity "$SORT" "$WORK/sort-fp8" --level step --report "$WORK/sort-fp8-step.json"
canvasrt build "$WORK/sort-fp8" -o "$WORK/sort-fp8-sm89" --builder tensorrt-rtx --target sm89

# Triton: the FP8 sort model served by the tritonserver of .venv-triton, one streamed request over HTTP.
HTTP_PORT="${HTTP_PORT:-18000}"
canvasrt triton "$WORK/sort-fp8" -o "$WORK/sort-triton" --step-backend in-process --threads 1
canvasrt serve "$WORK/sort-triton" --python-env .venv-triton --http-port "$HTTP_PORT" --grpc-port "$((HTTP_PORT + 1))" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
until curl -sf "127.0.0.1:$HTTP_PORT/v2/health/ready"; do kill -0 $SERVER 2>/dev/null || exit 1; sleep 0.5; done
curl -sN -X POST "127.0.0.1:$HTTP_PORT/v2/models/canvasrt_generate/generate_stream" -d '{"prompt": "sort 7 3 9 1 4 =", "seed": 3}'
kill -TERM $SERVER && wait $SERVER
trap - EXIT

canvasrt random-checkpoint "$WORK/tiny" --preset tiny
canvasrt export "$WORK/tiny" -o "$WORK/tiny-onnx" --max-context 256 --debug-logits
canvasrt generate "$WORK/tiny-onnx" --prompt "Block diffusion writes a canvas at a time." --max-denoising-steps 4
canvasrt parity "$WORK/tiny" "$WORK/tiny-onnx" --level step --report "$WORK/tiny-step.json" --junit "$WORK/tiny-step.xml"
canvasrt parity "$WORK/tiny" "$WORK/tiny-onnx" --level loop --report "$WORK/tiny-loop.json"
