"""The Triton path's overhead against in-process generation, side by side in one run.

For each preset: a random checkpoint, its export, then the same requests (one prompt, seeds 0..N-1, one at a
time) through
  in-process   the loop on ONNX Runtime in this process (what `canvasrt generate` runs),
  triton       a tritonserver serving `canvasrt triton --step-backend in-process`, over gRPC streaming,
  triton-bls   the same with the steps in separate step models (`--step-backend python`), called over BLS.
Every path uses one ONNX Runtime thread and must return the same ids; the table gives mean milliseconds per request
and the ratio to in-process.

With --concurrency N (in-flight batching as served): N concurrent one-canvas requests (no early stop) to one loop
instance of N slots and to one of a single slot (`--slots 1`: one request at a time), in the same run: tokens/s over
the N, the step calls and row-steps from the metrics endpoint, and the time to first block of a request that arrives
while the N - 1 others are halfway through their canvas, against the same request alone (medians of 3 pairs). Every
reply must equal its in-process run. --rounds R sends the burst R times to each instance (tokens/s: the median);
--against ENV serves the same bursts from a second Python environment too (another checkout's `.venv-triton`, so
another version of the loop model), every server up at once and the rounds alternating between them (the order
reversed every other round), so that both see the same spread of a shared machine's load.

    .venv/bin/python scripts/bench_triton.py --presets tiny small --requests 20
    .venv/bin/python scripts/bench_triton.py --presets tiny small --concurrency 8 --steps 16
    .venv/bin/python scripts/bench_triton.py --presets tiny --concurrency 8 --rounds 15 --against ../main/.venv-triton
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def in_process(artifacts: Path, prompt: list[int], seeds: list[int]) -> tuple[list[float], list[list[int]]]:
    from canvasrt.runtime.backends import open_backend
    from canvasrt.runtime.scheduler import RowRequest, Scheduler, Ticket
    from canvasrt.serving.protocol import parse_request, request_inputs

    times, ids = [], []
    with open_backend(artifacts, "onnxruntime", threads=1) as backend:
        scheduler = Scheduler(backend, max_queue=0, slots=1)
        for seed in seeds:
            start = time.perf_counter()
            request = parse_request(request_inputs(prompt_ids=prompt, seed=seed), backend.spec.generation, None)
            ticket = scheduler.submit(Ticket(RowRequest(request.ids, request.seed, request.settings)))
            scheduler.run()
            times.append(time.perf_counter() - start)
            ids.append(ticket.events[-1].new_tokens[0].tolist())
    return times, ids


def served(
    artifacts: Path, step_backend: str, work: Path, env: Path, prompt: list[int], seeds: list[int]
) -> tuple[list[float], list[list[int]]]:
    from canvasrt.serving.client import generate_grpc
    from canvasrt.serving.protocol import request_inputs
    from canvasrt.serving.repository import write_repository
    from canvasrt.serving.server import TritonServer, free_ports

    repository = work / f"repo-{step_backend}"
    write_repository(artifacts, repository, step_backend, threads=1)
    http, grpc = free_ports(2)
    times, ids = [], []
    with TritonServer(repository, env, http_port=http, grpc_port=grpc) as server:
        generate_grpc(server.grpc_url, request_inputs(prompt_ids=prompt, seed=10_000))  # warm-up
        for seed in seeds:
            start = time.perf_counter()
            done = generate_grpc(server.grpc_url, request_inputs(prompt_ids=prompt, seed=seed))[-1]
            times.append(time.perf_counter() - start)
            ids.append(done["ids"])
    return times, ids


def _metric(url: str, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as page:
        for line in page.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise SystemExit(f"the metrics endpoint {url} has no {name}")


STEP_METRICS = ("canvasrt_step_calls_total", "canvasrt_row_steps_total")


def _settled_metric(url: str, name: str) -> float:
    """The metric once it stops changing: a busy loop model hands its metrics to Triton every 100 ms, and the
    last ones right after the final responses."""
    last = _metric(url, name)
    while True:
        time.sleep(0.2)
        now = _metric(url, name)
        if now == last:
            return now
        last = now


def inflight(
    artifacts: Path, work: Path, envs: dict[str, Path], prompt: list[int], concurrency: int, steps: int, rounds: int
) -> dict:
    """N concurrent one-canvas requests to N slots and to one slot, and the late arrival, as served by each
    environment in `envs` (by label; the rounds alternate between every server)."""
    from concurrent.futures import ThreadPoolExecutor

    from canvasrt.core.manifest import ArtifactManifest
    from canvasrt.runtime.backends import open_backend
    from canvasrt.runtime.scheduler import RowRequest, Scheduler, Ticket
    from canvasrt.runtime.settings import resolve_settings
    from canvasrt.serving.client import generate_grpc
    from canvasrt.serving.protocol import request_inputs
    from canvasrt.serving.repository import write_repository
    from canvasrt.serving.server import TritonServer, free_ports

    manifest = ArtifactManifest.load(artifacts)
    canvas = manifest.capacity.canvas
    settings = {"max_new_tokens": canvas, "max_denoising_steps": steps, "stability_threshold": steps + 1}
    seeds = list(range(concurrency))
    with open_backend(artifacts, "onnxruntime", threads=1) as backend:
        scheduler = Scheduler(backend, max_queue=concurrency, slots=1)
        resolved = resolve_settings(backend.spec.generation, settings)
        tickets = [scheduler.submit(Ticket(RowRequest(prompt, seed, resolved))) for seed in seeds]
        scheduler.run()
        reference = [t.events[-1].new_tokens[0].tolist() for t in tickets]

    def send(url: str, seed: int) -> tuple[float, list[int]]:
        start = time.perf_counter()
        done = generate_grpc(url, request_inputs(prompt_ids=prompt, seed=seed, **settings))[-1]
        return time.perf_counter() - start, done["ids"]

    modes = {"batched": concurrency, "one slot": 1}
    results: dict = {label: {} for label in envs}
    with ExitStack() as stack:
        servers = {}
        for label, env in envs.items():
            for mode, slots in modes.items():
                repository = work / f"repo-inflight-{label.replace(' ', '-')}-{slots}"
                write_repository(artifacts, repository, "in-process", threads=1, slots=slots, max_queue=concurrency)
                http, grpc = free_ports(2)
                server = stack.enter_context(TritonServer(repository, env, http_port=http, grpc_port=grpc))
                send(server.grpc_url, 10_000)  # warm-up
                servers[label, mode] = server
        before = {
            key: [_settled_metric(server.metrics_url, name) for name in STEP_METRICS] for key, server in servers.items()
        }
        walls: dict = {key: [] for key in servers}
        order = list(servers.items())
        for round_ in range(rounds):
            for (label, mode), server in order if round_ % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    replies = list(pool.map(send, [server.grpc_url] * concurrency, seeds))
                walls[label, mode].append(time.perf_counter() - start)
                if [ids for _, ids in replies] != reference:
                    raise SystemExit(f"{artifacts}: {label} {mode} returned other ids than their in-process runs")
        for (label, mode), server in servers.items():
            calls, rows = (
                (_settled_metric(server.metrics_url, name) - first) / rounds
                for name, first in zip(STEP_METRICS, before[label, mode])
            )
            wall = statistics.median(walls[label, mode])
            entry = {
                "slots": modes[mode],
                "tokens_per_s": concurrency * canvas / wall,
                "tokens_per_s_rounds": [concurrency * canvas / w for w in walls[label, mode]],
                "wall_s": wall,
                "step_calls": calls,
                "row_steps": rows,
            }
            if modes[mode] > 1:
                entry["late_arrival"] = _late_arrival(server, send, seeds, steps)
            results[label][mode] = entry
    return results


def _late_arrival(server, send, seeds: list[int], steps: int, repeats: int = 3) -> dict:
    """The last seed alone, then again while the others are halfway through their canvas (from the metrics:
    row-steps the others have run); one canvas, so its first block is its whole request."""
    import threading

    alone_s, late_s = [], []
    for _ in range(repeats):
        alone_s.append(send(server.grpc_url, seeds[-1])[0])
        others = seeds[:-1]
        start_rows = _settled_metric(server.metrics_url, "canvasrt_row_steps_total")
        threads = [threading.Thread(target=send, args=(server.grpc_url, seed)) for seed in others]
        for thread in threads:
            thread.start()
        while _metric(server.metrics_url, "canvasrt_row_steps_total") - start_rows < len(others) * (steps // 2):
            time.sleep(0.002)
        late_s.append(send(server.grpc_url, seeds[-1])[0])
        for thread in threads:
            thread.join()
    alone, late = statistics.median(alone_s) * 1e3, statistics.median(late_s) * 1e3
    return {
        "alone_ms": alone,
        "with_others_ms": late,
        "ratio": late / alone,
        "ratios": [w / a for w, a in zip(late_s, alone_s)],
    }


def latency_rows(
    preset: str, artifacts: Path, work: Path, env: Path, prompt: list[int], seeds: list[int]
) -> list[dict]:
    """Mean time per request in process, served in process and served through BLS step models; every path must
    return the in-process ids."""
    results = {"in-process": in_process(artifacts, prompt, seeds)}
    for mode, step_backend in (("triton", "in-process"), ("triton-bls", "python")):
        results[mode] = served(artifacts, step_backend, work, env, prompt, seeds)
    reference = results["in-process"]
    rows = []
    for mode, (times, ids) in results.items():
        if ids != reference[1]:
            raise SystemExit(f"{preset}: {mode} returned other ids than in-process")
        mean = statistics.mean(times) * 1e3
        rows.append(
            {
                "preset": preset,
                "path": mode,
                "requests": len(times),
                "mean_ms": round(mean, 2),
                "ratio": round(mean / (statistics.mean(reference[0]) * 1e3), 3),
            }
        )
    return rows


def print_inflight(rows: list[dict], concurrency: int) -> None:
    print(
        f"| preset | served by | loop instance | step calls / row-steps | tokens/s over {concurrency} | first block, "
        "late arrival / alone |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        base = row["one slot"]["tokens_per_s"]
        for label, modes in (("this checkout", row), ("against", row.get("against"))):
            for mode in ("batched", "one slot") if modes else ():
                _print_mode(row["preset"], label, modes[mode], base)


def _print_mode(preset: str, label: str, e: dict, base: float) -> None:
    """One table row; the tokens/s ratio is to this checkout's single slot."""
    late = e.get("late_arrival")
    print(
        f"| {preset} | {label} | {e['slots']} slot(s) | {e['step_calls']:.0f} / {e['row_steps']:.0f} | "
        f"{e['tokens_per_s']:.1f} ({e['tokens_per_s'] / base:.2f}x) | "
        + (f"{late['with_others_ms']:.1f} / {late['alone_ms']:.1f} ms: {late['ratio']:.2f}x |" if late else "- |")
    )


def print_latency(rows: list[dict]) -> None:
    print("| preset | path | requests | mean ms / request | vs in-process |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['preset']} | {row['path']} | {row['requests']} | {row['mean_ms']:.1f} | {row['ratio']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--python-env", type=Path, default=ROOT / ".venv-triton")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="N: measure in-flight batching as served instead (N slots against one)",
    )
    parser.add_argument("--steps", type=int, default=16, help="--concurrency: denoising steps per canvas")
    parser.add_argument("--rounds", type=int, default=1, help="--concurrency: bursts per instance (the median counts)")
    parser.add_argument(
        "--against",
        type=Path,
        help="--concurrency: a second Python environment (another checkout's .venv-triton) to serve the same bursts",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from canvasrt.exporter.export import export
    from canvasrt.model.random_checkpoint import write_random_checkpoint

    seeds = list(range(args.requests))
    prompt = [(7 * i + 3) % 200 + 10 for i in range(args.prompt_length)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as scratch:
        work = Path(scratch)
        for preset in args.presets:
            checkpoint = write_random_checkpoint(work / f"{preset}-ckpt", preset)
            artifacts = work / f"{preset}-onnx"
            export(checkpoint, artifacts, max_context=512, max_batch=max(4, args.concurrency))
            if args.concurrency:
                envs = {"this checkout": args.python_env, **({"against": args.against} if args.against else {})}
                served_inflight = inflight(artifacts, work, envs, prompt, args.concurrency, args.steps, args.rounds)
                rows.append({"preset": preset, **served_inflight.pop("this checkout"), **served_inflight})
                print(json.dumps(rows[-1]), flush=True)
            else:
                rows += latency_rows(preset, artifacts, work, args.python_env, prompt, seeds)
    if args.concurrency:
        print_inflight(rows, args.concurrency)
    else:
        print_latency(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
