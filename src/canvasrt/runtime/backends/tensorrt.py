"""The TensorRT executor: runs the backbone engine of `canvasrt build` on an NVIDIA GPU (full TensorRT; SM90 for
H100), as TensorRT-LLM's session does: set the input shapes, set the tensor addresses, execute.

One engine holds the weights once and has an optimization profile per phase (prefill, commit, denoise); each phase
runs on its own execution context of that engine, bound to its profile once, so no call switches profiles. The
phases never run at the same time, so the contexts share one block of activation memory, the size of the largest.
The state (K/V buffers, context mask, self-conditioning) is the StepBackend's, in PyTorch CUDA tensors (GPU machines
have PyTorch; the ONNX Runtime CPU path stays torch-free), and is bound by address where it lies; the engine's other
outputs are allocated once per shape (phase, batch, chunk), with the shapes and dtypes the engine itself reports. A
step moves only the small per-step tensors between host and device (StepBackend sends and counts them). On loading,
the engine's I/O names, dtypes and static dims are checked against the manifest.

Everything that does not need a GPU (manifest and version checks, profile selection, buffer planning) is plain
functions tested on CPU. The class itself has not run yet (no GPU with TensorRT was available where it was written);
tests/test_typecheck.py checks it with mypy against TensorRT's API as the `tensorrt-stubs` package describes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...core.contract import PHASES, VISION_MAX_IMAGES, check_io
from ...core.errors import CanvasrtError
from ...core.kv import buffer_shapes
from ...core.manifest import EngineManifest
from ..executor import Executor
from ..state import Arrays, TorchArrays
from . import EXECUTORS

if TYPE_CHECKING:  # the module imports TensorRT only in activate()
    import tensorrt as trt

# TensorRT's DataType names for the contract's dtypes (the model dtype resolved through the manifest's precision).
TRT_TYPES = {"int64": "INT64", "bool": "BOOL", "float32": "FLOAT", "fp32": "FLOAT", "fp16": "HALF", "bf16": "BF16"}


def check_engines_fit(manifest: EngineManifest, tensorrt_version: str, compute_capability: tuple[int, int]) -> None:
    """Refuses engines built by another TensorRT or for another GPU, before deserialising them fails obscurely."""
    key = manifest.key
    if key.builder != "tensorrt":
        raise CanvasrtError(
            f"these engines were built with {key.builder}; the tensorrt backend runs `--builder tensorrt` engines"
        )
    if key.builder_version != tensorrt_version:
        raise CanvasrtError(
            f"engines built with TensorRT {key.builder_version}, this is TensorRT {tensorrt_version}; "
            "rebuild them with `canvasrt build`"
        )
    local = f"sm{compute_capability[0]}{compute_capability[1]}"
    if key.target not in ("current", local):
        raise CanvasrtError(
            f"engines built for {key.target}, this GPU is {local}; rebuild them here with `canvasrt build`"
        )


@dataclass(frozen=True)
class BufferPlan:
    """Shapes (and dtypes) of the state a batch holds on the GPU (`StepState`), and its bytes."""

    kv: list[tuple[int, ...]]
    context_mask: tuple[int, int]
    self_cond: tuple[int, int, int]
    dtype: str

    @property
    def device_bytes(self) -> int:
        width = {"fp32": 4, "fp16": 2, "bf16": 2}[self.dtype]
        kv = 2 * sum(int(np.prod(s)) for s in self.kv) * width
        return kv + int(np.prod(self.context_mask)) + 2 * int(np.prod(self.self_cond)) * width


def plan_buffers(manifest: EngineManifest, batch: int) -> BufferPlan:
    cap = manifest.capacity
    if batch > cap.max_batch:
        raise CanvasrtError(f"batch of {batch} exceeds the engines' max batch {cap.max_batch}")
    # The mask spans the graphs' static context, which `canvasrt build --max-context` leaves as exported while it
    # lowers capacity.max_context (the longest request the loop accepts).
    mask = manifest.backbone.input("context_mask")
    return BufferPlan(
        kv=list(buffer_shapes(manifest.kv_layout, batch)),
        context_mask=(batch, int(mask.shape[1])),
        self_cond=(batch, cap.canvas, manifest.model.hidden_size),
        dtype=manifest.dtype,
    )


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(dims[i] for i in range(len(dims)))


class TensorRTExecutor(Executor):
    name = "tensorrt"
    capabilities = EXECUTORS["tensorrt"]

    def __init__(self, manifest: EngineManifest, device: int = 0):
        self.manifest, self.spec = manifest, manifest
        self.device_index = device
        self.context_width = int(manifest.backbone.input("context_mask").shape[1])
        self.outputs: dict[tuple[str, int, int], dict[str, Any]] = {}  # (phase, batch, chunk) -> outputs by name
        self.arrays: Arrays = TorchArrays(f"cuda:{device}")  # imports PyTorch on first use only
        self.vision = manifest.vision if "vision" in manifest.engines else None
        self._vision: TensorRTVisionEncoder | None = None

    def preflight(self) -> None:
        """TensorRT and PyTorch must be importable and see a CUDA GPU; else a one-line error naming what is missing."""
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise CanvasrtError(
                f"the tensorrt backend needs TensorRT and PyTorch with CUDA ({exc}); install "
                "canvasrt[gpu] on a machine with an NVIDIA GPU"
            ) from None
        if not hasattr(trt, "Runtime"):
            raise CanvasrtError(
                "the installed `tensorrt` is not a working TensorRT (only stubs or a placeholder); "
                "install canvasrt[gpu] on a machine with an NVIDIA GPU"
            )
        if not torch.cuda.is_available():
            raise CanvasrtError(
                "the tensorrt backend needs CUDA, and PyTorch sees no CUDA GPU (no driver or device); "
                "run it on a machine with an NVIDIA GPU"
            )

    def load(self) -> None:
        import tensorrt as trt  # importable: the backend ran preflight()
        import torch

        torch.cuda.set_device(self.device_index)
        check_engines_fit(self.manifest, trt.__version__, torch.cuda.get_device_capability(self.device_index))
        self.torch, self.trt = torch, trt
        self.torch_dtypes = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT64: torch.int64,
            trt.DataType.BOOL: torch.bool,
        }
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        entry = self.manifest.backbone
        engine = self.runtime.deserialize_cuda_engine(self.manifest.engine_path("backbone").read_bytes())
        if engine is None:
            raise CanvasrtError(f"TensorRT could not load {entry.file}; rebuild the engines on this machine")
        self.engine = engine
        self._check_io()
        names = list(entry.profiles)
        self.scratch = torch.empty(
            max(engine.get_device_memory_size_for_profile_v2(names.index(phase)) for phase in PHASES),
            dtype=torch.uint8,
            device="cuda",
        )
        self.stream = torch.cuda.Stream()
        self.contexts: dict[str, trt.IExecutionContext] = {}
        for phase in PHASES:
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise CanvasrtError(f"TensorRT could not create an execution context for {entry.file}")
            context.set_optimization_profile_async(names.index(phase), self.stream.cuda_stream)
            context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
            self.contexts[phase] = context
        # A bound tensor needs a non-null address even when it is empty (a phase's unused inputs and outputs)
        self.placeholder = torch.empty(1, dtype=torch.uint8, device="cuda")

    def _check_io(self) -> None:
        engine, entry = self.engine, self.manifest.backbone
        found: dict[bool, list[tuple[str, str, tuple[int | str | None, ...]]]] = {True: [], False: []}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            is_input = engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT
            found[is_input].append((name, engine.get_tensor_dtype(name).name, _dims(engine.get_tensor_shape(name))))
        source = str(self.manifest.engine_path("backbone"))
        check_io(list(entry.inputs), found[True], self.manifest.dtype, source, TRT_TYPES, "inputs")
        check_io(list(entry.outputs), found[False], self.manifest.dtype, source, TRT_TYPES, "outputs")

    def vision_encoder(self) -> TensorRTVisionEncoder:
        if self.vision is None:
            return super().vision_encoder()  # type: ignore[return-value]  # it raises
        if self._vision is None:
            self._vision = TensorRTVisionEncoder(self)
        return self._vision

    def unload(self) -> None:
        self.contexts, self.outputs = {}, {}
        self._vision = None
        del self.engine, self.scratch

    def _outputs(self, phase: str, batch: int, chunk: int, given: dict[str, Any]) -> dict[str, Any]:
        """The engine's outputs for a call of `phase` whose input shapes are set: the caller's buffers where given,
        else allocated on first use of the shape, as the engine reports it."""
        context, engine = self.contexts[phase], self.engine
        key = (phase, batch, chunk)
        if key not in self.outputs:
            tensors: dict[str, Any] = {}
            for index in range(engine.num_io_tensors):
                name = engine.get_tensor_name(index)
                if engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT:
                    continue
                shape = _dims(context.get_tensor_shape(name))
                dtype = self.torch_dtypes[engine.get_tensor_dtype(name)]
                tensors[name] = self.torch.empty(shape, dtype=dtype, device="cuda")
            self.outputs[key] = tensors
        return {**self.outputs[key], **given}

    def run(self, phase: str, feeds: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        context = self.contexts[phase]
        for name, tensor in feeds.items():
            context.set_input_shape(name, tuple(tensor.shape))
        bound = self._outputs(phase, feeds["context_length"].shape[0], feeds["input_ids"].shape[1], outputs)
        for name, tensor in {**feeds, **bound}.items():
            if tensor.numel() == 0:
                tensor = self.placeholder
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise CanvasrtError(f"TensorRT failed to run the backbone engine ({phase})")
        self.stream.synchronize()
        return bound


class TensorRTVisionEncoder:
    """The vision engine (vision.engine, one profile: images x patches) on its own execution context, on the
    backbone executor's stream; checked against the manifest on load. At most VISION_MAX_IMAGES images per call."""

    def __init__(self, executor: TensorRTExecutor):
        trt, torch = executor.trt, executor.torch
        self.executor, self.torch = executor, torch
        entry = executor.manifest.engines["vision"]
        path = executor.manifest.engine_path("vision")
        engine = executor.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise CanvasrtError(f"TensorRT could not load {entry.file}; rebuild the engines on this machine")
        found: dict[bool, list[tuple[str, str, tuple[int | str | None, ...]]]] = {True: [], False: []}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            found[is_input].append((name, engine.get_tensor_dtype(name).name, _dims(engine.get_tensor_shape(name))))
        check_io(list(entry.inputs), found[True], executor.manifest.dtype, str(path), TRT_TYPES, "inputs")
        check_io(list(entry.outputs), found[False], executor.manifest.dtype, str(path), TRT_TYPES, "outputs")
        context = engine.create_execution_context()
        if context is None:
            raise CanvasrtError(f"TensorRT could not create an execution context for {entry.file}")
        self.engine, self.context = engine, context

    def encode(self, pixel_values: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch, executor = self.torch, self.executor
        tokens, masks = [], []
        for begin in range(0, pixel_values.shape[0], VISION_MAX_IMAGES):
            feeds = {
                "pixel_values": torch.from_numpy(np.ascontiguousarray(pixel_values[begin : begin + VISION_MAX_IMAGES])),
                "image_position_ids": torch.from_numpy(
                    np.ascontiguousarray(positions[begin : begin + VISION_MAX_IMAGES])
                ),
            }
            bound: dict[str, Any] = {}
            for name, tensor in feeds.items():
                bound[name] = tensor.to("cuda")
                self.context.set_input_shape(name, tuple(tensor.shape))
            for name in ("soft_tokens", "soft_token_mask"):
                shape = _dims(self.context.get_tensor_shape(name))
                dtype = executor.torch_dtypes[self.engine.get_tensor_dtype(name)]
                bound[name] = torch.empty(shape, dtype=dtype, device="cuda")
            for name, tensor in bound.items():
                self.context.set_tensor_address(name, tensor.data_ptr())
            if not self.context.execute_async_v3(executor.stream.cuda_stream):
                raise CanvasrtError("TensorRT failed to run the vision engine")
            executor.stream.synchronize()
            tokens.append(bound["soft_tokens"].float().cpu().numpy())
            masks.append(bound["soft_token_mask"].cpu().numpy())
        return np.concatenate(tokens), np.concatenate(masks)
