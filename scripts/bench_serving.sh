#!/usr/bin/env bash
# The served model through the standard LLM load generator: aiperf (pinned in constraints-aiperf.txt, installed in
# .venv-aiperf of its own) against `canvasrt serve --openai-port` on the tiny preset, one loop instance of 8 slots:
#   triton       Triton's own generate_stream endpoint (aiperf's template endpoint, a TensorRT-LLM-style body)
#   completions  the OpenAI API's /v1/completions, streaming (the same prompts: the layer's own cost)
#   chat         the OpenAI API's /v1/chat/completions, streaming (the chat template adds its tokens to the prompt)
# at concurrency 1, 4 and 8, in ROUNDS interleaved rounds (each cell's figure is its median over the rounds, so that
# the endpoints are compared under the same spread of the shared machine's load), then scripts/bench_triton.py
# --concurrency 8 in the same run, and writes the table
# (time to first token, inter-chunk and inter-token latency, output tokens/s, requests/s, and per request the CPU time
# the serve process spent and the time its threads waited for a CPU while runnable: that process is the OpenAI front
# end and the relay on Triton's HTTP port; tritonserver is its child and not counted) into docs/PERFORMANCE.md with the machine named. Prefix with `nice`; the
# figures are CPU figures, on a shared machine.
#
#   nice bash scripts/bench_serving.sh            # REQUESTS=96 INPUT_TOKENS=32 OUTPUT_TOKENS=32 ROUNDS=3 by default
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS="${REQUESTS:-96}"
ROUNDS="${ROUNDS:-3}"
OUTPUT_TOKENS="${OUTPUT_TOKENS:-32}"
INPUT_TOKENS="${INPUT_TOKENS:-32}"
WORK="$(mktemp -d -t bench-serving-XXXXXX)"
SERVER=""
cleanup() {
  if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then
    kill -INT "$SERVER" && wait "$SERVER" || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
waited() {  # nanoseconds the serve process's threads have waited on a run queue (schedstat's second field)
  cat /proc/"$SERVER"/task/*/schedstat 2>/dev/null | awk '{sum += $2} END {printf "%.0f", sum}'
}

if [ ! -x .venv-aiperf/bin/aiperf ]; then
  python3 -m venv .venv-aiperf
fi
.venv-aiperf/bin/python -m pip install --quiet -c constraints-aiperf.txt aiperf

.venv/bin/canvasrt random-checkpoint "$WORK/ckpt" --preset tiny
.venv/bin/canvasrt export "$WORK/ckpt" -o "$WORK/art" --max-batch 8 --max-context 256
.venv/bin/canvasrt triton "$WORK/art" -o "$WORK/repo" --step-backend in-process --threads 1 --slots 8
read -r HTTP GRPC METRICS OPENAI < <(.venv/bin/python -c \
  "from canvasrt.serving.server import free_ports; print(*free_ports(4))")
.venv/bin/canvasrt serve "$WORK/repo" --python-env .venv-triton --http-port "$HTTP" --grpc-port "$GRPC" \
  --metrics-port "$METRICS" --openai-port "$OPENAI" 2> "$WORK/serve.log" &
SERVER=$!
until grep -q "^serving" "$WORK/serve.log"; do
  kill -0 "$SERVER" || { cat "$WORK/serve.log"; exit 1; }
  sleep 0.5
done

# Triton's generate_stream with a TensorRT-LLM-style body; aiperf reads the deltas from text_output
printf '%s' '{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens }}, "stream": true}' > "$WORK/triton.jinja"
for round in $(seq "$ROUNDS"); do
for concurrency in 1 4 8; do
  for kind in triton completions chat; do
    cell="$kind-$concurrency-$round"
    case "$kind" in
      triton) endpoint=(--url "http://127.0.0.1:$HTTP" --endpoint-type template
        --custom-endpoint /v2/models/canvasrt_generate/generate_stream
        --extra-inputs "payload_template:$WORK/triton.jinja" --extra-inputs response_field:text_output) ;;
      *) endpoint=(--url "http://127.0.0.1:$OPENAI" --endpoint-type "$kind") ;;
    esac
    echo "aiperf: $kind at concurrency $concurrency, round $round" >&2
    before=$(awk '{print $14 + $15}' "/proc/$SERVER/stat")
    waited_before=$(waited)
    .venv-aiperf/bin/aiperf profile --model canvasrt_generate "${endpoint[@]}" --streaming \
      --tokenizer "$WORK/art" --concurrency "$concurrency" --request-count "$REQUESTS" \
      --warmup-request-count "$concurrency" --random-seed 0 \
      --prompt-input-tokens-mean "$INPUT_TOKENS" --prompt-input-tokens-stddev 0 \
      --prompt-output-tokens-mean "$OUTPUT_TOKENS" --prompt-output-tokens-stddev 0 \
      --output-artifact-dir "$WORK/aiperf/$cell" --ui-type none --no-server-metrics \
      --no-gpu-telemetry > "$WORK/aiperf-$cell.log" 2>&1 \
      || { tail -20 "$WORK/aiperf-$cell.log"; exit 1; }
    echo $(( $(awk '{print $14 + $15}' "/proc/$SERVER/stat") - before )) > "$WORK/cpu-$cell"
    echo $(( $(waited) - waited_before )) > "$WORK/wait-$cell"
  done
done
done
kill -INT "$SERVER" && wait "$SERVER" || true
SERVER=""

.venv/bin/python scripts/bench_triton.py --presets tiny --concurrency 8 --json "$WORK/bench_triton.json"

.venv/bin/python - "$WORK" "$REQUESTS" "$INPUT_TOKENS" "$OUTPUT_TOKENS" "$(getconf CLK_TCK)" "$ROUNDS" <<'EOF'
"""The table, from aiperf's JSON exports and bench_triton.py's, into docs/PERFORMANCE.md between its markers."""

import json
import os
import platform
import re
import statistics
import sys
from pathlib import Path

work, requests, isl, osl, ticks, rounds = Path(sys.argv[1]), *sys.argv[2:]
kinds = ("triton", "completions", "chat")
cells = range(1, int(rounds) + 1)
stats = {}
for kind in kinds:
    for concurrency in (1, 4, 8):
        for cell in cells:
            data = json.loads(
                (work / "aiperf" / f"{kind}-{concurrency}-{cell}" / "profile_export_aiperf.json").read_text()
            )
            if data.get("error_summary"):
                raise SystemExit(f"aiperf {kind} at {concurrency}, round {cell}: errors {data['error_summary']}")
            stats.setdefault((kind, concurrency), []).append(data)


def avg(kind: str, concurrency: int, metric: str, statistic: str = "avg") -> float:
    """The median over the rounds of a cell's statistic of `metric` (aiperf's average by default)."""
    return statistics.median(data[metric][statistic] for data in stats[kind, concurrency])


def per_request(prefix: str, kind: str, concurrency: int) -> float:
    """A counter of the serve process summed over a cell's rounds, per request (aiperf's warm-up ones included)."""
    total = sum(int((work / f"{prefix}-{kind}-{concurrency}-{cell}").read_text()) for cell in cells)
    return total / (len(cells) * (int(requests) + concurrency))


cpu = next(
    (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line),
    platform.processor(),
)
memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
pressure = Path("/proc/pressure/cpu").read_text().split()[1:4] if Path("/proc/pressure/cpu").exists() else []
machine = f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, no GPU; load average {load} (1, 5, 15 min)" + (
    f", CPU pressure {' '.join(pressure)} (the share of time some runnable task waited for a CPU)" if pressure else ""
)
machine += " at the end"
version = stats["chat", 1][0]["aiperf_version"]
lines = [
    f"`nice bash scripts/bench_serving.sh` (aiperf {version}; tiny preset, one loop instance of 8 slots, "
    f"`--step-backend in-process --threads 1`; {requests} requests per cell, {isl} prompt tokens, max_tokens "
    f"{osl}: two canvases of 16; each figure the median of {rounds} interleaved rounds). Machine: {machine}.",
    "",
    "| endpoint | concurrency | TTFT avg / p50 ms | inter-chunk ms | inter-token ms | output tokens/s | requests/s "
    "| serve CPU ms/request | serve run-queue wait ms/request |",
    "|---|---|---|---|---|---|---|---|---|",
]
for kind in kinds:
    for concurrency in (1, 4, 8):
        # the serve process is the OpenAI front end, and for the triton rows the relay on Triton's HTTP port; CPU in
        # clock ticks, run-queue wait in nanoseconds
        front = f"{1000 * per_request('cpu', kind, concurrency) / int(ticks):.2f}"
        queued = f"{per_request('wait', kind, concurrency) / 1e6:.1f}"
        lines.append(
            f"| {kind} | {concurrency} | {avg(kind, concurrency, 'time_to_first_token'):.1f} / "
            f"{avg(kind, concurrency, 'time_to_first_token', 'p50'):.1f} | "
            f"{avg(kind, concurrency, 'inter_chunk_latency'):.1f} | "
            f"{avg(kind, concurrency, 'inter_token_latency'):.2f} | "
            f"{avg(kind, concurrency, 'output_token_throughput'):.0f} | "
            f"{avg(kind, concurrency, 'request_throughput'):.2f} | {front} | {queued} |"
        )
lines.append("")
for concurrency in (1, 4, 8):
    ttft = avg("completions", concurrency, "time_to_first_token") - avg("triton", concurrency, "time_to_first_token")
    chunk = avg("completions", concurrency, "inter_chunk_latency") - avg("triton", concurrency, "inter_chunk_latency")
    lines.append(
        f"- OpenAI layer over Triton direct at concurrency {concurrency} (completions against generate_stream, the "
        f"same prompts): TTFT {ttft:+.1f} ms, inter-chunk {chunk:+.1f} ms (targets: at most +2 ms and +1 ms)."
    )
for kind in kinds:
    ratio = avg(kind, 8, "output_token_throughput") / avg(kind, 1, "output_token_throughput")
    lines.append(f"- {kind}: output tokens/s at concurrency 8 / concurrency 1 = {ratio:.2f}x (target: at least 2x).")
rows = json.loads((work / "bench_triton.json").read_text())
for row in rows:
    batched, single = row["batched"], row["one slot"]
    lines.append(
        f"- `scripts/bench_triton.py --presets tiny --concurrency 8`, same run (gRPC, 8 one-canvas requests, 16 "
        f"steps): {batched['tokens_per_s']:.0f} tokens/s on 8 slots against {single['tokens_per_s']:.0f} on one, "
        f"{batched['tokens_per_s'] / single['tokens_per_s']:.2f}x."
    )
table = "\n".join(lines)
path = Path("docs/PERFORMANCE.md")
text = path.read_text()
begin, end = "<!-- bench_serving:begin -->", "<!-- bench_serving:end -->"
if begin not in text:
    raise SystemExit(f"{path} lacks the {begin} ... {end} markers")
text = re.sub(f"{re.escape(begin)}.*?{re.escape(end)}", lambda _: f"{begin}\n{table}\n{end}", text, flags=re.S)
path.write_text(text)
print(table)
EOF
