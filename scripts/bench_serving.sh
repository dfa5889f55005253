#!/usr/bin/env bash
# The served model through the standard LLM load generator: aiperf (pinned in constraints-aiperf.txt, installed in
# .venv-aiperf of its own) against `canvasrt serve --openai-port` on the tiny preset, one loop instance of 8 slots:
#   triton       Triton's own generate_stream endpoint (aiperf's template endpoint, a TensorRT-LLM-style body)
#   completions  the OpenAI API's /v1/completions, streaming (the same prompts: the layer's own cost)
#   chat         the OpenAI API's /v1/chat/completions, streaming (the chat template adds its tokens to the prompt)
# at concurrency 1, 4 and 8, one endpoint at a time, in ROUNDS interleaved rounds (each cell's figure is its median
# over the rounds). Each round then runs triton and completions side by side, both at once at concurrency 1 each and
# then 4 each (8 streams on the instance), so that the OpenAI layer's cost is measured on the same machine at the same
# moment in the same in-flight batches: cells run one after another differ by the machine's drift (here the loop
# model's CPU time for identical requests varies by up to a third between cells), which buries a difference of a
# millisecond or two. Last, scripts/bench_triton.py --concurrency 8 in the same run. The table goes into
# docs/PERFORMANCE.md with the machine named: per cell time to first token, inter-chunk and inter-token latency,
# output tokens/s, requests/s, and per request the CPU time of the serve process (the OpenAI front end, and the relay
# on Triton's HTTP port), the time its threads waited for a CPU while runnable, the CPU time of tritonserver and its
# models, and the loop model's rows per step call (its counters on the metrics endpoint); for the side-by-side pairs,
# the difference of the means over the requests both ran at once, with its 95% confidence interval. Prefix with
# `nice`; the figures are CPU figures, on a shared machine.
#
#   nice bash scripts/bench_serving.sh   # 22 minutes; by default REQUESTS=96 PAIR_REQUESTS=600 ROUNDS=5
#                                        # INPUT_TOKENS=32 OUTPUT_TOKENS=32
#   KEEP=1 ...                           # keeps aiperf's exports and the counters (the script prints where)
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS="${REQUESTS:-96}"
PAIR_REQUESTS="${PAIR_REQUESTS:-600}"
ROUNDS="${ROUNDS:-5}"
OUTPUT_TOKENS="${OUTPUT_TOKENS:-32}"
INPUT_TOKENS="${INPUT_TOKENS:-32}"
WORK="$(mktemp -d -t bench-serving-XXXXXX)"
SERVER=""
cleanup() {
  if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then
    kill -INT "$SERVER" && wait "$SERVER" || true
  fi
  if [ -n "${KEEP:-}" ]; then
    echo "aiperf's exports and the counters are in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
model_cpu() {  # clock ticks tritonserver and its model processes (the serve process's descendants) have run
  local pids all="" p
  pids=$(pgrep -P "$SERVER" || true)
  while [ -n "$pids" ]; do
    all="$all $pids"
    pids=$(for p in $pids; do pgrep -P "$p" || true; done)
  done
  for p in $all; do
    awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || true
  done | awk '{s += $1} END {print s + 0}'
}
steps() {  # the loop model's step calls and row-steps so far (its counters on Triton's metrics endpoint)
  sleep 0.3  # an instance that went idle hands its counters over at once; give that a moment to land
  curl -sf "http://127.0.0.1:$METRICS/metrics" | awk '
    /^canvasrt_step_calls_total/ {calls += $NF} /^canvasrt_row_steps_total/ {rows += $NF}
    END {printf "%d %d\n", calls, rows}'
}
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
profile() {  # KIND CONCURRENCY REQUESTS NAME: one aiperf run into $WORK/aiperf/NAME
  local kind=$1 concurrency=$2 count=$3 name=$4 endpoint
  case "$kind" in
    triton) endpoint=(--url "http://127.0.0.1:$HTTP" --endpoint-type template
      --custom-endpoint /v2/models/canvasrt_generate/generate_stream
      --extra-inputs "payload_template:$WORK/triton.jinja" --extra-inputs response_field:text_output) ;;
    *) endpoint=(--url "http://127.0.0.1:$OPENAI" --endpoint-type "$kind") ;;
  esac
  .venv-aiperf/bin/aiperf profile --model canvasrt_generate "${endpoint[@]}" --streaming \
    --tokenizer "$WORK/art" --concurrency "$concurrency" --request-count "$count" \
    --warmup-request-count "$concurrency" --random-seed 0 \
    --prompt-input-tokens-mean "$INPUT_TOKENS" --prompt-input-tokens-stddev 0 \
    --prompt-output-tokens-mean "$OUTPUT_TOKENS" --prompt-output-tokens-stddev 0 \
    --output-artifact-dir "$WORK/aiperf/$name" --ui-type none --no-server-metrics \
    --no-gpu-telemetry > "$WORK/aiperf-${name//\//-}.log" 2>&1 \
    || { tail -20 "$WORK/aiperf-${name//\//-}.log"; return 1; }
}
for round in $(seq "$ROUNDS"); do
  for concurrency in 1 4 8; do
    for kind in triton completions chat; do
      cell="$kind-$concurrency-$round"
      echo "aiperf: $kind at concurrency $concurrency, round $round" >&2
      before=$(awk '{print $14 + $15}' "/proc/$SERVER/stat")
      waited_before=$(waited)
      model_before=$(model_cpu)
      read -r calls_before rows_before < <(steps)
      profile "$kind" "$concurrency" "$REQUESTS" "$cell"
      echo $(( $(awk '{print $14 + $15}' "/proc/$SERVER/stat") - before )) > "$WORK/cpu-$cell"
      echo $(( $(waited) - waited_before )) > "$WORK/wait-$cell"
      echo $(( $(model_cpu) - model_before )) > "$WORK/model-$cell"
      read -r calls rows < <(steps)
      echo "$(( calls - calls_before )) $(( rows - rows_before ))" > "$WORK/steps-$cell"
    done
  done
  # side by side: Triton's endpoint and the OpenAI API at once on the one loop instance, so that both see the same
  # machine, the same load and the same in-flight batches
  for concurrency in 1 4; do
    echo "aiperf: triton and completions side by side at concurrency $concurrency each, round $round" >&2
    profile triton "$concurrency" "$PAIR_REQUESTS" "pair-$concurrency-$round/triton" & triton=$!
    profile completions "$concurrency" "$PAIR_REQUESTS" "pair-$concurrency-$round/completions" & openai=$!
    wait "$triton" || exit 1
    wait "$openai" || exit 1
  done
done
kill -INT "$SERVER" && wait "$SERVER" || true
SERVER=""

.venv/bin/python scripts/bench_triton.py --presets tiny --concurrency 8 --json "$WORK/bench_triton.json"

.venv/bin/python - "$WORK" "$REQUESTS" "$INPUT_TOKENS" "$OUTPUT_TOKENS" "$(getconf CLK_TCK)" "$ROUNDS" "$PAIR_REQUESTS" <<'EOF'
"""The table, from aiperf's JSON exports and bench_triton.py's, into docs/PERFORMANCE.md between its markers."""

import json
import math
import os
import platform
import re
import statistics
import sys
from pathlib import Path

work, requests, isl, osl, ticks, rounds, pair_requests = Path(sys.argv[1]), *sys.argv[2:]
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


def window(records: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The profiling records of a side-by-side pair that started and ended while both endpoints were being measured."""
    start = max(min(r["metadata"]["request_start_ns"] for r in rs) for rs in records.values())
    end = min(max(r["metadata"]["request_end_ns"] for r in rs) for rs in records.values())
    return {
        kind: [r for r in rs if r["metadata"]["request_start_ns"] >= start and r["metadata"]["request_end_ns"] <= end]
        for kind, rs in records.items()
    }


def side_by_side(concurrency: int) -> dict[str, dict[str, list[float]]]:
    """Per endpoint of the pairs at `concurrency` each, pooled over the rounds: each request's TTFT and mean gap
    between chunks (ms), from aiperf's per-request export, in the window the pair shared."""
    pooled: dict[str, dict[str, list[float]]] = {kind: {"ttft": [], "chunk": []} for kind in ("triton", "completions")}
    for cell in cells:
        records = {}
        for kind in pooled:
            lines = (work / "aiperf" / f"pair-{concurrency}-{cell}" / kind / "profile_export.jsonl").read_text()
            records[kind] = [
                r for r in map(json.loads, lines.splitlines()) if r["metadata"].get("benchmark_phase") == "profiling"
            ]
            if any(r.get("error") or "time_to_first_token" not in r["metrics"] for r in records[kind]):
                raise SystemExit(f"aiperf side by side, {kind} at {concurrency}, round {cell}: failed requests")
        shared = window(records)
        if min(map(len, shared.values())) < 2:
            raise SystemExit(f"aiperf side by side at {concurrency}, round {cell}: too few requests ran at once; raise "
                             "PAIR_REQUESTS")
        for kind, rs in shared.items():
            pooled[kind]["ttft"] += [r["metrics"]["time_to_first_token"]["value"] for r in rs]
            pooled[kind]["chunk"] += [
                statistics.mean(r["metrics"]["inter_chunk_latency"]["value"])
                for r in rs
                if r["metrics"].get("inter_chunk_latency", {}).get("value")
            ]
    return pooled


def difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(b) - mean(a), and the half-width of its 95% confidence interval (normal approximation)."""
    return statistics.mean(b) - statistics.mean(a), 1.96 * math.sqrt(
        statistics.variance(a) / len(a) + statistics.variance(b) / len(b)
    )


def per_request(prefix: str, kind: str, concurrency: int) -> float:
    """A counter (of the serve process, or of tritonserver and its models) summed over a cell's rounds, per request
    (aiperf's warm-up ones included)."""
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
    "| serve CPU ms/request | serve run-queue wait ms/request | tritonserver + models CPU ms/request "
    "| rows per step call |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]
for kind in kinds:
    for concurrency in (1, 4, 8):
        # the serve process is the OpenAI front end, and for the triton rows the relay on Triton's HTTP port; CPU in
        # clock ticks, run-queue wait in nanoseconds
        front = f"{1000 * per_request('cpu', kind, concurrency) / int(ticks):.2f}"
        queued = f"{per_request('wait', kind, concurrency) / 1e6:.1f}"
        model = f"{1000 * per_request('model', kind, concurrency) / int(ticks):.1f}"
        counts = [(work / f"steps-{kind}-{concurrency}-{cell}").read_text().split() for cell in cells]
        occupancy = f"{sum(int(r) for _, r in counts) / max(1, sum(int(c) for c, _ in counts)):.2f}"
        lines.append(
            f"| {kind} | {concurrency} | {avg(kind, concurrency, 'time_to_first_token'):.1f} / "
            f"{avg(kind, concurrency, 'time_to_first_token', 'p50'):.1f} | "
            f"{avg(kind, concurrency, 'inter_chunk_latency'):.1f} | "
            f"{avg(kind, concurrency, 'inter_token_latency'):.2f} | "
            f"{avg(kind, concurrency, 'output_token_throughput'):.0f} | "
            f"{avg(kind, concurrency, 'request_throughput'):.2f} | {front} | {queued} | {model} | {occupancy} |"
        )
def model_ms(kind: str, concurrency: int, cell: int) -> float:
    """CPU ms per request of tritonserver and its models in one cell."""
    ticks_used = int((work / f"model-{kind}-{concurrency}-{cell}").read_text())
    return 1000 * ticks_used / int(ticks) / (int(requests) + concurrency)


spread = {
    "model CPU ms/request": [model_ms("triton", 8, cell) for cell in cells],
    "TTFT ms": [data["time_to_first_token"]["avg"] for data in stats["triton", 8]],
    "inter-chunk ms": [data["inter_chunk_latency"]["avg"] for data in stats["triton", 8]],
}
lines += [
    "",
    "The same cell over the rounds (triton at concurrency 8, identical requests): "
    + ", ".join(f"{name} {min(values):.1f} to {max(values):.1f}" for name, values in spread.items())
    + ".",
    "",
    f"Side by side: Triton's generate_stream and the OpenAI completions at once, each at the concurrency shown, "
    f"{pair_requests} requests each per round (the same prompts), the requests of both that started and ended while "
    f"both were measured, pooled over the {rounds} rounds; the difference is the OpenAI layer's, with its 95% "
    "confidence interval.",
    "",
    "| concurrency | requests (triton / completions) | TTFT triton / completions ms | TTFT difference ms "
    "| inter-chunk triton / completions ms | inter-chunk difference ms |",
    "|---|---|---|---|---|---|",
]
overheads = {}
for concurrency in (1, 4):
    pooled = side_by_side(concurrency)
    triton, openai = pooled["triton"], pooled["completions"]
    overheads[concurrency] = ttft, chunk = difference(triton["ttft"], openai["ttft"]), difference(
        triton["chunk"], openai["chunk"]
    )
    lines.append(
        f"| {concurrency} + {concurrency} | {len(triton['ttft'])} / {len(openai['ttft'])} | "
        f"{statistics.mean(triton['ttft']):.1f} / {statistics.mean(openai['ttft']):.1f} | "
        f"{ttft[0]:+.1f} ± {ttft[1]:.1f} | {statistics.mean(triton['chunk']):.1f} / "
        f"{statistics.mean(openai['chunk']):.1f} | {chunk[0]:+.1f} ± {chunk[1]:.1f} |"
    )
lines.append("")
for concurrency, ((ttft, ttft_ci), (chunk, chunk_ci)) in overheads.items():
    lines.append(
        f"- OpenAI layer over Triton direct, side by side with {2 * concurrency} streams on the instance: TTFT "
        f"{ttft:+.1f} ms (95% CI {ttft - ttft_ci:+.1f} to {ttft + ttft_ci:+.1f}), inter-chunk {chunk:+.1f} ms "
        f"({chunk - chunk_ci:+.1f} to {chunk + chunk_ci:+.1f}) (targets: at most +2 ms and +1 ms)."
    )
rounds_at_1 = [
    f"{o['time_to_first_token']['avg'] - t['time_to_first_token']['avg']:+.1f} ms "
    f"({model_ms('completions', 1, cell):.1f} / {model_ms('triton', 1, cell):.1f})"
    for cell, t, o in zip(cells, stats["triton", 1], stats["completions", 1])
]
lines.append(
    "- In separate runs at concurrency 1, where both paths give the loop model the same work, round by round: TTFT "
    "of completions minus triton, with the loop model's CPU ms per request in the two cells (completions / triton): "
    + ", ".join(rounds_at_1)
    + "."
)
for concurrency in (1, 4, 8):
    ttft = avg("completions", concurrency, "time_to_first_token") - avg("triton", concurrency, "time_to_first_token")
    chunk = avg("completions", concurrency, "inter_chunk_latency") - avg("triton", concurrency, "inter_chunk_latency")
    lines.append(
        f"- OpenAI layer over Triton direct in separate runs at concurrency {concurrency} (the medians of the cells "
        f"above, completions against triton): TTFT {ttft:+.1f} ms, inter-chunk {chunk:+.1f} ms."
    )
for kind in kinds:
    # each round's ratio, its cells a minute apart, so that the machine's drift between rounds cancels in it
    ratios = [
        high["output_token_throughput"]["avg"] / low["output_token_throughput"]["avg"]
        for low, high in zip(stats[kind, 1], stats[kind, 8])
    ]
    lines.append(
        f"- {kind}: output tokens/s at concurrency 8 / concurrency 1 = {statistics.median(ratios):.2f}x, the median "
        f"of the rounds' ratios ({min(ratios):.2f}x to {max(ratios):.2f}x; the ratio of the medians above "
        f"{avg(kind, 8, 'output_token_throughput') / avg(kind, 1, 'output_token_throughput'):.2f}x) (target: at least "
        "2x)."
    )
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
