"""`canvasrt_generate`: the Triton Python-backend model that runs the refinement loop (decoupled, streaming).

The model repository holds a few-line `model.py` that imports this class, so the logic lives here, in one place.
Parameters come from config.pbtxt (`canvasrt triton` writes them): `step_backend` is `in-process` (ONNX Runtime
inside this model) or `bls` (the step models, called through BLS); `threads` bounds ONNX Runtime's threads per
instance. Requests are served one at a time per instance, each as a batch of one; concurrency comes from instances.
Errors that concern the request (no prompt, too many tokens, a passed deadline) go back as a Triton error response and
leave the model serving; a request its client cancelled stops at the next step. Nothing here needs PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import CanvasrtError
from ..core.manifest import ArtifactManifest
from ..runtime.prompts import TextCodec
from ..runtime.step import StepBackend
from .protocol import parse_request, responses

ARTIFACTS = "artifacts"  # the model version directory's copy of the artifacts (graphs only for in-process)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb_utils = pb_utils
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        directory = Path(args["model_repository"]) / args["model_version"] / ARTIFACTS
        self.backend = self._open_backend(directory, parameters)
        self.backend.activate()  # until finalize(): the instance serves every request on this backend
        tokenizer = directory / "tokenizer.json"
        self.codec = TextCodec(directory) if tokenizer.is_file() else None
        self.generation = self.backend.spec.generation

    @staticmethod
    def _open_backend(directory: Path, parameters: dict[str, str]) -> StepBackend:
        mode = parameters.get("step_backend", "in-process")
        if mode == "in-process":
            from ..runtime.backends.onnxruntime import OnnxRuntimeBackend

            threads = int(parameters.get("threads", "0")) or None
            return OnnxRuntimeBackend(ArtifactManifest.load(directory), threads=threads)
        from .bls import TritonStepBackend

        # the graphs live in the step models; this copy of the artifacts is their manifest and tokenizer only
        return TritonStepBackend(ArtifactManifest.load(directory, require_graphs=False))

    def execute(self, requests: list[Any]) -> None:
        pb_utils = self.pb_utils
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
                parsed = parse_request(inputs, self.generation, self.codec.encode if self.codec else None)
                finished, sent = False, 0
                for tensors in responses(self.backend, parsed, self.codec, sender.is_cancelled):
                    finished = tensors["event"][0] == b"done"
                    reply = pb_utils.InferenceResponse([pb_utils.Tensor(name, array) for name, array in tensors.items()])
                    sender.send(reply, flags=final if finished else 0)
                    sent += 1
                if not finished:  # the client cancelled: Triton still wants the final flag, for nobody to read
                    pb_utils.Logger.log_info(f"canvasrt_generate: request cancelled by its client after {sent} "
                                             "response(s); its loop stopped")
                    error = pb_utils.TritonError("the client cancelled the request", pb_utils.TritonError.CANCELLED)
                    sender.send(pb_utils.InferenceResponse(error=error), flags=final)
            except Exception as exc:  # every request gets its final response; the instance serves the next one
                message = str(exc) if isinstance(exc, CanvasrtError) else f"{type(exc).__name__}: {exc}"
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=final)

    def finalize(self) -> None:
        self.backend.deactivate()
