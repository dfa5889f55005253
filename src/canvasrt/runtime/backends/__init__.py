"""The executors, one small class each behind `canvasrt.runtime.executor.Executor`, and `open_backend`, which pairs
one with a step state (`canvasrt.runtime.step.StepBackend`) for a target (see `canvasrt.core.target`).

An executor is chosen by what it declares (`Capabilities.targets`): an artifact directory runs on ONNX Runtime (or,
with --backend torch, the torch executor on the checkpoint it came from, simulating FP8 artifacts with their own
scales), an engine directory on TensorRT, a checkpoint directory on the torch executor. Executor modules are imported
lazily so that the ONNX Runtime path never imports PyTorch.
"""

from __future__ import annotations

from pathlib import Path

from ...core.errors import CanvasrtError
from ...core.manifest import ArtifactManifest, EngineManifest
from ...core.target import CheckpointDir, Target, open_target, target_kind
from ..executor import Capabilities
from ..step import StepBackend

# Each executor's capabilities, declared here (its class refers to them) so that choosing one imports nothing.
EXECUTORS: dict[str, Capabilities] = {
    "onnxruntime": Capabilities(devices=("cpu", "cuda"), dtypes=("fp32", "fp16", "bf16"), targets=("artifacts",)),
    "torch": Capabilities(
        devices=("cpu", "cuda"),
        dtypes=("fp32", "fp16", "bf16"),
        draws=("uniforms", "exponentials"),
        targets=("checkpoint", "artifacts"),
    ),
    "tensorrt": Capabilities(devices=("cuda",), dtypes=("fp32", "fp16", "bf16"), targets=("engines",)),
}
BACKENDS = tuple(EXECUTORS)
DEFAULTS = {"artifacts": "onnxruntime", "engines": "tensorrt", "checkpoint": "torch"}


def default_backend(target: Target) -> str:
    return DEFAULTS[target_kind(target)]


def refuse_unused_device(device: str, names: list[str]) -> None:
    """--device places the torch paths (the torch executor, the transformers reference) only: a run of none of
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
    """An inactive backend for `target` (a path or an opened target); `with backend:` activates it. provider: ONNX
    Runtime's; device, dtype: the torch executor's (fp32 unless given)."""
    if isinstance(target, (str, Path)):
        target = open_target(target)
    name = name or default_backend(target)
    if name not in EXECUTORS:
        raise CanvasrtError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    kind = target_kind(target)
    if kind not in EXECUTORS[name].targets:
        runs = [n for n, c in EXECUTORS.items() if kind in c.targets]
        what = {"artifacts": "exported graphs", "engines": "engine directories", "checkpoint": "checkpoints"}
        raise CanvasrtError(
            f"--backend {name} cannot run {target.directory}, which holds {what[kind]}: "
            f"those run on --backend {' or '.join(runs)}"
            + (" (run `canvasrt export` first)" if name == "onnxruntime" else "")
        )
    if isinstance(target, EngineManifest):
        from .tensorrt import TensorRTExecutor

        return StepBackend(TensorRTExecutor(target))
    if name == "onnxruntime":
        assert isinstance(target, ArtifactManifest)
        from .onnxruntime import OnnxRuntimeExecutor

        return StepBackend(OnnxRuntimeExecutor(target, provider=provider, threads=threads))
    from .torch import TorchExecutor

    if isinstance(target, CheckpointDir):
        return StepBackend(
            TorchExecutor(target.directory, dtype=dtype or "fp32", max_batch=max_batch, threads=threads, device=device)
        )
    source = target.checkpoint_path
    if not (source / "config.json").is_file():
        raise CanvasrtError(f"--backend torch needs the checkpoint {source} these artifacts came from; it is gone")
    calibration = target.calibration() if target.quantization else None
    executor = TorchExecutor(
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
    executor.checkpoint.check_source_of(target, target.directory)  # the checkpoint may have changed since the export
    return StepBackend(executor)
