#!/usr/bin/env bash
# Released-width measurements for docs/PERFORMANCE.md ("Released width"): time and peak RSS of every stage on
# random checkpoints with the 26B-A4B's exact layer shapes and a few layers. Too heavy for CI (a 2-layer
# checkpoint is 4.8 GB, its fp32 artifacts 19 GB on disk): run it by hand, one stage at a time, on a machine with
# about 18 GB of RAM free and 60 GB of disk under DIR.
#
#   scripts/released_width.sh DIR [LAYERS ...]     # default: 2 4
#   STAGES="export parity" scripts/released_width.sh /work/big 2
#
# Stages (STAGES, default all): checkpoint, export (bf16, fp16, fp32), parity (step and loop on the fp32 artifacts;
# LOOP_TOKENS, if set, is the loop level's --max-new-tokens), calibrate (FP8 artifacts DIR/art-N-fp8 from the fp32
# ones, CALIBRATE_SAMPLES prompts, default 2, on the checkpoint's schedule), build (FP8 TensorRT-RTX engines for
# SM89 from DIR/art-N-fp8).
# Each measured command runs under /usr/bin/time -v; its log is DIR/<stage>.log and one line per stage goes to
# DIR/released-width.tsv: stage, exit status, wall seconds, peak RSS (KB). Artifacts no later stage needs are
# deleted as soon as they are measured.
set -uo pipefail
DIR=${1:?usage: scripts/released_width.sh DIR [LAYERS ...]}
shift
LAYERS=${*:-2 4}
STAGES=${STAGES:-checkpoint export parity calibrate build}
CALIBRATE_SAMPLES=${CALIBRATE_SAMPLES:-2}
LOOP_TOKENS=${LOOP_TOKENS:+--max-new-tokens $LOOP_TOKENS}
CANVASRT=${CANVASRT:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/canvasrt}
mkdir -p "$DIR"
TSV="$DIR/released-width.tsv"

measure() {  # measure NAME COMMAND...: run it under /usr/bin/time -v, append its figures to the TSV
  local name=$1
  shift
  echo "== $name: $*" >&2
  /usr/bin/time -v -o "$DIR/$name.time" "$@" >"$DIR/$name.log" 2>&1
  local status=$?
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i]; print s}' "$DIR/$name.time")
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$DIR/$name.time")
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$wall" "$rss" | tee -a "$TSV"
  tail -n 3 "$DIR/$name.log" >&2
}

has() { [[ " $STAGES " == *" $1 "* ]]; }

for n in $LAYERS; do
  ckpt="$DIR/released-$n"
  if has checkpoint; then
    measure "checkpoint-$n" "$CANVASRT" random-checkpoint "$ckpt" --preset released --layers "$n"
  fi
  if has export; then
    for dtype in bf16 fp16 fp32; do
      measure "export-$n-$dtype" "$CANVASRT" export "$ckpt" -o "$DIR/art-$n-$dtype" --dtype "$dtype"
      [ "$dtype" = fp32 ] || rm -rf "$DIR/art-$n-$dtype"
    done
  fi
  if has parity; then
    measure "parity-step-$n" "$CANVASRT" parity "$ckpt" "$DIR/art-$n-fp32" --level step --report "$DIR/parity-step-$n.json"
    measure "parity-loop-$n" "$CANVASRT" parity "$ckpt" "$DIR/art-$n-fp32" --level loop $LOOP_TOKENS --report "$DIR/parity-loop-$n.json"
  fi
  if has calibrate; then
    measure "calibrate-$n" "$CANVASRT" calibrate "$ckpt" "$DIR/art-$n-fp32" -o "$DIR/art-$n-fp8" --samples "$CALIBRATE_SAMPLES"
  fi
  if has build; then
    if [ -d "$DIR/art-$n-fp8" ]; then
      measure "build-fp8-$n" "$CANVASRT" build "$DIR/art-$n-fp8" -o "$DIR/engines-$n-fp8" --target sm89
    else
      echo "== build-fp8-$n: skipped, no FP8 artifacts at $DIR/art-$n-fp8 (canvasrt calibrate first)" >&2
    fi
  fi
done
