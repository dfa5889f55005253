"""The executor of the `canvasrt_generate` Triton model when the steps run in another Triton model, over BLS.

Each prefill, commit and denoise call becomes a BLS request to the one `canvasrt_backbone` step model (ONNX Runtime
or TensorRT backend); the request's shapes select the phase (and with TensorRT the optimization profile), and its
`phase` parameter names it for the server's logs and for error messages. Triton step models are stateless, so the
K/V context and the self-conditioning state stay in this model's host memory and travel with every call, both ways
(`Capabilities.keeps_state` False: StepBackend counts those bytes as crossing): that is the price of serving the steps
as separate, separately scaled and batched models. The in-process executors keep the state where they run.

Runs only inside Triton's Python backend (`triton_python_backend_utils` exists nowhere else).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.errors import CanvasrtError
from ..core.manifest import ArtifactManifest
from ..runtime.executor import Capabilities, Executor
from ..runtime.state import HostArrays

STEP_MODELS = {"backbone": "canvasrt_backbone"}


class TritonStepExecutor(Executor):
    name = "triton-bls"
    capabilities = Capabilities(devices=("cpu",), dtypes=("fp32", "fp16", "bf16"), keeps_state=False)

    def __init__(self, manifest: ArtifactManifest):
        self.manifest, self.spec = manifest, manifest
        self.arrays = HostArrays()
        self.context_width = int(manifest.backbone.input("context_mask").shape[1])
        self.output_names = manifest.backbone.output_names
        self.output_ranks = [len(spec.shape) for spec in manifest.backbone.outputs]

    def load(self) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb_utils = pb_utils

    def unload(self) -> None:
        self.pb_utils = None

    def run(self, phase: str, feeds: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        pb_utils = self.pb_utils
        names = self.output_names
        model = STEP_MODELS["backbone"]
        # Per-row scalars are [batch, 1] to Triton (dims [1], reshaped to [] for the model); see repository.py.
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[
                pb_utils.Tensor(name, np.ascontiguousarray(array.reshape(-1, 1) if array.ndim == 1 else array))
                for name, array in feeds.items()
            ],
            requested_output_names=names,
            parameters={"phase": phase},
        )
        reply = request.exec()
        if reply.has_error():
            raise CanvasrtError(f"step model {model} failed in the {phase} phase: {reply.error().message()}")
        arrays = [pb_utils.get_output_tensor_by_name(reply, name).as_numpy() for name in names]
        return {
            name: array.reshape(-1) if rank == 1 else array
            for name, array, rank in zip(names, arrays, self.output_ranks)
        }
