"""ONNX Runtime backend: runs encode.onnx / denoise.onnx of an artifact directory. Needs only numpy and onnxruntime.

The K/V buffers, the context mask and the self-conditioning state live in this object (host memory, which is
ONNX Runtime's CPU device memory) and are fed to the sessions without copies; the loop only exchanges the small
per-step tensors with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...exporter.errors import ArtifactError, CanvasrtError
from ...exporter.manifest import read_manifest
from ..kv import NUMPY_DTYPES, HostKVBuffers, context_mask, layout_from_manifest
from ..step import Draws, StepBackend, StepResult

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def create_session(path: Path, provider: str = "cpu", threads: int | None = None) -> Any:
    """An InferenceSession on the named provider, or a one-line error saying how to get that provider."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise CanvasrtError(f"unknown ONNX Runtime provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        raise CanvasrtError(
            f"this ONNX Runtime ({ort.__version__}) has no {wanted}; install canvasrt[gpu] (onnxruntime-gpu) on a "
            "machine with that GPU stack, or use --provider cpu"
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers = [wanted] if wanted == PROVIDERS["cpu"] else [wanted, PROVIDERS["cpu"]]
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


class OnnxRuntimeBackend(StepBackend):
    name = "onnxruntime"

    def __init__(self, artifact_dir: str | Path, provider: str = "cpu", threads: int | None = None):
        super().__init__()
        self.directory = Path(artifact_dir)
        self.provider = provider
        self.threads = threads
        self._manifest = read_manifest(self.directory)
        dtype = self._manifest["dtype"]
        if dtype not in NUMPY_DTYPES:
            raise ArtifactError(f"{self.directory} holds {dtype} graphs, which ONNX Runtime cannot feed from numpy; "
                                "export with --dtype fp32 or fp16")
        self.dtype = NUMPY_DTYPES[dtype]
        self.capacity = self._manifest["capacity"]
        self.buffers = HostKVBuffers(layout_from_manifest(self._manifest), self.dtype)
        self.num_layers = len(self._manifest["kv_layout"])
        self.sessions: dict[str, Any] = {}

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def activate(self) -> None:
        for graph in ("encode", "denoise"):
            self.sessions[graph] = create_session(
                self.directory / self._manifest["graphs"][graph]["file"], self.provider, self.threads
            )
        self._denoise_outputs = [spec["name"] for spec in self._manifest["graphs"]["denoise"]["outputs"]]

    def deactivate(self) -> None:
        self.sessions.clear()

    def start(self, padding: np.ndarray) -> None:
        batch = padding.shape[0]
        if batch > self.capacity["max_batch"]:
            raise CanvasrtError(f"batch of {batch} exceeds the artifacts' max batch {self.capacity['max_batch']}; "
                                "re-export with a larger --max-batch")
        self.buffers.reset(batch)
        self.mask = context_mask(padding, self.capacity["max_context"])
        hidden = self._manifest["model"]["hidden_size"]
        self.self_cond = np.zeros((batch, self.capacity["canvas"], hidden), self.dtype)
        self._count("start", padding)

    def _kv_feeds(self) -> dict[str, np.ndarray]:
        feeds = {}
        for i in range(self.num_layers):
            feeds[f"past_key_{i}"] = self.buffers.keys[i]
            feeds[f"past_value_{i}"] = self.buffers.values[i]
        return feeds

    def encode(self, input_ids: np.ndarray, positions: np.ndarray, context_length: np.ndarray) -> None:
        batch = input_ids.shape[0]
        feeds = {
            "input_ids": input_ids.astype(np.int64, copy=False),
            "positions": np.broadcast_to(positions.astype(np.int64), (batch, positions.shape[0])).copy(),
            "context_length": context_length.astype(np.int64, copy=False),
            "context_mask": self.mask,
            **self._kv_feeds(),
        }
        self._count("encode", input_ids, positions, context_length)
        out = self.sessions["encode"].run(None, feeds)
        self.buffers.write(positions, out[: self.num_layers], out[self.num_layers :])

    def denoise(
        self,
        canvas: np.ndarray,
        context_length: np.ndarray,
        temperature: np.ndarray,
        entropy_bound: np.ndarray,
        draws: Draws,
        first_step: bool,
        frozen: np.ndarray,
    ) -> StepResult:
        if draws.uniforms is None:
            raise CanvasrtError("the onnxruntime backend samples from uniforms (--rng counter); --rng hf needs --backend torch")
        if first_step:
            self.self_cond.fill(0)
        feeds = {
            "canvas": canvas,
            "self_cond": self.self_cond,
            "context_length": context_length,
            "context_mask": self.mask,
            "temperature": temperature,
            "entropy_bound": entropy_bound,
            "uniforms": draws.uniforms,
            "renoise_ids": draws.renoise_ids,
            **self._kv_feeds(),
        }
        self._count("denoise", canvas, context_length, temperature, entropy_bound, draws.uniforms, draws.renoise_ids, frozen)
        out = dict(zip(self._denoise_outputs, self.sessions["denoise"].run(None, feeds)))
        next_self_cond = out.pop("next_self_cond")
        self.self_cond = np.where(frozen[:, None, None], self.self_cond, next_self_cond)
        result = StepResult(
            argmax=out.pop("argmax"),
            next_canvas=out.pop("next_canvas"),
            accepted=out.pop("accepted"),
            entropy=out.pop("entropy"),
            mean_entropy=out.pop("mean_entropy"),
            extras=out,
        )
        self._count("denoise", result.argmax, result.next_canvas, result.accepted, result.entropy, result.mean_entropy, *out.values())
        return result
