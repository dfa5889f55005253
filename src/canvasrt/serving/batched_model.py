"""`canvasrt_generate_batched`: `canvasrt_generate` with a batch dimension, for clients written for TensorRT-LLM.

TensorRT-LLM's ensemble declares max_batch_size > 0, so its gRPC clients send every input with a leading batch
dimension (`text_input` [1, 1], `max_tokens` [1, 1], `stop_words` [1, N]) and read outputs shaped [1, ...]; the vLLM
backend and `canvasrt_generate` declare none ([1]). Triton compares an input's rank with the config's exactly
(core's InferenceRequest::Normalize), so no one model takes both: this model (max_batch_size 1, the same inputs and
outputs) takes a batch of one, forwards the request without its batch dimension to `canvasrt_generate` over
decoupled BLS, and sends every response back with a leading dimension of 1. So the loop model's slots, queue and
batching serve both, and the protocol lives in one place. Request parameters (the generate endpoints' `parameters`
and unknown fields) travel in `sampling_parameters`, since BLS parameters take no floats or lists.

Triton 2.51's BLS cannot cancel a request it issued (the Python backend's ResponseIterator has no cancel before
later releases), so a request here whose client cancels runs on in the loop model to its end, within its
max_tokens and deadline_ms (a cancelled request sent to `canvasrt_generate` itself leaves its slot at the next step).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from ..runtime.scheduler import SERVER_FULL
from .model import CANCELLED
from .protocol import GENERATE_MODEL, INTERNAL_ERROR, OUTPUTS


def forwarded_inputs(inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
    """The loop model's inputs for a batch of one (Triton has checked the batch size): the batch dimension dropped,
    request parameters merged under `sampling_parameters` (whose own values win, as in the loop model)."""
    unbatched = {name: array.reshape(array.shape[1:]) for name, array in inputs.items()}
    if parameters:
        merged = dict(parameters)
        if "sampling_parameters" in unbatched:
            raw = unbatched["sampling_parameters"].reshape(-1)[0]
            try:
                sampling = json.loads(raw)
            except ValueError:
                return unbatched  # the loop model names the malformed JSON
            if not isinstance(sampling, dict):
                return unbatched
            merged.update(sampling)
        unbatched["sampling_parameters"] = np.array([json.dumps(merged).encode()], dtype=np.object_)
    return unbatched


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb_utils = pb_utils

    def execute(self, requests: list[Any]) -> None:
        pb_utils = self.pb_utils
        for request in requests:
            sender = request.get_response_sender()
            try:
                raw = request.parameters()
                parameters = json.loads(raw) if raw else {}
                inputs = forwarded_inputs({t.name(): t.as_numpy() for t in request.inputs()}, parameters)
                forwarded = pb_utils.InferenceRequest(
                    model_name=GENERATE_MODEL,
                    inputs=[pb_utils.Tensor(name, array) for name, array in inputs.items()],
                    requested_output_names=[f.name for f in OUTPUTS],
                )
            except Exception as exc:  # parameters that are not a JSON object
                error = pb_utils.TritonError(
                    f"the request's parameters cannot be read: {exc}", pb_utils.TritonError.INVALID_ARG
                )
                sender.send(
                    pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                )
                continue
            threading.Thread(target=self._relay, args=(forwarded, sender), daemon=True).start()

    def _error(self, message: str) -> Any:
        """The loop model's error with its code, which BLS does not pass on (it arrives as INTERNAL): read back from
        the message, as the loop model marks the errors that are not the request's fault."""
        codes = self.pb_utils.TritonError
        if message.startswith(INTERNAL_ERROR):
            code = codes.INTERNAL
        elif message.startswith(SERVER_FULL):
            code = codes.UNAVAILABLE
        elif message == CANCELLED:
            code = codes.CANCELLED
        else:
            code = codes.INVALID_ARG
        return self.pb_utils.TritonError(message, code)

    def _relay(self, forwarded: Any, sender: Any) -> None:
        """The loop model's responses, each with a batch dimension; its final one (an error or event "done") is sent
        with the final flag."""
        pb_utils = self.pb_utils
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        closed = False
        try:
            for response in forwarded.exec(decoupled=True):
                if closed:
                    continue  # read to the end, so that BLS releases the request
                if response.has_error():
                    sender.send(pb_utils.InferenceResponse(error=self._error(response.error().message())), flags=final)
                    closed = True
                    continue
                tensors = {t.name(): t.as_numpy() for t in response.output_tensors()}
                if not tensors:  # an empty closing response
                    continue
                closed = tensors["event"].reshape(-1)[0] == b"done"
                reply = pb_utils.InferenceResponse([pb_utils.Tensor(n, a[None]) for n, a in tensors.items()])
                sender.send(reply, flags=final if closed else 0)
        except Exception as exc:
            if not closed:
                error = pb_utils.TritonError(f"{INTERNAL_ERROR}{type(exc).__name__}: {exc}")
                sender.send(pb_utils.InferenceResponse(error=error), flags=final)
                closed = True
        if not closed:
            sender.send(flags=final)
