"""`canvasrt export`: checkpoint directory -> artifact directory (backbone.onnx, manifest.json, ...).

The backbone graph, which serves prefill, commit and denoising steps from one copy of the weights, is traced from
`DiffusionGemmaText.step` through `torch.onnx.export(dynamo=True)`, checked with onnx.checker, and written with its
I/O contract and per-phase profiles into the manifest. Everything is staged in a temporary directory
that replaces the output only when the whole export succeeded.

The model is traced with fake parameters (shape and dtype, no data); each weight is then attached as a lazy tensor
that reads (and converts) it from the checkpoint only when it is needed: while the optimizer folds small constants,
and when the graph is saved, where large weights are streamed file to file. Memory therefore does not grow with
the model, whatever the export dtype.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..core.config import ModelConfig, VisionConfig
from ..core.contract import (
    DEFAULT_VOCAB_CHUNK,
    VISION_MAX_IMAGES,
    Capacity,
    Profiles,
    TensorSpec,
    backbone_io,
    graph_profiles,
    kv_layout,
    span_ranges,
    vision_io,
    vision_profiles,
)
from ..core.errors import CanvasrtError
from ..core.manifest import ArtifactManifest, GraphEntry, canvasrt_version, digest_json, record_files, write_json
from ..core.output import ARTIFACT_OUTPUT, staged_directory
from ..model.checkpoint import DTYPES, PREPROCESSOR_CONFIG, Checkpoint, checkpoint_name
from ..model.modeling import MOE_FORMULATIONS, StoredLayout, stored_layout
from ..model.vision import vision_checkpoint_name
from .embedding import split_embedding
from .graphs import BackboneGraph, VisionBackboneGraph, VisionGraph, example_inputs

OPSET = 21  # FP8 Q/DQ with a FLOAT8E4M3FN zero point (calibration) needs opset >= 21 on ONNX Runtime
EXTERNAL_DATA_ABOVE = 64 << 20
# ONNX Runtime maps an external weight into memory (instead of copying it) when its offset is a multiple of the
# allocation granularity: 4 KiB pages on Linux, 64 KiB on Windows.
DATA_ALIGNMENT = 64 << 10
WRAPPER_PREFIX = "model."  # BackboneGraph holds the text model as `.model`

ProgressFn = Callable[[str], None]


def export(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    dtype: str = "fp32",
    moe: str = "dense",
    max_batch: int = 4,
    max_context: int = 2048,
    max_prefill: int | None = None,
    debug_logits: bool = False,
    external_data: bool | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    progress: ProgressFn = lambda _: None,
    vision: bool = False,
) -> ArtifactManifest:
    """Exports the backbone graph and returns the manifest that was written.

    vision: also the vision graph (vision.onnx: the vision tower and its projector), and a backbone that places
    image soft tokens (inputs image_tokens, image_slot); without it the artifacts are text-only and pay nothing for
    images.

    external_data: weights in `backbone.onnx.data` next to the graph; None decides by size (above 64 MiB).
    vocab_chunk: vocabulary entries per chunk of the LM head and the sampler (`DiffusionGemmaText.head`); the
    vocabulary size or more computes them over the whole vocabulary at once.
    """
    _check_options(dtype, moe, max_batch, max_prefill, vocab_chunk)
    checkpoint = Checkpoint.open(checkpoint_dir)
    config = checkpoint.config
    capacity = _capacity(config, max_batch, max_context, max_prefill)
    generation = checkpoint.generation_config()  # read (and refused when malformed) before the long work
    vision_config = checkpoint.require_vision() if vision else None
    max_soft = checkpoint.max_soft_tokens() if vision else 0
    progress("hashing the checkpoint")
    digests = checkpoint.file_digests()  # what the graph is exported from; checked again before the swap
    vocab_chunk = min(vocab_chunk, config.vocab_size)

    with staged_directory(output_dir, ARTIFACT_OUTPUT, inputs=[checkpoint_dir]) as staging:
        progress("tracing")
        graphs = {
            "backbone": _export_backbone(
                checkpoint, capacity, staging, dtype, moe, vocab_chunk, debug_logits, external_data, vision, progress
            )
        }
        if vision_config is not None:
            progress("exporting vision.onnx")
            graphs["vision"] = _export_vision(checkpoint, vision_config, max_soft, staging, dtype, external_data)
        progress("writing manifest")
        extras = _copy_side_files(checkpoint, staging, vision, generation)
        manifest = ArtifactManifest(
            model=config,
            capacity=capacity,
            kv_layout=kv_layout(config, capacity),
            dtype=dtype,
            generation=generation,
            directory=Path(output_dir),
            graphs=graphs,
            moe=moe,
            opset=OPSET,
            debug_logits=debug_logits,
            vocab_chunk=vocab_chunk,
            config_digest=digest_json(config.to_dict()),
            checkpoint={"path": str(Path(checkpoint_dir).resolve()), "files": digests},
            tokenizer=tuple(p.name for p in checkpoint.tokenizer_files()),
            files=record_files(staging, extras),
            quantization=None,
            canvasrt_version=canvasrt_version(),
            versions={"torch": torch.__version__, "onnx": onnx.__version__, "transformers": _transformers_version()},
            vision=vision_config,
        )
        manifest.write(staging)
        progress("checking that the checkpoint did not change while exporting")
        _check_checkpoint_unchanged(checkpoint, checkpoint_dir, digests)
    return manifest


def _export_backbone(
    checkpoint: Checkpoint,
    capacity: Capacity,
    staging: Path,
    dtype: str,
    moe: str,
    vocab_chunk: int,
    debug_logits: bool,
    external_data: bool | None,
    vision: bool,
    progress: ProgressFn,
) -> GraphEntry:
    """backbone.onnx, traced from the text model loaded with fake parameters; its weights are external when the user
    says so, else when the model is larger than EXTERNAL_DATA_ABOVE. The embedding is stored as its vocabulary
    chunks. The traced model is released on return, before anything else is exported."""
    config = checkpoint.config
    model = checkpoint.load_text_model(
        moe=moe, dtype=dtype, vocab_chunk=vocab_chunk, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)
    )
    external = _weight_bytes(model) > EXTERNAL_DATA_ABOVE if external_data is None else external_data
    progress("exporting backbone.onnx")
    wrapper = (VisionBackboneGraph if vision else BackboneGraph)(model, debug_logits)
    inputs, outputs, args, sizes = _example(config, capacity, dtype, debug_logits, vision)
    return _export_graph(
        wrapper,
        inputs,
        outputs,
        args,
        staging / "backbone.onnx",
        _backbone_symbols(config, capacity, sizes),
        checkpoint,
        dtype,
        external,
        graph_profiles(config, capacity, vision),
        embedding=WRAPPER_PREFIX + "embed_tokens.weight",
    )


def _copy_side_files(checkpoint: Checkpoint, staging: Path, vision: bool, generation: dict[str, Any]) -> list[str]:
    """Copies the tokenizer files (and, with vision, the image processor's config) from the checkpoint and writes
    its generation config; returns the names of these files, which the manifest records with their digests."""
    for source in checkpoint.tokenizer_files():
        shutil.copy2(source, staging / source.name)
    extras = [p.name for p in checkpoint.tokenizer_files()]
    if vision:
        shutil.copy2(checkpoint.path / PREPROCESSOR_CONFIG, staging / PREPROCESSOR_CONFIG)
        extras.append(PREPROCESSOR_CONFIG)
    if generation:
        write_json(staging / "generation_config.json", generation)
        extras.append("generation_config.json")
    return extras


def _check_checkpoint_unchanged(checkpoint: Checkpoint, checkpoint_dir: str | Path, digests: dict[str, str]) -> None:
    """Refuses the export, before its output is swapped in, when the checkpoint's files no longer match the digests
    taken at the start: the graphs would pair one checkpoint's weights with another's manifest record."""
    if checkpoint.file_digests() != digests:
        raise CanvasrtError(
            f"{checkpoint_dir} changed while exporting (another checkpoint written there?); nothing was "
            "written: run `canvasrt export` again once it stays unchanged"
        )


def _check_options(dtype: str, moe: str, max_batch: int, max_prefill: int | None, vocab_chunk: int) -> None:
    if dtype not in DTYPES:
        raise CanvasrtError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if moe not in MOE_FORMULATIONS:
        raise CanvasrtError(f"unknown MoE formulation {moe!r}; use one of {', '.join(MOE_FORMULATIONS)}")
    if max_batch < 1:
        raise CanvasrtError(f"--max-batch must be at least 1 (got {max_batch})")
    if vocab_chunk < 1:
        raise CanvasrtError(
            f"--vocab-chunk must be at least 1 (got {vocab_chunk}); leave it out for {DEFAULT_VOCAB_CHUNK}"
        )
    if max_prefill is not None and max_prefill < 1:
        raise CanvasrtError(
            f"--max-prefill must be at least 1 (got {max_prefill}); leave it out to prefill up to "
            "--max-context tokens per call"
        )


def _capacity(config: ModelConfig, max_batch: int, max_context: int, max_prefill: int | None) -> Capacity:
    if max_context <= config.canvas_length:
        raise CanvasrtError(
            f"--max-context {max_context} leaves no room for a prompt and a committed canvas of "
            f"{config.canvas_length} tokens; use at least {config.canvas_length + 1}"
        )
    if max_context > config.max_position_embeddings:
        raise CanvasrtError(
            f"--max-context {max_context} exceeds the model's max_position_embeddings "
            f"{config.max_position_embeddings}; lower it"
        )
    return Capacity.for_model(config, max_batch, max_context, max_prefill)


def _example(
    config: ModelConfig, capacity: Capacity, dtype: str, debug_logits: bool, vision: bool = False
) -> tuple[list[TensorSpec], list[TensorSpec], tuple[torch.Tensor, ...], dict[str, int]]:
    """The graph's inputs and outputs, example inputs to trace it with and the example's dim sizes. Example sizes
    differ from each other and from every static size, so that tracing cannot confuse a dynamic dim with another one
    or with a constant."""
    inputs, outputs = backbone_io(config, capacity, debug_logits, vision)
    chunk = _unused_size(config, capacity, set())
    dims = {"batch": 2, "chunk": chunk, "rows": _unused_size(config, capacity, {chunk})}
    for dim, (low, _, high) in span_ranges(kv_layout(config, capacity), capacity).items():
        dims[dim] = _unused_size(config, capacity, set(dims.values()), low, high)
    if vision:
        dims["image_tokens"] = _unused_size(config, capacity, set(dims.values()), 3, capacity.max_prefill * 2)
    return inputs, outputs, example_inputs(inputs, dims, DTYPES[dtype]), dims


def _backbone_symbols(config: ModelConfig, capacity: Capacity, sizes: dict[str, int]) -> dict[str, Any]:
    # torch.export cannot trace a dim whose range is a single value, and specialises sizes 0 and 1, so the trace
    # always sees a batch range reaching the example batch; the capacity's max batch (1 included) is enforced by
    # the backends and the engines' profiles, not by the graph. Either token group may be empty (min 0): that is
    # how a call selects its phase.
    symbols = {
        "batch": torch.export.Dim("batch", min=1, max=max(capacity.max_batch, sizes["batch"])),
        "chunk": torch.export.Dim("chunk", min=0, max=capacity.max_prefill),
        "rows": torch.export.Dim("rows", min=0, max=max(capacity.canvas, sizes["rows"])),
    }
    symbols.update(
        {
            dim: torch.export.Dim(dim, min=low, max=high)
            for dim, (low, _, high) in span_ranges(kv_layout(config, capacity), capacity).items()
        }
    )
    if "image_tokens" in sizes:
        most = max(capacity.max_batch * capacity.max_prefill, sizes["image_tokens"])
        symbols["image_tokens"] = torch.export.Dim("image_tokens", min=0, max=most)
    return symbols


def _export_vision(
    checkpoint: Checkpoint, vision: VisionConfig, max_soft: int, staging: Path, dtype: str, external_data: bool | None
) -> GraphEntry:
    """vision.onnx: dynamic in images per call and in patches per image (a multiple of the pooling kernel's area,
    as the image processor pads them), its weights streamed from the checkpoint like the backbone's. external_data:
    the user's choice, else decided by the vision tower's own size (a small text model says nothing about it)."""
    model = checkpoint.load_vision_model(dtype=dtype, fake_mode=FakeTensorMode(allow_non_fake_inputs=True))
    inputs, outputs = vision_io(vision)
    k2 = vision.pooling_kernel_size**2
    tokens = 5 if max_soft != 5 else 6
    images = torch.export.Dim("images", min=1, max=VISION_MAX_IMAGES)
    per_image = torch.export.Dim("tokens", min=1, max=max(max_soft, tokens))
    symbols = {"images": images, "patches": k2 * per_image}
    args = (
        torch.rand(2, k2 * tokens, 3 * vision.patch_size**2),
        torch.zeros(2, k2 * tokens, 2, dtype=torch.int64),
    )
    if external_data is None:
        external_data = _weight_bytes(model) > EXTERNAL_DATA_ABOVE
    return _export_graph(
        VisionGraph(model),
        inputs,
        outputs,
        args,
        staging / "vision.onnx",
        symbols,
        checkpoint,
        dtype,
        external_data,
        vision_profiles(vision, max_soft),
        vision_checkpoint_name,
    )


def _export_graph(
    module: torch.nn.Module,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    args: tuple[torch.Tensor, ...],
    path: Path,
    symbols: dict[str, Any],
    checkpoint: Checkpoint,
    dtype: str,
    external_data: bool,
    profiles: Profiles,
    naming: Callable[[str], str] = checkpoint_name,
    embedding: str | None = None,
) -> GraphEntry:
    """Traces `module` into `path`; naming: the checkpoint tensor behind each of the module's parameters;
    embedding: the initializer that the graph reads in vocabulary chunks, stored as its chunks (`split_embedding`)."""
    dynamic = [{axis: symbols[d] for axis, d in enumerate(spec.shape) if isinstance(d, str)} for spec in inputs]
    # The K/V buffers arrive through the wrappers' *past, whose dynamic shapes torch.export wants as one tuple.
    n_named = sum(1 for spec in inputs if not spec.name.startswith("past_"))
    shapes = tuple(dynamic) if n_named == len(inputs) else (*dynamic[:n_named], tuple(dynamic[n_named:]))
    with warnings.catch_warnings(), _quiet_torch_onnx():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=[spec.name for spec in inputs],
            output_names=[spec.name for spec in outputs],
            dynamic_shapes=shapes,
            opset_version=OPSET,
            optimize=False,  # the optimizer folds constants, which needs the weights attached first
            verbose=False,
        )
        sources = _attach_weights(program.model, checkpoint, dtype, module, naming)
        try:
            program.optimize()
            if external_data:
                _save_streaming_weights(program.model, path, checkpoint, dtype, sources)
            else:
                program.save(str(path), external_data=False)
        except Exception as exc:  # a weight refused while the serializer reads it arrives wrapped in its error
            cause = _canvasrt_cause(exc)
            if cause is None:
                raise
            raise cause from None
    if embedding is not None:
        split_embedding(path, embedding)
    onnx.checker.check_model(str(path), full_check=True)
    return GraphEntry.of_file(path, inputs, outputs, profiles)


def _canvasrt_cause(exc: BaseException) -> CanvasrtError | None:
    """The user error (a refused weight, say) somewhere in an exception's chain, if there is one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, CanvasrtError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _attach_weights(
    model: Any,
    checkpoint: Checkpoint,
    dtype: str,
    module: torch.nn.Module,
    naming: Callable[[str], str] = checkpoint_name,
) -> dict[str, tuple[str, StoredLayout]]:
    """Replaces each traced (fake) weight with a lazy tensor read from the checkpoint on access; returns the
    checkpoint tensor behind each initializer name (the traced `module`'s parameter name) and how the parameter lies
    in it. Small constants made during tracing are real already."""
    import onnx_ir as ir

    sources = {}
    for name, value in model.graph.initializers.items():
        source = naming(name.removeprefix(WRAPPER_PREFIX))
        if not name.startswith(WRAPPER_PREFIX) or source not in checkpoint.tensor_files:
            continue
        layout = stored_layout(module, name)
        sources[name] = source, layout
        traced = value.const_value
        shape = tuple(int(d) for d in traced.shape)
        value.const_value = ir.LazyTensor(
            lambda source=source, layout=layout, shape=shape: ir.tensor(
                layout.to_parameter(checkpoint.converted(source, dtype), shape)
            ),
            dtype=traced.dtype,
            shape=traced.shape,
            name=name,
        )
    return sources


def _save_streaming_weights(
    model: Any, path: Path, checkpoint: Checkpoint, dtype: str, sources: dict[str, tuple[str, StoredLayout]]
) -> None:
    """Saves with external data written straight from the checkpoint files.

    Letting the exporter serialise the weights would read every parameter through the memory-mapped checkpoint
    and make all of it resident at once; copying each tensor file-to-file (converting it in bounded chunks where
    the dtype changes, reordering its axes block by block where the parameter's layout differs from the stored one)
    keeps the export's memory independent of the model size. Offsets are page-aligned so that ONNX Runtime can
    memory-map each weight instead of copying it.
    """
    import onnx_ir as ir

    data_name = path.name + ".data"
    with open(path.with_name(data_name), "wb") as data:
        for name, value in model.graph.initializers.items():
            if name not in sources:
                continue  # constants made during tracing or by the optimizer stay inline
            source, layout = sources[name]
            data.write(b"\0" * (-data.tell() % DATA_ALIGNMENT))
            offset = data.tell()
            length = checkpoint.write_tensor(source, dtype, data, layout.row_axis)
            tensor = value.const_value
            value.const_value = ir.ExternalTensor(
                data_name, offset, length, tensor.dtype, shape=tensor.shape, name=name, base_dir=str(path.parent)
            )
    ir.save(model, str(path))


def _weight_bytes(module: torch.nn.Module) -> int:
    # Protobuf cannot hold more than 2 GiB, and serialising weights into one in-memory message would also double the
    # export's peak memory, so anything beyond a small model streams its weights to a .data file instead.
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _unused_size(config: Any, capacity: Capacity, taken_too: set[int], low: int = 3, high: int | None = None) -> int:
    """The smallest size in [low, high] (high: the prefill limit) that is no other dim's example or static size."""
    taken = {capacity.canvas, capacity.sliding, capacity.max_context, config.hidden_size, config.vocab_size, 2}
    taken |= taken_too
    taken |= {layer.head_dim for layer in config.layers} | {layer.num_kv_heads for layer in config.layers}
    size = low
    while size in taken:
        size += 1
    return min(size, capacity.max_prefill if high is None else high)


def _transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


class _quiet_torch_onnx:
    """torch.onnx logs every export stage at INFO and prints to stdout; keep the CLI's output to its own lines."""

    def __enter__(self) -> None:
        self._loggers = [
            logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")
        ]
        self._levels = [logger.level for logger in self._loggers]
        for logger in self._loggers:
            logger.setLevel(logging.ERROR)
        import contextlib
        import io

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._redirect.__exit__(*exc)
        for logger, level in zip(self._loggers, self._levels):
            logger.setLevel(level)
