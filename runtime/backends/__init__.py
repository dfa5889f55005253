"""Step backends, one small class each behind `canvasrt.runtime.step.StepBackend`.

`open_backend` picks one for a target directory: an artifact directory (manifest.json) runs on ONNX Runtime, an
engine directory (`canvasrt build`) on TensorRT, a checkpoint directory (config.json) on the torch backend. Backend modules are imported lazily so that the ONNX
Runtime path never imports PyTorch.
"""

from __future__ import annotations

from pathlib import Path

from ...exporter.errors import CanvasrtError
from ...exporter.manifest import MANIFEST
from ..step import StepBackend

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def target_kind(target: Path) -> str:
    if (target / MANIFEST).is_file():
        import json

        try:
            fmt = json.loads((target / MANIFEST).read_text()).get("format")
        except (OSError, json.JSONDecodeError):
            fmt = None
        return "engines" if fmt == "canvasrt-engines" else "artifacts"
    if (target / "config.json").is_file():
        return "checkpoint"
    raise CanvasrtError(
        f"{target} is neither an artifact directory (manifest.json) nor a checkpoint directory (config.json)"
    )


def default_backend(target: Path) -> str:
    return {"artifacts": "onnxruntime", "engines": "tensorrt", "checkpoint": "torch"}[target_kind(target)]


def open_backend(
    target: str | Path, name: str | None = None, provider: str = "cpu", threads: int | None = None, max_batch: int = 16
) -> StepBackend:
    target = Path(target)
    kind = target_kind(target)
    name = name or default_backend(target)
    if name not in BACKENDS:
        raise CanvasrtError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if (name == "tensorrt") != (kind == "engines"):
        raise CanvasrtError(f"--backend {name} cannot run {target}: engine directories (`canvasrt build`) run on "
                            "--backend tensorrt, and only there")
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(target)
    if name == "onnxruntime":
        if kind != "artifacts":
            raise CanvasrtError(f"--backend onnxruntime runs exported graphs; {target} is a checkpoint (run `canvasrt export` first)")
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(target, provider=provider, threads=threads)
    from .torch import TorchBackend

    if kind == "artifacts":
        from ...exporter.manifest import read_manifest

        manifest = read_manifest(target)
        source = Path(manifest["checkpoint"]["path"])
        if not (source / "config.json").is_file():
            raise CanvasrtError(f"--backend torch needs the checkpoint {source} these artifacts came from; it is gone")
        cap = manifest["capacity"]
        quantization = manifest.get("quantization")
        calibration = None
        if quantization:  # simulate the artifacts' FP8 with their own scales
            import json

            calibration = json.loads((target / quantization["calibration"]).read_text())
        return TorchBackend(source, moe=manifest["moe"], max_batch=cap["max_batch"], max_context=cap["max_context"],
                            threads=threads, calibration=calibration)
    return TorchBackend(target, max_batch=max_batch, threads=threads)
