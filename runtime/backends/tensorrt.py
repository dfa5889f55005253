"""TensorRT backend: runs the engines of `canvasrt build` on an NVIDIA GPU (full TensorRT; SM90 for H100).

Device memory is held in PyTorch CUDA tensors (GPU machines have PyTorch; the ONNX Runtime path stays torch-free).
Buffers are planned once per batch size: the per-layer K/V cache and the context mask stay resident on the GPU,
the self-conditioning state ping-pongs between two device buffers, and a step moves only the small per-step
tensors between host and device. The encoder picks the `commit` optimization profile for canvas-sized chunks and
`prefill` otherwise.

Everything that does not need a GPU (manifest and version checks, profile selection, buffer planning) is plain
functions tested on CPU. The class itself has not run yet (no GPU with TensorRT was available where it was written);
tests/test_typecheck.py checks it with mypy against TensorRT's API as the `tensorrt-stubs` package describes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...exporter.builder import ENGINE_FORMAT
from ...exporter.errors import ArtifactError, CanvasrtError
from ..kv import LayerBuffer, slot_index
from ..step import Draws, StepBackend, StepResult

if TYPE_CHECKING:  # the module imports TensorRT only in activate()
    import tensorrt as trt


def read_engine_manifest(directory: Path) -> dict[str, Any]:
    path = directory / "manifest.json"
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise ArtifactError(f"{directory} has no readable manifest.json; pass the output of `canvasrt build`") from None
    if manifest.get("format") != ENGINE_FORMAT:
        raise ArtifactError(f"{directory} is not an engine directory (run `canvasrt build` on the artifacts)")
    return manifest


def check_engines_fit(manifest: dict[str, Any], tensorrt_version: str, compute_capability: tuple[int, int]) -> None:
    """Refuses engines built by another TensorRT or for another GPU, before deserialising them fails obscurely."""
    key = manifest["key"]
    if key["builder"] != "tensorrt":
        raise CanvasrtError(f"these engines were built with {key['builder']}; the tensorrt backend runs `--builder tensorrt` engines")
    if key["builder_version"] != tensorrt_version:
        raise CanvasrtError(f"engines built with TensorRT {key['builder_version']}, this is TensorRT {tensorrt_version}; "
                            "rebuild them with `canvasrt build`")
    local = f"sm{compute_capability[0]}{compute_capability[1]}"
    if key["target"] not in ("current", local):
        raise CanvasrtError(f"engines built for {key['target']}, this GPU is {local}; rebuild them here with `canvasrt build`")


def select_profile(graph: dict[str, Any], batch: int, chunk: int | None = None) -> int:
    """Index of the first optimization profile (in manifest order) whose ranges hold batch (and chunk)."""
    for index, dims in enumerate(graph["profiles"].values()):
        if dims["batch"][0] <= batch <= dims["batch"][2] and (
            chunk is None or dims["chunk"][0] <= chunk <= dims["chunk"][2]
        ):
            return index
    raise CanvasrtError(f"no optimization profile of these engines takes batch {batch}"
                        + (f" with a chunk of {chunk}" if chunk is not None else "") + "; rebuild with a larger capacity")


@dataclass(frozen=True)
class BufferPlan:
    """Shapes (and dtypes) of everything allocated once per batch size."""

    kv: list[tuple[int, ...]]
    context_mask: tuple[int, int]
    self_cond: tuple[int, int, int]
    dtype: str

    @property
    def device_bytes(self) -> int:
        width = {"fp32": 4, "fp16": 2, "bf16": 2}[self.dtype]
        kv = 2 * sum(int(np.prod(s)) for s in self.kv) * width
        return kv + int(np.prod(self.context_mask)) + 2 * int(np.prod(self.self_cond)) * width


def plan_buffers(manifest: dict[str, Any], batch: int) -> BufferPlan:
    cap = manifest["capacity"]
    if batch > cap["max_batch"]:
        raise CanvasrtError(f"batch of {batch} exceeds the engines' max batch {cap['max_batch']}")
    # The mask spans the graphs' static context, which `canvasrt build --max-context` leaves as exported while it
    # lowers capacity.max_context (the longest request the loop accepts).
    mask = next(s for s in manifest["engines"]["denoise"]["inputs"] if s["name"] == "context_mask")
    return BufferPlan(
        kv=[(batch, e["num_kv_heads"], e["slots"], e["head_dim"]) for e in manifest["kv_layout"]],
        context_mask=(batch, int(mask["shape"][1])),
        self_cond=(batch, cap["canvas"], manifest["model"]["hidden_size"]),
        dtype=manifest["precision"],
    )


class TensorRTBackend(StepBackend):
    name = "tensorrt"

    def __init__(self, engine_dir: str | Path, device: int = 0):
        super().__init__()
        self.directory = Path(engine_dir)
        self._manifest = read_engine_manifest(self.directory)
        self.device = device
        self.layout = [
            LayerBuffer(e["num_kv_heads"], e["head_dim"], e["slots"], e["slots"] < self._manifest["capacity"]["max_context"])
            for e in self._manifest["kv_layout"]
        ]

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def activate(self) -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise CanvasrtError(f"the tensorrt backend needs TensorRT and PyTorch with CUDA ({exc}); install "
                                "canvasrt[gpu] on a machine with an NVIDIA GPU") from None
        if not hasattr(trt, "Runtime"):
            raise CanvasrtError("the installed `tensorrt` is not a working TensorRT (only stubs or a placeholder); "
                                "install canvasrt[gpu] on a machine with an NVIDIA GPU")

        if not torch.cuda.is_available():
            raise CanvasrtError("the tensorrt backend needs a CUDA GPU; none is visible to PyTorch")
        torch.cuda.set_device(self.device)
        check_engines_fit(self._manifest, trt.__version__, torch.cuda.get_device_capability(self.device))
        self.torch, self.trt = torch, trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines: dict[str, trt.ICudaEngine] = {}
        self.contexts: dict[str, trt.IExecutionContext] = {}
        for name, entry in self._manifest["engines"].items():
            engine = self.runtime.deserialize_cuda_engine((self.directory / entry["file"]).read_bytes())
            if engine is None:
                raise CanvasrtError(f"TensorRT could not load {entry['file']}; rebuild the engines on this machine")
            context = engine.create_execution_context()
            if context is None:
                raise CanvasrtError(f"TensorRT could not create an execution context for {entry['file']}")
            self.engines[name] = engine
            self.contexts[name] = context
        self.stream = torch.cuda.Stream()
        self.torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self._manifest["precision"]]

    def deactivate(self) -> None:
        self.contexts, self.engines = {}, {}

    def _device(self, array: np.ndarray, kind: str) -> Any:
        self._count(kind, array)
        return self.torch.from_numpy(np.ascontiguousarray(array)).to("cuda", non_blocking=True)

    def start(self, padding: np.ndarray) -> None:
        torch = self.torch
        plan = plan_buffers(self._manifest, padding.shape[0])
        self.keys = [torch.zeros(shape, dtype=self.torch_dtype, device="cuda") for shape in plan.kv]
        self.values = [torch.zeros_like(k) for k in self.keys]
        mask = np.ones(plan.context_mask, dtype=bool)
        mask[:, : padding.shape[1]] = padding
        self.mask = self._device(mask, "start")
        self.self_cond = torch.zeros(plan.self_cond, dtype=self.torch_dtype, device="cuda")
        self.next_self_cond = torch.empty_like(self.self_cond)

    def _run(self, graph: str, profile: int, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        context = self.contexts[graph]
        context.set_optimization_profile_async(profile, self.stream.cuda_stream)
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise CanvasrtError(f"TensorRT failed to run the {graph} engine")
        self.stream.synchronize()

    def _kv_inputs(self) -> dict[str, Any]:
        feeds = {f"past_key_{i}": k for i, k in enumerate(self.keys)}
        feeds.update({f"past_value_{i}": v for i, v in enumerate(self.values)})
        return feeds

    def encode(self, input_ids: np.ndarray, positions: np.ndarray, context_length: np.ndarray) -> None:
        torch = self.torch
        batch, chunk = input_ids.shape
        graph = self._manifest["engines"]["encode"]
        profile = select_profile(graph, batch, chunk)
        inputs = {
            "input_ids": self._device(input_ids.astype(np.int64), "encode"),
            "positions": self._device(np.broadcast_to(positions.astype(np.int64), (batch, chunk)), "encode"),
            "context_length": self._device(context_length.astype(np.int64), "encode"),
            "context_mask": self.mask,
            **self._kv_inputs(),
        }
        new_keys = [torch.empty(b, h, chunk, d, dtype=self.torch_dtype, device="cuda")
                    for b, h, _, d in (k.shape for k in self.keys)]
        new_values = [torch.empty_like(k) for k in new_keys]
        outputs = {f"key_{i}": k for i, k in enumerate(new_keys)}
        outputs.update({f"value_{i}": v for i, v in enumerate(new_values)})
        self._run("encode", profile, inputs, outputs)
        for layer, k_buf, v_buf, k, v in zip(self.layout, self.keys, self.values, new_keys, new_values):
            keep, slots = slot_index(layer, positions)
            index = torch.from_numpy(slots).to("cuda")
            source = torch.from_numpy(keep).to("cuda")
            k_buf.index_copy_(2, index, k.index_select(2, source))
            v_buf.index_copy_(2, index, v.index_select(2, source))

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
        torch = self.torch
        if draws.uniforms is None:
            raise CanvasrtError("the tensorrt backend samples from uniforms (--rng counter)")
        if first_step:
            self.self_cond.zero_()
        batch, width = canvas.shape
        graph = self._manifest["engines"]["denoise"]
        inputs = {
            "canvas": self._device(canvas, "denoise"),
            "self_cond": self.self_cond,
            "context_length": self._device(context_length, "denoise"),
            "context_mask": self.mask,
            "temperature": self._device(temperature, "denoise"),
            "entropy_bound": self._device(entropy_bound, "denoise"),
            "uniforms": self._device(draws.uniforms, "denoise"),
            "renoise_ids": self._device(draws.renoise_ids, "denoise"),
            **self._kv_inputs(),
        }
        small = {
            **({"logits": torch.empty(batch, width, self._manifest["model"]["vocab_size"], dtype=torch.float32,
                                      device="cuda")} if any(o["name"] == "logits" for o in graph["outputs"]) else {}),
            "sampled": torch.empty(batch, width, dtype=torch.int64, device="cuda"),
            "argmax": torch.empty(batch, width, dtype=torch.int64, device="cuda"),
            "entropy": torch.empty(batch, width, dtype=torch.float32, device="cuda"),
            "accepted": torch.empty(batch, width, dtype=torch.bool, device="cuda"),
            "next_canvas": torch.empty(batch, width, dtype=torch.int64, device="cuda"),
            "mean_entropy": torch.empty(batch, dtype=torch.float32, device="cuda"),
        }
        self._run("denoise", select_profile(graph, batch), inputs, {**small, "next_self_cond": self.next_self_cond})
        keep = self._device(frozen, "denoise")[:, None, None]
        self.self_cond, self.next_self_cond = torch.where(keep, self.self_cond, self.next_self_cond), self.self_cond
        host = {name: tensor.cpu().numpy() for name, tensor in small.items()}
        self._count("denoise", *host.values())
        return StepResult(
            argmax=host["argmax"],
            next_canvas=host["next_canvas"],
            accepted=host["accepted"],
            entropy=host["entropy"],
            mean_entropy=host["mean_entropy"],
            extras={k: host[k] for k in ("sampled", "logits") if k in host},
        )
