"""`canvasrt triton` (write a model repository) and `canvasrt serve` (run tritonserver on it)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..core.errors import CanvasrtError
from ..serving.repository import STEP_BACKENDS
from .options import INT, terminate

if TYPE_CHECKING:
    from ..serving.openai_api import OpenAIServer
    from ..serving.server import TritonServer


@click.command("triton")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="model repository to write")
@click.option(
    "--step-backend",
    type=click.Choice(STEP_BACKENDS),
    default=None,
    help="where the steps run: in-process (the default: the loop model runs TARGET's executor, ONNX Runtime for "
    "artifacts, TensorRT for engines, torch for a checkpoint, with the state on its device), or tensorrt / "
    "onnxruntime / python step models called through BLS (the state then crosses with every call)",
)
@click.option(
    "--provider",
    default="cpu",
    show_default=True,
    help="ONNX Runtime provider of the in-process loop on artifacts: cpu, cuda, tensorrt-ep",
)
@click.option("--instances", type=INT, default=1, show_default=True, help="instances of each model")
@click.option("--max-batch", type=INT, default=None, help="step models' max batch (default: the artifacts' capacity)")
@click.option(
    "--threads",
    type=INT,
    default=0,
    show_default=True,
    help="ONNX Runtime threads per in-process instance (0: ONNX Runtime's default)",
)
@click.option(
    "--slots",
    type=INT,
    default=None,
    help="requests one loop instance batches in its step calls (default: the max batch; 1: one at a time)",
)
@click.option(
    "--max-queue",
    type=INT,
    default=64,
    show_default=True,
    help="requests that may wait for a slot per instance; more are refused with an error",
)
@click.option(
    "--batch-window-ms",
    type=INT,
    default=0,
    show_default=True,
    help="how long an idle loop instance holds its first step for more requests to join it (a burst of "
    "requests then shares every step call; costs the first request up to this much latency)",
)
def triton_command(
    target: Path,
    output: Path,
    step_backend: str | None,
    provider: str,
    instances: int,
    max_batch: int | None,
    threads: int,
    slots: int | None,
    max_queue: int,
    batch_window_ms: int,
) -> None:
    """Write a Triton model repository for TARGET (an artifact, engine or checkpoint directory)."""
    from ..serving.repository import write_repository

    summary = write_repository(
        target, output, step_backend, instances, max_batch, threads, slots, max_queue, batch_window_ms, provider
    )
    click.echo(
        f"wrote {output}: {', '.join(summary['models'])} (steps: {summary['step_backend']}, {summary['executor']}, "
        f"instances {instances}, {summary['slots']} slot(s) each); serve it with `canvasrt serve {output}`"
    )


@click.command("serve")
@click.argument("repository", type=click.Path(path_type=Path))
@click.option("--http-port", type=INT, default=8000, show_default=True)
@click.option("--grpc-port", type=INT, default=8001, show_default=True)
@click.option(
    "--python-env",
    type=click.Path(path_type=Path),
    default=None,
    envvar="CANVASRT_TRITON_ENV",
    help="virtual environment the Python-backend models import from (needs canvasrt, numpy<2, "
    "onnxruntime); default: $CANVASRT_TRITON_ENV, else this Python's",
)
@click.option("--metrics-port", type=INT, default=8002, show_default=True, help="Triton's Prometheus metrics")
@click.option("--log", type=click.Path(path_type=Path), default=None, help="write the server log here")
@click.option(
    "--openai-port",
    type=INT,
    default=None,
    help="also serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models) on this port, "
    "forwarding to the loop model over gRPC",
)
@click.option("--openai-host", default="127.0.0.1", show_default=True, help="address the OpenAI API binds")
def serve_command(
    repository: Path,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    python_env: Path | None,
    log: Path | None,
    openai_port: int | None,
    openai_host: str,
) -> None:
    """Run tritonserver on REPOSITORY, bound to 127.0.0.1, until Ctrl-C."""
    from ..serving.server import TritonServer, check_port_free, check_port_options

    if openai_port is not None:
        check_port_options(
            {
                "--http-port": http_port,
                "--grpc-port": grpc_port,
                "--metrics-port": metrics_port,
                "--openai-port": openai_port,
            }
        )
        check_port_free("--openai-port", openai_port, openai_host)
    server = TritonServer(
        repository, python_env, http_port=http_port, grpc_port=grpc_port, log=log, metrics_port=metrics_port
    )
    # A service manager's SIGTERM drains the server like Ctrl-C does; SIGINT is set too because a shell starts
    # background jobs with it ignored, and Python then never raises KeyboardInterrupt. Either exits as every command
    # does on it (130, 143), after the server has stopped.
    handlers = {signal.SIGTERM: terminate, signal.SIGINT: _interrupt}
    previous = {number: signal.signal(number, handler) for number, handler in handlers.items()}
    try:
        _serve(server, repository, openai_host, openai_port)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _serve(server: TritonServer, repository: Path, openai_host: str, openai_port: int | None) -> None:
    start = time.perf_counter()
    front: OpenAIServer | None = None
    try:
        server.start()
        if openai_port is not None:
            from ..serving.openai_api import FrontEnd, OpenAIServer
            from ..serving.repository import GENERATE_MODEL

            tokenizer = server.repository / GENERATE_MODEL / "1" / "artifacts"
            front = OpenAIServer(FrontEnd(server.grpc_url, tokenizer), openai_host, openai_port)
            front.start()
        click.echo(
            f"serving {repository} in {time.perf_counter() - start:.1f}s: HTTP {server.http_url}, gRPC "
            f"{server.grpc_url}" + (f", OpenAI API {front.url}" if front else "") + " (Ctrl-C stops)",
            err=True,
        )
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:  # also while starting: the server runs in its own session and would be orphaned
        try:
            if front is not None:  # no new requests; its streams' Triton requests are cancelled as it closes them
                front.stop()
            code = server.stop()
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for in-flight requests
            server.kill()
            click.echo("killed tritonserver", err=True)
            raise
        click.echo(f"stopped tritonserver (exit code {code})", err=True)
        raise
    except CanvasrtError:  # the OpenAI API could not start: stop the server it was to stand in front of
        server.stop()
        raise
    if front is not None:
        front.stop()
    message = server.failure()
    server.stop()
    click.echo(f"tritonserver exited on its own: {message}", err=True)
    raise SystemExit(1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
