"""ONNX Runtime backend: runs backbone.onnx of an artifact directory, one session for every phase. Needs only numpy
and onnxruntime.

The host-resident state (K/V buffers, context mask, self-conditioning) is HostGraphBackend's, which is also ONNX
Runtime's CPU device memory: the sessions read it without copies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...core.contract import ONNX_TYPES, check_io
from ...core.errors import ArtifactError, CanvasrtError
from ...core.manifest import ArtifactManifest
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
    # The exporter page-aligns external weights, so the CPU provider maps them from the file instead of copying
    # them; prepacking would still make a second, repacked copy of every GEMM weight in anonymous memory. It bought
    # no measurable step time on the bench preset (docs/PERFORMANCE.md, the one-copy section).
    options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    providers = [wanted] if wanted == PROVIDERS["cpu"] else [wanted, PROVIDERS["cpu"]]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ONNX Runtime raises its own Fail/InvalidProtobuf/... types, all for a bad graph file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"ONNX Runtime cannot load {path} ({first}); re-export it") from None


def checked_session(manifest: ArtifactManifest, provider: str = "cpu", threads: int | None = None) -> Any:
    """The backbone's session, refused (one line) when the graph's inputs or outputs differ from the manifest's in
    name, dtype or static shape: what the backend and `canvasrt verify` check."""
    entry = manifest.backbone
    path = manifest.graph_path("backbone")
    session = create_session(path, provider, threads)
    for what, declared, found in (
        ("inputs", entry.inputs, session.get_inputs()),
        ("outputs", entry.outputs, session.get_outputs()),
    ):
        check_io(
            list(declared),
            [(a.name, a.type, tuple(a.shape)) for a in found],
            manifest.dtype,
            str(path),
            ONNX_TYPES,
            what,
        )
    return session


class OnnxRuntimeBackend(HostGraphBackend):
    name = "onnxruntime"

    def __init__(self, manifest: ArtifactManifest, provider: str = "cpu", threads: int | None = None):
        super().__init__(manifest)
        self.provider = provider
        self.threads = threads
        self.session: Any = None

    def _activate(self) -> None:
        self.session = checked_session(self.manifest, self.provider, self.threads)

    def _deactivate(self) -> None:
        self.session = None

    def run_backbone(self, phase: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(None, feeds))
