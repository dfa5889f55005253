"""Step backends, one small class each behind `canvasrt.runtime.step.StepBackend`.

`open_backend` picks one for a target (see `canvasrt.core.target`): an artifact directory runs on ONNX Runtime (or,
with --backend torch, the torch backend on the checkpoint it came from, simulating FP8 artifacts with their own
scales), an engine directory on TensorRT, a checkpoint directory on the torch backend. Backend modules are
imported lazily so that the ONNX Runtime path never imports PyTorch.
"""

from __future__ import annotations

from pathlib import Path

from ...core.errors import CanvasrtError
from ...core.manifest import ArtifactManifest, EngineManifest
from ...core.target import CheckpointDir, Target, open_target, target_kind
from ..step import StepBackend

BACKENDS = ("torch", "onnxruntime", "tensorrt")
DEFAULTS = {"artifacts": "onnxruntime", "engines": "tensorrt", "checkpoint": "torch"}


def default_backend(target: Target) -> str:
    return DEFAULTS[target_kind(target)]


def refuse_unused_device(device: str, names: list[str]) -> None:
    """--device places the torch paths (the torch backend, the transformers reference) only: a run of none of
    them would silently ignore it."""
    if device != "cpu" and not {"torch", "transformers"} & set(names):
        raise CanvasrtError(
            f"--device {device} places the torch paths; --backend {', '.join(names)} runs on its own "
            "runtime (ONNX Runtime: --provider), so drop --device or use --backend torch"
        )


def open_backend(
    target: str | Path | Target,
    name: str | None = None,
    provider: str = "cpu",
    threads: int | None = None,
    max_batch: int = 16,
    device: str = "cpu",
    dtype: str | None = None,
) -> StepBackend:
    """An inactive backend for `target` (a path or an opened target); `with backend:` activates it. device, dtype:
    the torch backend's (fp32 unless given)."""
    if isinstance(target, (str, Path)):
        target = open_target(target)
    name = name or default_backend(target)
    if name not in BACKENDS:
        raise CanvasrtError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if (name == "tensorrt") != isinstance(target, EngineManifest):
        raise CanvasrtError(
            f"--backend {name} cannot run {target.directory}: engine directories (`canvasrt build`) run on "
            "--backend tensorrt, and only there"
        )
    if isinstance(target, EngineManifest):
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(target)
    if name == "onnxruntime":
        if not isinstance(target, ArtifactManifest):
            raise CanvasrtError(
                f"--backend onnxruntime runs exported graphs; {target.directory} is a checkpoint "
                "(run `canvasrt export` first)"
            )
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(target, provider=provider, threads=threads)
    from .torch import TorchBackend

    if isinstance(target, CheckpointDir):
        return TorchBackend(
            target.directory, dtype=dtype or "fp32", max_batch=max_batch, threads=threads, device=device
        )
    source = target.checkpoint_path
    if not (source / "config.json").is_file():
        raise CanvasrtError(f"--backend torch needs the checkpoint {source} these artifacts came from; it is gone")
    calibration = target.calibration() if target.quantization else None
    return TorchBackend(
        source,
        dtype=dtype or "fp32",
        moe=target.moe,
        max_batch=target.capacity.max_batch,
        max_context=target.capacity.max_context,
        threads=threads,
        calibration=calibration,
        device=device,
        vocab_chunk=target.vocab_chunk,
    )
