"""`canvasrt_generate`: the Triton Python-backend model that runs the refinement loop (decoupled, streaming).

The model repository holds a few-line `model.py` that imports this class, so the logic lives here, in one place.
Parameters come from config.pbtxt (`canvasrt triton` writes them): `step_backend` is `in-process` (the executor
`executor` inside this model: onnxruntime with `provider`, tensorrt, or torch; the state on its device) or `bls`
(the step models, called through BLS); `threads` bounds the executor's threads per instance; `slots` is how many
requests one instance batches (in-flight batching, `canvasrt.runtime.scheduler`; 1 serves them one at a time),
`max_queue` how many more may wait, and `batch_window_ms` how long an idle instance holds its first step for more
requests to join it (like the dynamic batcher's queue delay: a burst that arrives over a
few milliseconds then shares every step call instead of joining a step or a few late).

`execute()` only parses requests and hands them to the instance's scheduler; one thread per instance runs the
scheduler's iterations and builds each row's responses as they happen, and a second one sends them (`_Outbox`), so
that the step calls do not wait on the sends. Errors that concern the request (no prompt, too many tokens, a full
queue, a passed deadline) go back as a Triton error response and leave the model serving (INVALID_ARG, HTTP 400, for
what the request asked; UNAVAILABLE for a full queue; other errors' messages start with `protocol.INTERNAL_ERROR`,
since Triton's gRPC stream carries the message alone unless its client sends the `triton_grpc_error: true` header,
which turns the code into the stream's status); a request its client cancelled leaves within CANCEL_POLL_S.
Custom metrics on Triton's metrics endpoint: step calls, the row-steps they carried, step calls by rows in them (the
batch occupancy), the rows and queue now, and the bytes crossing between host memory and the executor's device by
kind of call (prefill, commit, denoise).
Only the torch and TensorRT executors import PyTorch.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import CanvasrtError
from ..core.manifest import ArtifactManifest, EngineManifest
from ..runtime.images import ImageProcessor, PromptImages, expand_ids, soft_tokens
from ..runtime.prompts import TextCodec
from ..runtime.scheduler import Event, QueueFull, RowRequest, Scheduler, Ticket
from ..runtime.step import CALLS, StepBackend
from .protocol import INTERNAL_ERROR, GenerationRequest, ResponseStream, parse_request

ARTIFACTS = "artifacts"  # the model version directory's copy of the artifacts (graphs only for in-process)
ENGINES = "engines"  # ... of the engines, served in process by TensorRT
CHECKPOINT = "checkpoint"  # ... of the checkpoint, served in process by the torch executor
DEFAULT_QUEUE = 64
CANCEL_POLL_S = 0.05  # how often a row asks Triton whether its client cancelled
METRICS_S = 0.1  # how often a busy instance hands its metrics to Triton
CANCELLED = "the client cancelled the request"


def _parameters(request: Any) -> dict[str, Any]:
    """The request's parameters (a JSON object in the Python backend): the HTTP generate endpoint's `parameters` and
    its fields that name no input."""
    raw = request.parameters()
    parameters = json.loads(raw) if raw else {}
    if not isinstance(parameters, dict):
        raise CanvasrtError("the request's parameters are not a JSON object")
    return parameters


class _Outbox:
    """The instance's responses, sent in the order they are posted by a thread of its own.

    A Python-backend response send is an inter-process round trip to tritonserver (about 0.2 ms on a lightly loaded
    2-core machine, 1.1 ms on a saturated one) during which the backend releases the GIL. Sent from the thread that
    runs the scheduler, the sends of the rows a step commits would hold the next step call back by that much each;
    posted here, they go out while the next step runs. One thread draining one FIFO queue sends each request's
    responses in the order they were posted, its final one last. The queue holds a few steps' responses at most: a
    scheduler that runs ahead of its clients by more waits for the sends."""

    def __init__(self, pb_utils: Any, depth: int):
        self.pb_utils = pb_utils
        self.queue: queue.Queue[tuple[Any, Any, bool] | None] = queue.Queue(depth)
        self.thread = threading.Thread(target=self._send_all, name="canvasrt-sender", daemon=True)
        self.thread.start()

    def post(self, sender: Any, reply: Any, final: bool) -> None:
        """Queues a response for the request of `sender`: its output tensors by name, or a `TritonError`."""
        self.queue.put((sender, reply, final))

    def close(self) -> None:
        """Sends what was posted, then ends the thread."""
        self.queue.put(None)
        self.thread.join()

    def _send_all(self) -> None:
        pb_utils = self.pb_utils
        while (item := self.queue.get()) is not None:
            sender, reply, final = item
            try:
                if isinstance(reply, pb_utils.TritonError):
                    response = pb_utils.InferenceResponse(error=reply)
                else:
                    tensors = [pb_utils.Tensor(name, array) for name, array in reply.items()]
                    response = pb_utils.InferenceResponse(tensors)
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)
            except Exception as exc:  # a response Triton refuses is lost alone; the thread sends the next ones
                pb_utils.Logger.log_error(f"canvasrt_generate: a response could not be sent: {exc}")


class _Relay:
    """One request's responses, built on the scheduler's thread and posted to the instance's outbox."""

    def __init__(self, model: TritonPythonModel, sender: Any, request: GenerationRequest):
        self.model, self.sender = model, sender
        self.stream = ResponseStream(request, model.codec, model.backend.spec.capacity.canvas)
        self.sent = 0
        self.closed = False
        self.ticket: Ticket | None = None

    def on_event(self, event: Event) -> None:
        if self.closed:
            return
        assert self.ticket is not None
        late = self.stream.deadline_error(event)
        if late is not None:
            self.fail(late)
            self.ticket.cancel()
            return
        for tensors, final in self.stream.responses(event):
            self.send(tensors, final)
        if self.closed and not self.ticket.finished:  # a stop string ended it: the row leaves at the next step
            self.ticket.cancel()

    def send(self, tensors: dict[str, Any], final: bool) -> None:
        self.model.outbox.post(self.sender, tensors, final)
        self.sent += 1
        self.closed = final

    def fail(self, message: str, code: Any = None) -> None:
        if self.closed:
            return
        pb_utils = self.model.pb_utils
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        self.model.outbox.post(self.sender, error, final=True)
        self.closed = True

    def cancelled(self) -> None:
        """The client cancelled: an LLM request ends with finish_reason cancelled, others with a CANCELLED error."""
        if self.stream.request.llm:
            if not self.closed:
                self.send(self.stream.cancelled(), final=True)
        else:
            self.fail(CANCELLED, self.model.pb_utils.TritonError.CANCELLED)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb_utils = pb_utils
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version = Path(args["model_repository"]) / args["model_version"]
        self.backend = self._open_backend(version, parameters)
        self.backend.activate()  # until finalize(): the instance serves every request on this backend
        directory = version / (CHECKPOINT if (version / CHECKPOINT).is_dir() else ARTIFACTS)
        tokenizer = directory / "tokenizer.json"
        self.codec = TextCodec(directory, self.backend.spec.model.vocab_size) if tokenizer.is_file() else None
        self.image_directory = directory
        self.processor: ImageProcessor | None = None  # read on the first request with images
        self.generation = self.backend.spec.generation
        slots = int(parameters.get("slots", "0")) or self.backend.spec.capacity.max_batch
        self.scheduler = Scheduler(
            self.backend, int(parameters.get("max_queue", str(DEFAULT_QUEUE))), slots, on_step=self._count_step
        )
        self.batch_window_s = int(parameters.get("batch_window_ms", "0")) / 1000
        self.relays: dict[int, _Relay] = {}
        self.outbox = _Outbox(pb_utils, depth=4 * slots)
        self._metrics(slots)
        self.wake = threading.Condition()
        self.stopping = False
        self.worker = threading.Thread(target=self._serve, name="canvasrt-scheduler", daemon=True)
        self.worker.start()

    @staticmethod
    def _open_backend(directory: Path, parameters: dict[str, str]) -> StepBackend:
        """The executor named at `canvasrt triton` time, in process, or the step models over BLS."""
        threads = int(parameters.get("threads", "0")) or None
        if parameters.get("step_backend", "in-process") == "bls":
            from .bls import TritonStepExecutor

            # the graphs live in the step models; this copy of the artifacts is their manifest and tokenizer only
            return StepBackend(TritonStepExecutor(ArtifactManifest.load(directory / ARTIFACTS, require_graphs=False)))
        executor = parameters.get("executor", "onnxruntime")
        if executor == "tensorrt":
            from ..runtime.backends.tensorrt import TensorRTExecutor

            return StepBackend(TensorRTExecutor(EngineManifest.load(directory / ENGINES)))
        if executor == "torch":
            from ..runtime.backends.torch import TorchExecutor

            max_batch = int(parameters["max_batch"])
            return StepBackend(TorchExecutor(directory / CHECKPOINT, max_batch=max_batch, threads=threads))
        from ..runtime.backends.onnxruntime import OnnxRuntimeExecutor

        manifest = ArtifactManifest.load(directory / ARTIFACTS)
        return StepBackend(OnnxRuntimeExecutor(manifest, parameters.get("provider", "cpu"), threads))

    def _metrics(self, slots: int) -> None:
        family = self.pb_utils.MetricFamily
        counter, gauge = family.COUNTER, family.GAUGE
        self.metric_families = [
            family(name="canvasrt_step_calls_total", description="denoising step calls", kind=counter),
            family(
                name="canvasrt_row_steps_total",
                description="denoising steps summed over the rows of the calls",
                kind=counter,
            ),
            family(
                name="canvasrt_step_calls_by_rows_total",
                description="step calls by the rows they carried (batch occupancy)",
                kind=counter,
            ),
            family(name="canvasrt_rows", description="requests in the scheduler's slots", kind=gauge),
            family(name="canvasrt_queued_requests", description="requests waiting for a slot", kind=gauge),
            family(
                name="canvasrt_host_device_bytes_total",
                description="bytes between host memory and the executor's device, by kind of call",
                kind=counter,
            ),
        ]
        steps, row_steps, by_rows, rows, queued, crossing = self.metric_families
        self.metric_steps, self.metric_row_steps = steps.Metric(labels={}), row_steps.Metric(labels={})
        self.metric_by_rows = {n: by_rows.Metric(labels={"rows": str(n)}) for n in range(1, slots + 1)}
        self.metric_rows, self.metric_queued = rows.Metric(labels={}), queued.Metric(labels={})
        self.metric_crossing = {kind: crossing.Metric(labels={"call": kind}) for kind in CALLS}
        self.crossed = dict.fromkeys(CALLS, 0)  # what the crossing metric has counted so far
        self.pending_steps: Counter[int] = Counter()  # step calls by rows, not yet in the metrics
        self.recorded = 0.0

    def execute(self, requests: list[Any]) -> None:
        pb_utils = self.pb_utils
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
                parsed = parse_request(
                    inputs,
                    self.generation,
                    self.codec.encode if self.codec else None,
                    _parameters(request),
                    self.codec.decode if self.codec else None,
                    self.backend.spec.capacity.max_context,
                )
                ids, images = self._images(parsed.ids, inputs.get("images"))
                relay = _Relay(self, sender, parsed)
                relay.ticket = Ticket(
                    RowRequest(ids, parsed.seed, parsed.settings, images),
                    relay.on_event,
                    sender.is_cancelled,
                    CANCEL_POLL_S,
                )
                self.relays[id(relay.ticket)] = relay
                try:
                    self.scheduler.submit(relay.ticket)
                except CanvasrtError:
                    del self.relays[id(relay.ticket)]
                    raise
            except Exception as exc:  # every request gets its final response; the instance serves the next one
                if isinstance(exc, QueueFull):
                    error = pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE)
                elif isinstance(exc, CanvasrtError):  # what the request asked for: gRPC INVALID_ARGUMENT, HTTP 400
                    error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                else:
                    error = pb_utils.TritonError(f"{INTERNAL_ERROR}{type(exc).__name__}: {exc}")
                self.outbox.post(sender, error, final=True)
        with self.wake:
            self.wake.notify()

    def _images(self, ids: list[int], encoded: Any) -> tuple[list[int], PromptImages | None]:
        """The prompt with its images' markers expanded and their soft tokens (the executor's vision encoder, on
        this thread), or the prompt as it is without images."""
        files = [] if encoded is None else [bytes(item) for item in encoded.reshape(-1)]
        if not files:
            return ids, None
        vision = self.backend.executor.vision
        if vision is None:
            self.backend.executor.vision_encoder()  # its one-line refusal: these artifacts take no images
        assert vision is not None
        if self.processor is None:
            self.processor = ImageProcessor(self.image_directory)
        batch = self.processor(files)
        expanded = expand_ids(ids, batch.soft_tokens, vision)
        tokens = soft_tokens(self.backend.executor.vision_encoder(), batch)
        return expanded, PromptImages.place(tokens, np.asarray([expanded], np.int64), vision)

    def _serve(self) -> None:
        pb_utils = self.pb_utils
        scheduler = self.scheduler
        while True:
            with self.wake:
                while not (scheduler.busy or self.stopping):
                    self.wake.wait()
                if not scheduler.rows and self.batch_window_s:
                    self._gather()
            if self.stopping:
                return
            try:
                dropped = scheduler.step()
            except Exception as exc:  # the failed call's rows have unknown state: end them all, keep serving
                message = INTERNAL_ERROR + (
                    str(exc) if isinstance(exc, CanvasrtError) else f"{type(exc).__name__}: {exc}"
                )
                pb_utils.Logger.log_error(f"canvasrt_generate: a step failed, ending its requests: {message}")
                for ticket in scheduler.abort():
                    self.relays.pop(id(ticket)).fail(message)
                continue
            for ticket in dropped:
                relay = self.relays.pop(id(ticket))
                if not relay.closed:  # the client cancelled: Triton still wants the final flag, for nobody to read
                    pb_utils.Logger.log_info(
                        f"canvasrt_generate: request cancelled by its client after {relay.sent} "
                        "response(s); its row left within a step or two"
                    )
                    relay.cancelled()
            for key in [key for key, relay in self.relays.items() if relay.closed and relay.ticket.finished]:
                del self.relays[key]
            self._record()

    def _gather(self) -> None:
        """With `wake` held and no request in the slots, so the queued ones are newcomers to an idle instance: waits
        up to the batch window for requests to fill the slots before the first step."""
        deadline = time.monotonic() + self.batch_window_s
        while not self.stopping and len(self.scheduler.queue) < self.scheduler.backend.slots:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.wake.wait(left)

    def _count_step(self, occupancy: int) -> None:
        """Counts a step call (the scheduler's on_step, before the step's events go out); the counts reach the
        metrics in `_record`. No log line per step: the Python backend's Logger inspects the caller's frame (reading
        its source) and sends every message to the server, whatever the server's log level."""
        self.pending_steps[occupancy] += 1

    def _record(self) -> None:
        """Hands the metrics to Triton (one inter-process call each) at most every METRICS_S while the instance is
        busy, and at once when it goes idle."""
        scheduler = self.scheduler
        now = time.monotonic()
        if scheduler.busy and now - self.recorded < METRICS_S:
            return
        self.recorded = now
        self.metric_rows.set(len(scheduler.rows))
        self.metric_queued.set(len(scheduler.queue))
        for kind, metric in self.metric_crossing.items():
            crossed = self.backend.crossing[kind]
            if crossed > self.crossed[kind]:
                metric.increment(crossed - self.crossed[kind])
                self.crossed[kind] = crossed
        if self.pending_steps:
            self.metric_steps.increment(sum(self.pending_steps.values()))
            self.metric_row_steps.increment(sum(n * calls for n, calls in self.pending_steps.items()))
            for occupancy, calls in self.pending_steps.items():
                self.metric_by_rows[occupancy].increment(calls)
            self.pending_steps.clear()

    def finalize(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.worker.join(timeout=60)
        for ticket in self.scheduler.abort():
            self.relays.pop(id(ticket)).fail("the server is shutting down")
        self.outbox.close()
        self.backend.deactivate()
        # Triton wants a metric family released after its metrics
        del self.metric_steps, self.metric_row_steps, self.metric_by_rows, self.metric_rows, self.metric_queued
        del self.metric_crossing
        del self.metric_families
