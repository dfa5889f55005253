"""Requests that their clients abandon, many at once, against `canvasrt serve --openai-port` on the tiny preset (one
loop instance of 8 slots) while busy loops load the machine: a check that cancelled requests leave tritonserver
running and serving, not a benchmark.

Each request (the official `openai` SDK, /v1/completions or /v1/chat/completions, streaming or whole) ends one of
these ways, drawn at random:
  early       the client gives up before the response's headers (before the first chunk), after 0-300 ms
  mid         the client closes the stream after 1 to n-1 chunks
  near-end    the client reads n-1 chunks, then closes after 0-60 ms: the disconnect meets the final response
  after       the client closes the stream right after the chunk with the finish_reason, before `[DONE]`
  whole       the client reads the stream to its end (its text is checked to be there)
  timeout     a whole (non-streaming) request whose client gives up after 0-400 ms
  race        a one-canvas streaming request (its first chunk is its final one) whose client gives up after 0.7 to
              1.2 times the recent median time to that chunk: the disconnect meets the final response of the first
              request on a new gRPC stream (every cancelled request ends its stream); drawn three times as often
  grpc-early  not the OpenAI API: a streamed request on a gRPC stream of its own (ModelStreamInfer, as the front
              end sends it), the stream cancelled 0 to 0.7 times the recent median time to a first response after it
              was written: mostly before the first response
  grpc-mid    the same, the stream cancelled after 1 to n-1 of its n responses (n of 2 to 4); a request that EOS
              ends sooner has its stream read to the end instead
  grpc-final  (only where --modes names it) the same with one canvas, the stream cancelled 0.7 to 1.2 times the
              recent median time to its only (final) response after it was written: the cancellation meets the final
              response. Where it comes after that response, Triton 2.51 holds the finished request and waits out its
              30 s exit timeout on SIGINT, which this mode reproduces (a client must not cancel a stream after its
              final response; the OpenAI front end can only where its client leaves just as that response comes)
  grpc-error  (only where --modes names it) not the OpenAI API: a request the model refuses, on a gRPC stream
              opened with the `triton_grpc_error: true` header, which ends the stream with the refusal as its status
CONCURRENCY clients each send their next request once the last one ended, while `canvasrt serve` runs (it exits
when tritonserver dies). At the end one request must be served whole, the loop model's slots and queue must be
empty (its canvasrt_rows and canvasrt_queued_requests metrics, once settled), and `canvasrt serve` must exit within
--stop-within seconds of its SIGINT (Triton 2.51 holding a request it thinks unfinished waits out its 30 s exit
timeout instead); the report counts the outcomes, the server log's "HandleCancellation called even when the context
was not cancelled" lines and any crash. `--rounds K` repeats the whole (a server started, driven and stopped) K
times.

That log line is Triton 2.51's fingerprint of a `triton_grpc_error` stream ending with an error (its context's
IsCancelled() reports the stream's error once, and HandleCancellation asks again), never of a client that cancels:
one line per grpc-error request, none in the other modes. Under load (`--load 4`) tritonserver 2.51 dies with signal
11 after a few hundred grpc-error requests, one stream at a time too (`--concurrency 1`); at --log-verbose 1 the log
before the crash fits a state of the stream released twice (the stream's completion queues all its states for
release, the one still waiting on the next read included, and that read's end releases it once more). The OpenAI
front end sends no such header; its cancellations (every other mode) have not crashed the server here.

    nice -n 10 .venv/bin/python scripts/stress_cancel.py --attempts 4000 --concurrency 16 --load 4
    nice -n 10 .venv/bin/python scripts/stress_cancel.py --attempts 4000 --concurrency 1 --load 4 --modes grpc-error
    nice -n 10 .venv/bin/python scripts/stress_cancel.py --rounds 3 --attempts 400 --modes ALL --load 2
    nice -n 10 .venv/bin/python scripts/stress_cancel.py --attempts 40 --concurrency 1 --load 0 --modes grpc-final

`--load N` starts N busy loops for the run (0: none), at the script's own niceness, so that they compete with the
server (its child) on equal terms and other work on the machine keeps its priority; `--work DIR` keeps the
checkpoint, export and repository there, reused by later runs; `--modes ALL` draws the OpenAI modes and grpc-early
and grpc-mid, about as often. Exit status 1 when tritonserver died, the last request was not served,
a slot stayed taken or a stop took longer than --stop-within.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai

from canvasrt.serving.server import free_ports

ROOT = Path(__file__).resolve().parents[1]
CANVASRT = str(ROOT / ".venv" / "bin" / "canvasrt")
MODES = ("early", "mid", "near-end", "after", "whole", "timeout", "race", "race", "race")
GRPC_MODES = ("grpc-early", "grpc-mid", "grpc-final")
STUCK_S = 60.0  # a gRPC request with no response for this long is counted as stuck (and cancelled)
INTERNAL = "HandleCancellation called even when the context was not cancelled"


def prepare(work: Path) -> Path:
    """The tiny preset's model repository in `work` (made once)."""
    repo = work / "repo"
    if (repo / "canvasrt_generate").is_dir():
        return repo
    for command in (
        ["random-checkpoint", work / "ckpt", "--preset", "tiny"],
        ["export", work / "ckpt", "-o", work / "art", "--max-batch", "8", "--max-context", "256"],
        ["triton", work / "art", "-o", repo, "--step-backend", "in-process", "--threads", "1", "--slots", "8"],
    ):
        subprocess.run([CANVASRT, *map(str, command)], check=True, stdout=subprocess.DEVNULL)
    return repo


def start_server(repo: Path, log: Path) -> tuple[subprocess.Popen, str, str, str, str]:
    """`canvasrt serve` with the OpenAI API; its process, the API's URL, Triton's HTTP URL, its gRPC address and its
    metrics URL."""
    http, grpc, metrics, api = free_ports(4)
    command = [CANVASRT, "serve", str(repo), "--python-env", str(ROOT / ".venv-triton"), "--log", str(log)]
    command += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    command += ["--openai-port", str(api)]
    with open(log.with_suffix(".serve"), "w") as stderr:
        process = subprocess.Popen(command, stderr=stderr, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while "serving" not in log.with_suffix(".serve").read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"canvasrt serve did not start:\n{log.with_suffix('.serve').read_text()}")
        time.sleep(0.5)
    return (
        process,
        f"http://127.0.0.1:{api}/v1",
        f"http://127.0.0.1:{http}",
        f"127.0.0.1:{grpc}",
        f"http://127.0.0.1:{metrics}/metrics",
    )


class Timing:
    """The recent times from sending a one-canvas streaming request to its only chunk (which is its final one)."""

    def __init__(self) -> None:
        self.recent: collections.deque[float] = collections.deque([0.2], maxlen=32)

    def final(self) -> float:
        return sorted(self.recent)[len(self.recent) // 2]


async def one(client: openai.AsyncOpenAI, rng: random.Random, mode: str, timing: Timing) -> str:
    """One request ended the way `mode` says; its outcome as a word."""
    chat = rng.random() < 0.5
    tokens = 16 if mode == "race" else rng.choice((16, 32, 48, 64))
    chunks = -(-tokens // 16)  # one per committed canvas of 16 tokens, unless EOS ends it sooner
    prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(4, 40)))
    kwargs = dict(model="canvasrt_generate", max_tokens=tokens, seed=rng.randrange(1000))
    if chat:
        create, kwargs["messages"] = client.chat.completions.create, [{"role": "user", "content": prompt}]
    else:
        create, kwargs["prompt"] = client.completions.create, prompt
    if mode == "timeout":
        try:
            await asyncio.wait_for(create(**kwargs), rng.uniform(0, 0.4))
            return "served"
        except TimeoutError:
            return "abandoned"
    sent = time.monotonic()
    opened = asyncio.ensure_future(create(stream=True, **kwargs))
    if mode in ("early", "race"):
        wait = rng.uniform(0.7, 1.2) * timing.final() if mode == "race" else rng.uniform(0, 0.3)
        try:
            stream = await asyncio.wait_for(opened, wait)
        except TimeoutError:
            return "abandoned"
        await asyncio.wait_for(stream.close(), 30)
        return "closed"
    stream = await opened
    if tokens == 16:
        timing.recent.append(time.monotonic() - sent)
    read, stop, finished = 0, None, False
    if mode == "mid":
        stop = rng.randint(1, max(1, chunks - 1))
    elif mode == "near-end":
        stop = max(1, chunks - 1)
    try:
        async for chunk in stream:
            finished = bool(chunk.choices and chunk.choices[0].finish_reason)
            read += 1 if chunk.choices else 0
            if mode == "after" and finished:
                break
            if stop is not None and read >= stop:
                if mode == "near-end":
                    await asyncio.sleep(rng.uniform(0, 0.06))
                break
    finally:
        await asyncio.wait_for(stream.close(), 30)
    if mode == "whole":
        return "served" if finished else "unfinished"
    return "closed"


async def cancelled_on_grpc(stub: Any, rng: random.Random, mode: str, timing: Timing) -> str:
    """One streamed request (LLM conventions) on a gRPC stream of its own, written as the OpenAI front end writes it,
    the stream cancelled where `mode` says; its outcome as a word, which for grpc-final says whether the final
    response had reached the client when it cancelled."""
    import grpc
    import numpy as np
    from tritonclient.grpc import InferResult

    from canvasrt.serving.openai_api import _infer_request
    from canvasrt.serving.protocol import input_tensor

    tokens = {"grpc-final": 16, "grpc-mid": rng.choice((32, 48, 64))}.get(mode, rng.choice((16, 32, 48, 64)))
    prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(4, 40)))
    inputs = {
        "text_input": np.array([prompt.encode()], dtype=np.object_),
        "max_tokens": input_tensor("max_tokens", tokens, "INT32"),
        "seed": input_tensor("seed", rng.randrange(1000), "INT64"),
        "stream": np.array([True]),
        "exclude_input_in_output": np.array([True]),
    }
    call = stub.ModelStreamInfer()
    stage = "writing the request"
    try:
        async with asyncio.timeout(STUCK_S):
            await call.write(_infer_request("canvasrt_generate", inputs))
            sent = time.monotonic()
            if mode == "grpc-early":
                await asyncio.sleep(rng.uniform(0, 0.7) * timing.final())
                return "cancelled"
            if mode == "grpc-final":
                read = asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({read}, timeout=rng.uniform(0.7, 1.2) * timing.final())
                if not done:
                    read.cancel()
                    return "cancelled before the final response"
                timing.recent.append(time.monotonic() - sent)
                return "cancelled after the final response"
            for index in range(rng.randint(1, -(-tokens // 16) - 1)):
                stage = f"waiting for response {index + 1} of {-(-tokens // 16)}"
                response = await call.read()
                if response is grpc.aio.EOF or response.error_message:
                    return "refused"
                if index == 0:
                    timing.recent.append(time.monotonic() - sent)
                if InferResult(response.infer_response).as_numpy("finish_reason")[0]:  # EOS: a final response
                    stage = "reading the stream to its end after an early final response"
                    await call.done_writing()  # a stream is read to its end after its final response, not cancelled
                    while await call.read() is not grpc.aio.EOF:
                        pass
                    return "finished before its cancel point"
            return "cancelled"
    except TimeoutError:
        return f"stuck {STUCK_S:.0f} s {stage}"
    finally:
        if not call.done():
            call.cancel()


async def refused_on_strict_stream(grpc: str) -> str:
    """A request the loop model refuses (an empty prompt) on a gRPC stream opened with `triton_grpc_error: true`,
    which turns the refusal into the stream's status: Triton 2.51 then logs its "HandleCancellation called even when
    the context was not cancelled" for the stream (no client cancels anything there)."""
    import grpc as grpcio
    import numpy as np
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(grpc)
    tensor = grpcclient.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b""], dtype=np.object_))

    async def requests() -> Any:
        yield {"model_name": "canvasrt_generate", "inputs": [tensor]}

    try:
        async for _ in client.stream_infer(requests(), headers={"triton_grpc_error": "true"}):
            pass
        return "no status"
    except grpcio.aio.AioRpcError as exc:
        return exc.code().name
    finally:
        await client.close()


async def drive(
    url: str, grpc: str, modes: tuple[str, ...], attempts: int, concurrency: int, seed: int, server: subprocess.Popen
) -> collections.Counter:
    """`attempts` requests by `concurrency` clients, each sending its next request once its last one ended."""
    import grpc as grpcio
    from tritonclient.grpc import service_pb2_grpc

    rng = random.Random(seed)
    outcomes: collections.Counter = collections.Counter()
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    channel = grpcio.aio.insecure_channel(grpc)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    timing = Timing()
    started = 0

    async def worker() -> None:
        nonlocal started
        while started < attempts and server.poll() is None:
            started += 1
            if started % 500 == 0:
                print(f"{started} requests", file=sys.stderr, flush=True)
            mode = rng.choice(modes)
            try:
                if mode == "grpc-error":
                    word = await refused_on_strict_stream(grpc)
                elif mode in GRPC_MODES:
                    word = await asyncio.wait_for(
                        cancelled_on_grpc(stub, random.Random(rng.random()), mode, timing), 120
                    )
                else:
                    word = await one(client, random.Random(rng.random()), mode, timing)
            except Exception as exc:
                word = type(exc).__name__
            outcomes[f"{mode}: {word}"] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    outcomes["attempts"] = started
    if server.poll() is None:  # the server still serves: one request read whole
        outcomes["last request"] = await one(client, rng, "whole", timing) == "served"
    await client.close()
    await channel.close()
    return outcomes


def occupied(metrics: str) -> dict[str, float]:
    """The loop model's canvasrt_rows and canvasrt_queued_requests once they have stopped changing (the model hands
    its metrics to Triton every 100 ms while busy)."""
    last: dict[str, float] | None = None
    for _ in range(50):
        with urllib.request.urlopen(metrics, timeout=10) as page:
            lines = page.read().decode().splitlines()
        values = {
            line.split()[0]: float(line.split()[1])
            for line in lines
            if line.startswith(("canvasrt_rows", "canvasrt_queued_requests"))
        }
        if values == last:
            break
        last = values
        time.sleep(0.3)
    return values


def one_round(repo: Path, work: Path, args: argparse.Namespace, modes: tuple[str, ...], seed: int) -> tuple[bool, str]:
    """One server started, driven, checked and stopped; whether all went well, and the report's lines."""
    log = work / f"triton-{os.getpid()}-{seed}.log"
    loops = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(args.load)]
    server, url, http, grpc, metrics = start_server(repo, log)
    if args.log_verbose:
        body = json.dumps({"log_verbose_level": args.log_verbose}).encode()
        urllib.request.urlopen(urllib.request.Request(f"{http}/v2/logging", body, method="POST"), timeout=30).read()
    start = time.monotonic()
    left: dict[str, float] = {}
    stop_s = None
    try:
        outcomes = asyncio.run(drive(url, grpc, modes, args.attempts, args.concurrency, seed, server))
        elapsed = time.monotonic() - start
        if server.poll() is None:
            left = occupied(metrics)
    finally:
        for loop in loops:
            loop.kill()
        alive = server.poll() is None
        if alive:
            stopping = time.monotonic()
            server.send_signal(signal.SIGINT)
            try:
                server.wait(max(60, 2 * args.stop_within))
                stop_s = time.monotonic() - stopping
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    text = log.read_text(errors="replace")
    serve = log.with_suffix(".serve").read_text(errors="replace")
    freed = bool(left) and not any(left.values())
    prompt = stop_s is not None and stop_s <= args.stop_within
    lines = [
        f"{outcomes['attempts']} requests, concurrency {args.concurrency}, load {args.load}, seed {seed}, "
        f"{elapsed:.0f} s; log {log}"
    ]
    lines += [f"  {key}: {outcomes[key]}" for key in sorted(k for k in outcomes if ":" in k)]
    lines.append(f"  '{INTERNAL}' lines: {text.count(INTERNAL)}")
    lines.append(
        f"  tritonserver crashed: {'Signal (11)' in text or not alive}; served the last request: "
        f"{outcomes.get('last request', False)}; slots and queue after it: {left or 'unread'}; "
        f"stopped (SIGINT) in: {'more than a minute' if stop_s is None else f'{stop_s:.1f} s'}"
    )
    if not alive or not prompt:
        lines.append(serve[-2000:])
    return alive and bool(outcomes.get("last request")) and freed and prompt, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=1000, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--load", type=int, default=3, help="busy loops during the run")
    parser.add_argument("--seed", type=int, default=0, help="the first round's; each further round adds one")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=1, help="servers started, driven and stopped, one after another")
    parser.add_argument(
        "--stop-within", type=float, default=20.0, help="seconds `canvasrt serve` may take to exit on SIGINT"
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help="the ways a request ends, comma-separated, drawn uniformly (a mode named twice is drawn twice as often); "
        "ALL: the OpenAI modes, grpc-early and grpc-mid",
    )
    parser.add_argument(
        "--log-verbose",
        type=int,
        default=0,
        help="Triton's log verbosity for the run (set through its /v2/logging): at 1 its gRPC front end logs between "
        "taking a cancellation from its queue and handling it, which widens the window a response can race into",
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="stress-cancel-"))
    work.mkdir(parents=True, exist_ok=True)
    repo = prepare(work)
    modes = MODES + ("grpc-early", "grpc-mid") * 4 if args.modes == "ALL" else tuple(args.modes.split(","))
    passed = True
    for round_ in range(args.rounds):
        ok, report = one_round(repo, work, args, modes, args.seed + round_)
        print(report, flush=True)
        passed = passed and ok
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
