"""ONNX Runtime backend: runs encode.onnx / denoise.onnx of an artifact directory. Needs only numpy and onnxruntime.

The host-resident state (K/V buffers, context mask, self-conditioning) is HostGraphBackend's, which is also ONNX
Runtime's CPU device memory: the sessions read it without copies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...exporter.errors import CanvasrtError
from ...exporter.manifest import read_manifest
from .host import HostGraphBackend

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


class OnnxRuntimeBackend(HostGraphBackend):
    name = "onnxruntime"

    def __init__(self, artifact_dir: str | Path, provider: str = "cpu", threads: int | None = None):
        self.directory = Path(artifact_dir)
        super().__init__(read_manifest(self.directory), str(self.directory))
        self.provider = provider
        self.threads = threads
        self.sessions: dict[str, Any] = {}

    def activate(self) -> None:
        for graph in ("encode", "denoise"):
            self.sessions[graph] = create_session(
                self.directory / self.manifest["graphs"][graph]["file"], self.provider, self.threads
            )

    def deactivate(self) -> None:
        self.sessions.clear()

    def run_graph(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[graph].run(None, feeds)
