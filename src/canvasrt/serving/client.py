"""Clients of `canvasrt_generate` over Triton's gRPC streaming API and HTTP generate_stream endpoint.

Both return the streamed responses as plain dicts ({event, block, step, ids, text, tokens_per_forward}), so a test or
a benchmark compares the two transports, and both against `canvasrt generate`, directly. A Triton error response
raises TritonRequestError with the server's message.
"""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from .protocol import OUTPUTS
from .repository import GENERATE_MODEL


class TritonRequestError(Exception):
    """The server answered the request with an error."""


def _plain(name: str, value: Any) -> Any:
    array = np.asarray(value).reshape(-1)
    if name == "ids":
        return [int(v) for v in array]
    item = array[0]
    if isinstance(item, bytes):
        return item.decode("utf-8")
    return item.item() if isinstance(item, np.generic) else item


def grpc_inputs(inputs: dict[str, np.ndarray]) -> list[Any]:
    """The request's input tensors as tritonclient's gRPC inputs."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, array in inputs.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def generate_grpc(
    url: str, inputs: dict[str, np.ndarray], model: str = GENERATE_MODEL, timeout: float = 600.0
) -> list[dict[str, Any]]:
    """One request over a gRPC stream; returns every response up to the final one."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    replies: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    finished = False
    try:
        client.start_stream(callback=lambda result, error: replies.put((result, error)))
        try:
            client.async_stream_infer(
                model, grpc_inputs(inputs), outputs=[grpcclient.InferRequestedOutput(f.name) for f in OUTPUTS]
            )
        except InferenceServerException as exc:
            raise TritonRequestError(exc.message()) from None
        collected = []
        while True:
            result, error = replies.get(timeout=timeout)
            if error is not None:
                finished = True  # an error response is the request's final one
                raise TritonRequestError(error.message())
            collected.append({f.name: _plain(f.name, result.as_numpy(f.name)) for f in OUTPUTS})
            if collected[-1]["event"] == "done":
                finished = True
                return collected
    finally:
        # Leaving early (a timeout, Ctrl-C): cancel the request, which stops its loop on the server; closing the
        # stream without cancelling would wait for the whole generation.
        client.stop_stream(cancel_requests=not finished)
        client.close()


def generate_http(
    url: str, inputs: dict[str, np.ndarray], model: str = GENERATE_MODEL, timeout: float = 600.0
) -> list[dict[str, Any]]:
    """One request to the generate_stream endpoint (server-sent events); returns every response."""
    body = {}
    for name, array in inputs.items():  # JSON keeps the values' own types, so Triton still checks them
        values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in np.asarray(array).reshape(-1).tolist()]
        body[name] = values if name == "prompt_ids" else values[0]
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/generate_stream",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        reply = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:  # the error is in the body: JSON, or one server-sent event holding JSON
        reply = exc
    collected = []
    with reply:
        for raw in reply:
            line = raw.decode("utf-8").strip().removeprefix("data:")
            if not line:
                continue
            event = json.loads(line)
            if "error" in event:
                raise TritonRequestError(event["error"])
            collected.append(
                {f.name: (event[f.name] if f.name == "ids" else _plain(f.name, [event[f.name]])) for f in OUTPUTS}
            )
    return collected
