"""The step backend of the `canvasrt_generate` Triton model when the steps run in other Triton models.

Each prefill, commit and denoise call becomes a BLS request to the one `canvasrt_backbone` step model (ONNX Runtime
or TensorRT backend); the request's shapes select the phase (and with TensorRT the optimization profile), and its
`phase` parameter names it for the server's logs and for error messages. Triton step models are stateless, so the
K/V buffers and the self-conditioning state stay in this model's host memory and travel with every call: that is
the price of serving the steps as separate, separately scaled and batched models. `--step-backend in-process` avoids it.

Runs only inside Triton's Python backend (`triton_python_backend_utils` exists nowhere else).
"""

from __future__ import annotations

import numpy as np

from ..core.errors import CanvasrtError
from ..runtime.backends.host import HostGraphBackend

STEP_MODELS = {"backbone": "canvasrt_backbone"}


class TritonStepBackend(HostGraphBackend):
    name = "triton-bls"

    def _activate(self) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb_utils = pb_utils
        self.output_ranks = [len(spec.shape) for spec in self.manifest.backbone.outputs]

    def _deactivate(self) -> None:
        self.pb_utils = None

    def run_backbone(self, phase: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
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
        outputs = [pb_utils.get_output_tensor_by_name(reply, name).as_numpy() for name in names]
        return [array.reshape(-1) if rank == 1 else array for array, rank in zip(outputs, self.output_ranks)]
