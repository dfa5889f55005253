"""The OpenAI front end's own cost, two code versions side by side in one run: each version serves the same model
repository (`canvasrt serve --openai-port`, both servers up at once), and rounds alternate between them, swapping
the order every round, so that both see the same machine load.

    python scripts/bench_front_end.py REPO --before "env PYTHONPATH=../base/src .venv/bin/python -m canvasrt" \
        --after .venv/bin/canvasrt --rounds 5 --requests 100

A round sends, to each server, REQUESTS streamed requests one after another on each of three paths, taking turns
request by request, the same requests (prompt, max_tokens, seed) on each:
  openai        the OpenAI API's /v1/completions (the front end, gRPC streaming to Triton)
  relay         Triton's generate_stream on the served HTTP port (the relay that bounds bodies, then tritonserver)
  tritonserver  Triton's generate_stream on tritonserver's own HTTP port, behind the relay (Triton alone)
Per version and path it reports, as medians over the rounds: the CPU time per request of the serve process (the
front end, or the relay: the time its threads ran) and of tritonserver, the time to the first event and the time
between events. The openai path against the other two, in the same round on the same server, is what the OpenAI
layer adds; the two versions' front-end CPU, its ratio. One request at a time: concurrency is aiperf's part
(scripts/bench_serving.sh).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from canvasrt.serving.repository import GENERATE_MODEL
from canvasrt.serving.server import free_ports

PATHS = ("openai", "relay", "tritonserver")
PROMPT = "the quick brown fox jumps over the lazy dog " * 3


class Served:
    """One version's `canvasrt serve` of the repository, with the ports it listens on."""

    def __init__(self, command: list[str], repository: Path, python_env: Path, log: Path):
        self.http, grpc, metrics, self.openai = free_ports(4)
        arguments = ["serve", str(repository), "--python-env", str(python_env), "--http-port", str(self.http)]
        arguments += ["--grpc-port", str(grpc), "--metrics-port", str(metrics), "--openai-port", str(self.openai)]
        self.log = log
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen([*command, *arguments], stderr=stderr, stdout=subprocess.DEVNULL)
        while "serving" not in log.read_text():
            if self.process.poll() is not None:
                raise SystemExit(f"{shlex.join(command)} serve failed:\n{log.read_text()}")
            time.sleep(0.3)
        children = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        self.triton = next(int(p) for p in children.split() if "tritonserver" in _command_line(int(p)))
        options = _command_line(self.triton).split()
        self.upstream = int(options[options.index("--http-port") + 1])  # tritonserver's own, behind the relay

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=120)


def _command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _cpu_seconds(pid: int) -> float:
    """Time a process's threads have run so far (the first field of /proc/PID/task/*/schedstat, in ns: finer than
    /proc/PID/stat's clock ticks, which a few milliseconds per request would need thousands of requests to resolve)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError):  # a thread that ended meanwhile
            continue
    return total / 1e9


def _stream(port: int, path: str, body: dict[str, Any]) -> tuple[float, list[float]]:
    """Seconds to the first server-sent event, and between events, of one streamed request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise SystemExit(f"{path} answered {response.status}: {response.read()[:300]!r}")
    arrivals = []
    while line := response.readline():
        if line.startswith(b"data:") and b"[DONE]" not in line:
            arrivals.append(time.perf_counter())
    connection.close()
    return arrivals[0] - start, [b - a for a, b in zip(arrivals, arrivals[1:])]


def _request(served: Served, path: str, seed: int, max_tokens: int) -> tuple[float, list[float]]:
    """One streamed request on one path: seconds to its first event, and between its events."""
    if path == "openai":
        body = {"model": GENERATE_MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True, "seed": seed}
        return _stream(served.openai, "/v1/completions", body)
    body = {"text_input": PROMPT, "max_tokens": max_tokens, "stream": True, "seed": seed}
    port = served.http if path == "relay" else served.upstream
    return _stream(port, f"/v2/models/{GENERATE_MODEL}/generate_stream", body)


def _round(served: Served, requests: int, max_tokens: int) -> dict[str, dict[str, float]]:
    """`requests` streamed requests one after another on every path, the paths taking turns request by request
    (so that a change of the machine's load falls on all of them): per path, CPU per request and the medians of
    the first event and of the gaps (ms)."""
    cpu = {path: {"serve": 0.0, "triton": 0.0} for path in PATHS}
    first: dict[str, list[float]] = {path: [] for path in PATHS}
    gaps: dict[str, list[float]] = {path: [] for path in PATHS}
    for seed in range(requests):
        for path in PATHS[seed % len(PATHS) :] + PATHS[: seed % len(PATHS)]:
            serve, triton = _cpu_seconds(served.process.pid), _cpu_seconds(served.triton)
            ttft, between = _request(served, path, seed, max_tokens)
            cpu[path]["serve"] += _cpu_seconds(served.process.pid) - serve
            cpu[path]["triton"] += _cpu_seconds(served.triton) - triton
            first[path].append(ttft)
            gaps[path] += between
    return {
        path: {
            "serve_cpu_ms": cpu[path]["serve"] / requests * 1e3,
            "triton_cpu_ms": cpu[path]["triton"] / requests * 1e3,
            "first_event_ms": statistics.median(first[path]) * 1e3,
            "between_events_ms": statistics.median(gaps[path]) * 1e3 if gaps[path] else float("nan"),
        }
        for path in PATHS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path, help="a model repository of `canvasrt triton`")
    parser.add_argument("--before", required=True, help="the `canvasrt` command of the first version")
    parser.add_argument("--after", required=True, help="... of the second")
    parser.add_argument("--python-env", type=Path, default=Path(".venv-triton"), help="the models' environment")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100, help="requests per path, version and round")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    versions = {"before": shlex.split(args.before), "after": shlex.split(args.after)}
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in versions}
    with tempfile.TemporaryDirectory() as scratch:
        servers = {
            name: Served(command, args.repository, args.python_env, Path(scratch) / f"{name}.log")
            for name, command in versions.items()
        }
        try:
            for served in servers.values():  # warm-up: the first requests load what a server reads lazily
                _round(served, 5, args.max_tokens)
            for index in range(args.rounds):
                order = list(servers) if index % 2 == 0 else list(servers)[::-1]
                for name in order:
                    cells = _round(servers[name], args.requests, args.max_tokens)
                    rounds[name].append(cells)
                    print(f"round {index + 1} {name}: " + json.dumps(cells), flush=True)
        finally:
            for served in servers.values():
                served.stop()

    summary: dict[str, Any] = {}
    for name, cells in rounds.items():
        medians = {
            path: {key: statistics.median(c[path][key] for c in cells) for key in cells[0][path]} for path in PATHS
        }
        for other in ("relay", "tritonserver"):
            medians[f"openai_over_{other}"] = {
                key: statistics.median(c["openai"][key] - c[other][key] for c in cells)
                for key in ("first_event_ms", "between_events_ms")
            }
        summary[name] = medians
    summary["front_end_cpu_after_over_before"] = (
        summary["after"]["openai"]["serve_cpu_ms"] / summary["before"]["openai"]["serve_cpu_ms"]
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
