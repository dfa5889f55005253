"""TensorRT backend: runs the backbone engine of `canvasrt build` on an NVIDIA GPU (full TensorRT; SM90 for H100).

One engine holds the weights once and has an optimization profile per phase (prefill, commit, denoise); each phase
runs on its own execution context of that engine, bound to its profile once, so no call switches profiles. The
phases never run at the same time, so the contexts share one block of activation memory, the size of the largest.
Device memory is held in PyTorch CUDA tensors (GPU machines have PyTorch; the ONNX Runtime path stays torch-free).
The per-layer K/V cache, the context mask and two self-conditioning buffers (ping-pong) are planned once per batch
size; a call binds the leading slots of each K/V buffer that cover its context (`core.contract.kv_spans`: a device
copy of those slots, the whole buffer once the context fills it; kept across a canvas's steps,
`StepBackend._context`), so attention reads the live context only. Every other engine input and output is allocated
once per shape (phase, batch, chunk), with the shapes and dtypes the engine itself reports, and reused by later calls
of that shape. A step moves only the small per-step
tensors between host and device. On activation the engine's I/O names, dtypes and static dims are checked against
the manifest.

Everything that does not need a GPU (manifest and version checks, profile selection, buffer planning) is plain
functions tested on CPU. The class itself has not run yet (no GPU with TensorRT was available where it was written);
tests/test_typecheck.py checks it with mypy against TensorRT's API as the `tensorrt-stubs` package describes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...core.contract import PHASES, check_io, encoder_phase, no_canvas, no_chunk
from ...core.errors import CanvasrtError
from ...core.kv import buffer_shapes, context_mask, write_chunk
from ...core.manifest import EngineManifest
from ..step import Draws, StepBackend, StepResult

if TYPE_CHECKING:  # the module imports TensorRT only in activate()
    import tensorrt as trt

# TensorRT's DataType names for the contract's dtypes (the model dtype resolved through the manifest's precision).
TRT_TYPES = {"int64": "INT64", "bool": "BOOL", "float32": "FLOAT", "fp32": "FLOAT", "fp16": "HALF", "bf16": "BF16"}
STATE_INPUTS = ("self_cond", "context_mask")  # device-resident inputs besides the K/V buffers


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
    """Shapes (and dtypes) of the state allocated once per batch size."""

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


class TensorRTBackend(StepBackend):
    name = "tensorrt"
    ROW_SCRATCH = ("next_self_cond",)  # the ping-pong half a step writes before it is read

    def __init__(self, manifest: EngineManifest, device: int = 0):
        super().__init__(manifest)
        self.manifest = manifest
        self.device = device
        self.io: dict[tuple[str, int, int], dict[str, Any]] = {}  # (phase, batch, chunk) -> tensors by name

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

    def _activate(self) -> None:
        import tensorrt as trt  # importable: activate() ran preflight()
        import torch

        torch.cuda.set_device(self.device)
        check_engines_fit(self.manifest, trt.__version__, torch.cuda.get_device_capability(self.device))
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
        self.state_dtype = self.torch_dtypes[getattr(trt.DataType, TRT_TYPES[self.manifest.dtype])]
        # What a denoising step copies back: the sampler's outputs, not the (empty) encoder K/V or the next state
        self.step_outputs = [
            name for name in entry.output_names if not name.startswith(("key_", "value_")) and name != "next_self_cond"
        ]

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

    def _deactivate(self) -> None:
        self.contexts, self.io = {}, {}
        del self.engine, self.scratch

    def kv_cache(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return ([k.float().cpu().numpy() for k in self.keys], [v.float().cpu().numpy() for v in self.values])

    def self_conditioning(self) -> np.ndarray:
        return np.asarray(self.self_cond.float().cpu().numpy())

    def set_self_conditioning(self, state: np.ndarray) -> None:
        self.self_cond.copy_(self.torch.from_numpy(np.asarray(state, dtype=np.float32)))

    def _start(self, padding: np.ndarray) -> None:
        torch = self.torch
        plan = plan_buffers(self.manifest, padding.shape[0])
        self.keys = [torch.zeros(shape, dtype=self.state_dtype, device="cuda") for shape in plan.kv]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.mask = torch.from_numpy(context_mask(padding, plan.context_mask[1])).to("cuda")
        self.self_cond = torch.zeros(plan.self_cond, dtype=self.state_dtype, device="cuda")
        self.next_self_cond = torch.empty_like(self.self_cond)

    def _buffers(self, phase: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        """The engine's non-state inputs and its outputs for a call of `phase` with these input shapes: allocated on
        first use of a shape, the output shapes and dtypes as the engine reports them for it."""
        context = self.contexts[phase]
        for name, shape in shapes.items():
            context.set_input_shape(name, shape)
        key = (phase, shapes["context_length"][0], shapes["input_ids"][1])
        if key not in self.io:
            engine = self.engine
            tensors: dict[str, Any] = {}
            for index in range(engine.num_io_tensors):
                name = engine.get_tensor_name(index)
                if name in STATE_INPUTS or name.startswith("past_") or name == "next_self_cond":
                    continue
                shape = _dims(context.get_tensor_shape(name))
                # At least one element: an empty tensor (a phase's unused outputs) still needs a non-null address
                size = int(np.prod(shape))
                tensors[name] = self.torch.empty(
                    max(size, 1), dtype=self.torch_dtypes[engine.get_tensor_dtype(name)], device="cuda"
                )[:size].view(shape)
            self.io[key] = tensors
        return self.io[key]

    def _run(self, phase: str, tensors: dict[str, Any]) -> None:
        context = self.contexts[phase]
        for name, tensor in tensors.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise CanvasrtError(f"TensorRT failed to run the backbone engine ({phase})")
        self.stream.synchronize()

    def _upload(self, buffers: dict[str, Any], host: dict[str, np.ndarray]) -> None:
        for name, array in host.items():
            buffers[name].copy_(self.torch.from_numpy(np.ascontiguousarray(array)), non_blocking=True)

    def _kv_inputs(self, context_length: np.ndarray) -> dict[str, Any]:
        """The buffers' leading slots that cover the longest row's context (`StepBackend._context`): the engine's
        K/V inputs have a span dim, so attention reads the live context."""
        keys, values = self._context(self.keys, self.values, context_length)
        feeds = {f"past_key_{i}": k for i, k in enumerate(keys)}
        feeds.update({f"past_value_{i}": v for i, v in enumerate(values)})
        return feeds

    def _encode(self, input_ids: np.ndarray, positions: np.ndarray, context_length: np.ndarray) -> None:
        batch, chunk = input_ids.shape
        host = {
            "input_ids": input_ids.astype(np.int64),
            "positions": np.broadcast_to(positions.astype(np.int64), (batch, chunk)),
            "context_length": context_length.astype(np.int64),
            **no_canvas(batch),
        }
        state = {"context_mask": self.mask, "self_cond": self.self_cond[:, :0], **self._kv_inputs(context_length)}
        phase = encoder_phase(chunk, self.manifest.capacity.canvas)
        buffers = self._buffers(
            phase, {**{n: a.shape for n, a in host.items()}, **{n: tuple(t.shape) for n, t in state.items()}}
        )
        self._upload(buffers, host)
        # An empty self_cond's address may be null, which TensorRT refuses for a bound tensor: bind the buffer itself
        self._run(phase, {**buffers, **state, "self_cond": self.self_cond, "next_self_cond": self.next_self_cond})
        n = len(self.keys)
        write_chunk(
            self.manifest.kv_layout,
            self.keys,
            self.values,
            positions,
            [buffers[f"key_{i}"] for i in range(n)],
            [buffers[f"value_{i}"] for i in range(n)],
        )

    def _denoise(
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
            raise CanvasrtError("the tensorrt backend samples from uniforms (--rng counter)")
        if first_step:
            self.self_cond.zero_()
        batch = canvas.shape[0]
        host = {
            **no_chunk(batch),
            "canvas": canvas,
            "context_length": context_length,
            "temperature": temperature,
            "entropy_bound": entropy_bound,
            "uniforms": draws.uniforms,
            "renoise_ids": draws.renoise_ids,
        }
        state = {
            "self_cond": self.self_cond,
            "context_mask": self.mask,
            "next_self_cond": self.next_self_cond,
            **self._kv_inputs(context_length),
        }
        inputs = {n: t for n, t in state.items() if n != "next_self_cond"}
        buffers = self._buffers(
            "denoise", {**{n: a.shape for n, a in host.items()}, **{n: tuple(t.shape) for n, t in inputs.items()}}
        )
        self._upload(buffers, host)
        self._run("denoise", {**buffers, **state})
        if frozen.any():  # stopped rows keep their state: copy it into the buffer that becomes current
            rows = self.torch.from_numpy(np.flatnonzero(frozen)).to("cuda")
            self.next_self_cond.index_copy_(0, rows, self.self_cond.index_select(0, rows))
        self.self_cond, self.next_self_cond = self.next_self_cond, self.self_cond
        result = {name: buffers[name].cpu().numpy() for name in self.step_outputs}
        return StepResult(
            argmax=result.pop("argmax"),
            next_canvas=result.pop("next_canvas"),
            accepted=result.pop("accepted"),
            entropy=result.pop("entropy"),
            mean_entropy=result.pop("mean_entropy"),
            extras=result,
        )
