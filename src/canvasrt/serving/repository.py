"""`canvasrt triton`: a Triton Inference Server model repository from an artifact or engine directory.

    canvasrt_generate/   Python backend, decoupled: the loop (canvasrt.serving.model), streaming each canvas;
                         in process (the default) it holds what its executor runs and keeps the state on that
                         executor's device: artifacts on ONNX Runtime (--provider cpu, cuda or tensorrt-ep), engines
                         on TensorRT, a checkpoint on the torch executor (the models' environment needs PyTorch)
    canvasrt_generate_batched/  the loop model's inputs and outputs with a batch dimension, for TensorRT-LLM's
                         clients, forwarding to canvasrt_generate over BLS (canvasrt.serving.batched_model)
    canvasrt_backbone/   with --step-backend tensorrt/onnxruntime/python only: the step model called through BLS for
                         prefill, commit and denoising steps alike: tensorrt_plan (one engine, a profile per phase),
                         onnxruntime_onnx, or the Python backend running ONNX Runtime (canvasrt.serving.step_model);
                         the loop then sends the K/V context and the self-conditioning state with every call

config.pbtxt files are built as Triton's own ModelConfig protobuf (tritonclient ships it) and printed with
text_format, then parsed back and compared, so a file that Triton would misread is never written. The step models
take the manifest's graph I/O with the batch dimension as Triton's batch dimension: every step tensor is batch-first
and a denoise call's other dimensions never vary, so Triton's dynamic batcher can merge the steps of concurrent
requests (it merges only requests of equal shapes, so never two phases).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..core.contract import GRAPHS, MODEL_DTYPE
from ..core.errors import ArtifactError, CanvasrtError
from ..core.kv import NUMPY_DTYPES
from ..core.manifest import ArtifactManifest, EngineEntry, EngineManifest, GraphEntry
from ..core.output import OutputKind, staged_directory
from ..core.target import CheckpointDir, open_target
from ..runtime.backends.onnxruntime import PROVIDERS
from .bls import STEP_MODELS
from .model import ARTIFACTS, CHECKPOINT, DEFAULT_QUEUE, ENGINES
from .protocol import ALL_INPUTS, BATCHED_MODEL, GENERATE_MODEL, OUTPUTS, Field

REPOSITORY_OUTPUT = OutputKind(
    "a canvasrt model repository",
    "`canvasrt triton`",
    lambda directory: (directory / GENERATE_MODEL / "config.pbtxt").is_file(),
)
STEP_BACKENDS = ("tensorrt", "onnxruntime", "python", "in-process")
TRITON_DTYPES = {
    "int64": "INT64",
    "int32": "INT32",
    "bool": "BOOL",
    "float32": "FP32",
    "fp32": "FP32",
    "fp16": "FP16",
    "bf16": "BF16",
}
ENTRY = '''"""Triton Python-backend model written by `canvasrt triton`; its code lives in canvasrt.serving.{module}.

Triton's Python stub runs an isolated interpreter that ignores PYTHONPATH, so `canvasrt serve` names the environment
holding canvasrt in CANVASRT_PYTHONPATH instead. Where canvasrt is installed in the server's Python it is unset.
"""

import os
import site

for _path in filter(None, os.environ.get("CANVASRT_PYTHONPATH", "").split(os.pathsep)):
    site.addsitedir(_path)

from canvasrt.serving.{module} import TritonPythonModel  # noqa: E402,F401
'''


def _model_config() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise CanvasrtError(
            f"writing Triton model configs needs tritonclient[grpc] ({exc}); install canvasrt[triton]"
        ) from None
    return model_config_pb2


def _io(message: Any, field: Field, optional: bool = False) -> None:
    pb = _model_config()
    config_type = (
        "TYPE_STRING" if field.dtype == "BYTES" else f"TYPE_{field.dtype}"
    )  # config and protocol name it apart
    entry = message.add(name=field.name, data_type=pb.DataType.Value(config_type), dims=list(field.dims))
    if optional:
        entry.optional = True
    if not field.dims:  # a per-row scalar ([batch]): Triton wants dims [1], reshaped to nothing for the model
        entry.dims.append(1)
        entry.reshape.SetInParent()


def generate_config(instances: int, parameters: dict[str, str], batched: bool = False) -> Any:
    """The loop model's config; batched: its twin with a batch dimension (max_batch_size 1, one instance, which
    forwards to the loop model)."""
    pb = _model_config()
    config = pb.ModelConfig(
        name=BATCHED_MODEL if batched else GENERATE_MODEL, backend="python", max_batch_size=1 if batched else 0
    )
    config.model_transaction_policy.decoupled = True
    for field in ALL_INPUTS:
        _io(config.input, field, optional=True)
    for field in OUTPUTS:
        _io(config.output, field)
    config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def _write_batched(staging: Path) -> None:
    """`canvasrt_generate_batched`, the loop model for clients that send a batch dimension (TensorRT-LLM's)."""
    (staging / BATCHED_MODEL / "1").mkdir(parents=True)
    (staging / BATCHED_MODEL / "1" / "model.py").write_text(ENTRY.format(module="batched_model"))
    write_config(staging / BATCHED_MODEL, generate_config(1, {}, batched=True))


def step_config(
    graph: str,
    entry: GraphEntry | EngineEntry,
    dtype: str,
    step_backend: str,
    filename: str,
    instances: int,
    max_batch: int,
    threads: int,
) -> Any:
    pb = _model_config()
    config = pb.ModelConfig(name=STEP_MODELS[graph], max_batch_size=max_batch)
    if step_backend == "python":  # the Python backend takes default_model_filename for its script: name the graph apart
        config.backend = "python"
        config.parameters["graph"].string_value = filename
        config.parameters["threads"].string_value = str(threads)
    else:
        config.platform = "tensorrt_plan" if step_backend == "tensorrt" else "onnxruntime_onnx"
        config.default_model_filename = filename
    for specs, message in ((entry.inputs, config.input), (entry.outputs, config.output)):
        for spec in specs:
            dims = tuple(d if isinstance(d, int) else -1 for d in spec.shape[1:])
            _io(
                message,
                Field(spec.name, TRITON_DTYPES[dtype if spec.dtype == MODEL_DTYPE else spec.dtype], dims, spec.doc),
            )
    config.dynamic_batching.SetInParent()
    if step_backend == "tensorrt":
        group = config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_GPU)
        group.profile.extend(str(i) for i in range(len(entry.profiles)))
    else:
        kind = pb.ModelInstanceGroup.KIND_CPU if step_backend == "python" else pb.ModelInstanceGroup.KIND_AUTO
        config.instance_group.add(count=instances, kind=kind)
    return config


def write_config(directory: Path, config: Any) -> None:
    """Writes config.pbtxt and proves it parses back to the same message."""
    from google.protobuf import text_format

    text = text_format.MessageToString(config)
    again = text_format.Parse(text, type(config)())
    if again != config:
        raise AssertionError(f"{config.name}: config.pbtxt does not parse back to the config written")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.pbtxt").write_text(text)


def _link_or_copy(source: str, destination: str) -> None:
    # Hard links make a repository of a multi-GB model instant where source and repository share a file system.
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _check_options(
    step_backend: str, provider: str, instances: int, threads: int, max_queue: int, batch_window_ms: int
) -> None:
    if step_backend not in STEP_BACKENDS:
        raise CanvasrtError(f"unknown step backend {step_backend!r}; use one of {', '.join(STEP_BACKENDS)}")
    if provider not in PROVIDERS:
        raise CanvasrtError(f"unknown ONNX Runtime provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    if instances < 1:
        raise CanvasrtError(f"--instances must be at least 1, got {instances}")
    if threads < 0:
        raise CanvasrtError(f"--threads must be 0 (ONNX Runtime's default) or more, got {threads}")
    if max_queue < 0:
        raise CanvasrtError(f"--max-queue must be 0 or more, got {max_queue}")
    if batch_window_ms < 0:
        raise CanvasrtError(f"--batch-window-ms must be 0 (step at once) or more, got {batch_window_ms}")


def _batch_and_slots(
    target: str | Path, capacity: int, max_batch: int | None, slots: int | None, engines: bool
) -> tuple[int, int]:
    """The step models' max batch and the loop instance's slots, within what the artifacts or engines take."""
    max_batch = capacity if max_batch is None else max_batch
    if not 1 <= max_batch <= capacity:
        raise CanvasrtError(f"--max-batch must be between 1 and the artifacts' max batch {capacity}, got {max_batch}")
    slots = max_batch if slots is None else slots
    if not 1 <= slots <= max_batch:
        # every slot is a row of each step call, which the step models take up to their max batch
        fix = (
            f"raise --max-batch (up to {capacity})"
            if slots <= capacity
            else f"{target} takes batches of at most {capacity}: "
            + (
                "rebuild with a larger `canvasrt build --max-batch`, or re-export"
                if engines
                else "re-export with `canvasrt export --max-batch`"
            )
        )
        raise CanvasrtError(
            f"--slots must be between 1 and the max batch {max_batch}, got {slots}"
            + (f"; {fix}" if slots > max_batch else "")
        )
    return max_batch, slots


def _package(
    staging: Path,
    manifest: ArtifactManifest,
    engines: EngineManifest | None,
    step_backend: str,
    instances: int,
    max_batch: int,
    threads: int,
) -> None:
    """The loop model's files (its copy of the artifacts, and the engines it runs in process) and, for BLS, the step
    models with their configs; linked where the file system allows."""
    model_dir = staging / GENERATE_MODEL / "1"
    artifacts = manifest.directory
    if step_backend == "in-process" and engines is None:
        shutil.copytree(artifacts, model_dir / ARTIFACTS, copy_function=_link_or_copy)
    else:
        (model_dir / ARTIFACTS).mkdir(parents=True)
        for name in manifest.files:
            _link_or_copy(str(artifacts / name), str(model_dir / ARTIFACTS / name))
        # The loop's limits are the engines' where a build narrowed them (`canvasrt build --max-context`)
        (manifest.with_capacity(engines.capacity) if engines is not None else manifest).write(model_dir / ARTIFACTS)
    if step_backend == "in-process" and engines is not None:
        shutil.copytree(engines.directory, model_dir / ENGINES, copy_function=_link_or_copy)
    if step_backend != "in-process":
        for graph in GRAPHS:
            step_dir = staging / STEP_MODELS[graph]
            (step_dir / "1").mkdir(parents=True)
            entry: GraphEntry | EngineEntry
            if engines is not None:
                entry = engines.engines[graph]
                _link_or_copy(str(engines.engine_path(graph)), str(step_dir / "1" / entry.file))
            else:
                entry = manifest.graphs[graph]
                for source in artifacts.glob(entry.file + "*"):  # the graph and its external data, if any
                    _link_or_copy(str(source), str(step_dir / "1" / source.name))
            if step_backend == "python":
                (step_dir / "1" / "model.py").write_text(ENTRY.format(module="step_model"))
            write_config(
                step_dir,
                step_config(graph, entry, manifest.dtype, step_backend, entry.file, instances, max_batch, threads),
            )
    (model_dir / "model.py").write_text(ENTRY.format(module="model"))


def _sources(
    opened: ArtifactManifest | EngineManifest, step_backend: str, provider: str
) -> tuple[EngineManifest | None, ArtifactManifest]:
    """The engines (None for artifacts) and the artifacts they came from, checked against the step backend."""
    engines = opened if isinstance(opened, EngineManifest) else None
    if provider != "cpu" and (step_backend != "in-process" or engines is not None):
        raise CanvasrtError(
            f"--provider {provider} names the ONNX Runtime provider of the in-process loop on artifacts; "
            "drop it for engines and step models"
        )
    if step_backend != "in-process" and (step_backend == "tensorrt") != (engines is not None):
        raise CanvasrtError(
            f"--step-backend {step_backend} needs "
            + (
                "an engine directory (`canvasrt build`)"
                if step_backend == "tensorrt"
                else "an artifact directory (`canvasrt export`), not engines"
            )
        )
    if engines is not None:
        for problem in engines.artifact_problems():
            raise ArtifactError(problem)
        manifest = ArtifactManifest.load(engines.artifacts)
    else:
        assert isinstance(opened, ArtifactManifest)
        manifest = opened
    if step_backend != "in-process" and manifest.vision is not None:
        raise CanvasrtError(
            f"{manifest.directory} holds a vision graph (export --vision), which the step models do not serve: "
            "the backbone's image_tokens input has no batch dimension for Triton's batcher; serve it in process "
            "(leave out --step-backend), or serve an export without --vision over step models"
        )
    if step_backend != "in-process" and manifest.dtype not in NUMPY_DTYPES:
        raise CanvasrtError(
            f"the loop model sends {manifest.dtype} tensors to step models from numpy, which Triton cannot take; "
            "serve in process, or export with --dtype fp32 or fp16"
        )
    return engines, manifest


def write_repository(
    target: str | Path,
    output: str | Path,
    step_backend: str | None = None,
    instances: int = 1,
    max_batch: int | None = None,
    threads: int = 0,
    slots: int | None = None,
    max_queue: int = DEFAULT_QUEUE,
    batch_window_ms: int = 0,
    provider: str = "cpu",
) -> dict[str, Any]:
    """Writes the model repository; returns a summary (models, step backend, executor, source). provider: ONNX
    Runtime's, for artifacts served in process. slots: requests one loop
    instance batches (default max_batch; 1 serves them one at a time); max_queue: requests that may wait for one;
    batch_window_ms: how long an idle loop instance holds its first step for more requests to join it."""
    output = Path(output)
    opened = open_target(target)
    step_backend = step_backend or "in-process"
    _check_options(step_backend, provider, instances, threads, max_queue, batch_window_ms)
    if isinstance(opened, CheckpointDir):
        if step_backend != "in-process":
            raise CanvasrtError(
                f"{target} is a checkpoint, which the loop model runs in process on the torch executor; step models "
                "(--step-backend) serve exported graphs or engines (run `canvasrt export`)"
            )
        return _write_checkpoint_repository(
            opened, output, instances, max_batch, threads, slots, max_queue, batch_window_ms
        )
    engines, manifest = _sources(opened, step_backend, provider)
    # a build may have narrowed the profiles below the artifacts' capacity
    capacity = engines.max_batch if engines is not None else manifest.capacity.max_batch
    max_batch, slots = _batch_and_slots(target, capacity, max_batch, slots, engines is not None)
    # what is packaged (graphs or engines) is what was exported or built: digests, once, after the option checks
    # so that a bad option is refused before gigabytes are hashed
    opened.verify()
    parameters = {
        "step_backend": "in-process" if step_backend == "in-process" else "bls",
        "executor": "tensorrt" if engines is not None else "onnxruntime",
        "provider": provider,
        "threads": str(threads),
        "slots": str(slots),
        "max_queue": str(max_queue),
        "batch_window_ms": str(batch_window_ms),
    }
    inputs = [Path(target)] + ([engines.artifacts] if engines is not None else [])
    with staged_directory(output, REPOSITORY_OUTPUT, inputs) as staging:
        _package(staging, manifest, engines, step_backend, instances, max_batch, threads)
        write_config(staging / GENERATE_MODEL, generate_config(instances, parameters))
        _write_batched(staging)
        # what was linked or copied is what was hashed at the start: the sources still match their digests
        manifest.check_unchanged("triton")
        if engines is not None:
            engines.verify()
    models = [GENERATE_MODEL, BATCHED_MODEL] + ([] if step_backend == "in-process" else list(STEP_MODELS.values()))
    return {
        "models": models,
        "step_backend": step_backend,
        "executor": parameters["executor"] if step_backend == "in-process" else "triton-bls",
        "source": str(target),
        "max_batch": max_batch,
        "slots": slots,
    }


def _write_checkpoint_repository(
    checkpoint: CheckpointDir,
    output: Path,
    instances: int,
    max_batch: int | None,
    threads: int,
    slots: int | None,
    max_queue: int,
    batch_window_ms: int,
) -> dict[str, Any]:
    """The loop model alone, running the torch executor on a copy of the checkpoint (fp32, the checkpoint's
    context up to 4096 positions; `max_batch` rows, 16 unless given); the options are checked by the caller."""
    max_batch = max_batch or 16
    slots = max_batch if slots is None else slots
    if not 1 <= slots <= max_batch:
        raise CanvasrtError(f"--slots must be between 1 and the max batch {max_batch}, got {slots}")
    parameters = {
        "step_backend": "in-process",
        "executor": "torch",
        "max_batch": str(max_batch),
        "threads": str(threads),
        "slots": str(slots),
        "max_queue": str(max_queue),
        "batch_window_ms": str(batch_window_ms),
    }
    with staged_directory(output, REPOSITORY_OUTPUT, [checkpoint.directory]) as staging:
        model_dir = staging / GENERATE_MODEL / "1"
        shutil.copytree(checkpoint.directory, model_dir / CHECKPOINT, copy_function=_link_or_copy)
        (model_dir / "model.py").write_text(ENTRY.format(module="model"))
        write_config(staging / GENERATE_MODEL, generate_config(instances, parameters))
        _write_batched(staging)
    return {
        "models": [GENERATE_MODEL, BATCHED_MODEL],
        "step_backend": "in-process",
        "executor": "torch",
        "source": str(checkpoint.directory),
        "max_batch": max_batch,
        "slots": slots,
    }
