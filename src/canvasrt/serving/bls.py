"""The step backend of the `canvasrt_generate` Triton model when the steps run in other Triton models.

Each encode and denoise call becomes a BLS request to the `canvasrt_encode` / `canvasrt_denoise` step model
(ONNX Runtime or TensorRT backend). Triton step models are stateless, so the K/V buffers and the self-conditioning
state stay in this model's host memory and travel with every call: that is the price of serving the steps as
separate, separately scaled and batched models. `--step-backend in-process` avoids it.

Runs only inside Triton's Python backend (`triton_python_backend_utils` exists nowhere else).
"""

from __future__ import annotations

import numpy as np

from ..core.errors import CanvasrtError
from ..runtime.backends.host import HostGraphBackend

STEP_MODELS = {"encode": "canvasrt_encode", "denoise": "canvasrt_denoise"}


class TritonStepBackend(HostGraphBackend):
    name = "triton-bls"

    def _activate(self) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb_utils = pb_utils
        self.output_ranks = {graph: [len(spec.shape) for spec in entry.outputs]
                             for graph, entry in self.manifest.graphs.items()}

    def _deactivate(self) -> None:
        self.pb_utils = None

    def run_graph(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        pb_utils = self.pb_utils
        names = self.output_names[graph]
        # Per-row scalars are [batch, 1] to Triton (dims [1], reshaped to [] for the model); see repository.py.
        request = pb_utils.InferenceRequest(
            model_name=STEP_MODELS[graph],
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(array.reshape(-1, 1) if array.ndim == 1 else array))
                    for name, array in feeds.items()],
            requested_output_names=names,
        )
        reply = request.exec()
        if reply.has_error():
            raise CanvasrtError(f"step model {STEP_MODELS[graph]} failed: {reply.error().message()}")
        outputs = [pb_utils.get_output_tensor_by_name(reply, name).as_numpy() for name in names]
        return [array.reshape(-1) if rank == 1 else array for array, rank in zip(outputs, self.output_ranks[graph])]
