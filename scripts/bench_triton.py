"""The Triton path's overhead against in-process generation, side by side in one run.

For each preset: a random checkpoint, its export, then the same requests (one prompt, seeds 0..N-1, one at a
time) through
  in-process   the loop on ONNX Runtime in this process (what `canvasrt generate` runs),
  triton       a tritonserver serving `canvasrt triton --step-backend in-process`, over gRPC streaming,
  triton-bls   the same with the steps in separate step models (`--step-backend python`), called over BLS.
Every path uses one ONNX Runtime thread and must return the same ids; the table gives mean milliseconds per request
and the ratio to in-process.

    .venv/bin/python scripts/bench_triton.py --presets tiny small --requests 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
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


def served(artifacts: Path, step_backend: str, work: Path, env: Path, prompt: list[int], seeds: list[int]) -> tuple[list[float], list[list[int]]]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--python-env", type=Path, default=ROOT / ".venv-triton")
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
            export(checkpoint, artifacts, max_context=512)
            results = {"in-process": in_process(artifacts, prompt, seeds)}
            for mode, step_backend in (("triton", "in-process"), ("triton-bls", "python")):
                results[mode] = served(artifacts, step_backend, work, args.python_env, prompt, seeds)
            reference = results["in-process"]
            for mode, (times, ids) in results.items():
                if ids != reference[1]:
                    raise SystemExit(f"{preset}: {mode} returned other ids than in-process")
                mean = statistics.mean(times) * 1e3
                rows.append({"preset": preset, "path": mode, "requests": len(times), "mean_ms": round(mean, 2),
                             "ratio": round(mean / (statistics.mean(reference[0]) * 1e3), 3)})
    print("| preset | path | requests | mean ms / request | vs in-process |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['preset']} | {row['path']} | {row['requests']} | {row['mean_ms']:.1f} | {row['ratio']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
