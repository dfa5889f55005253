"""The ONNX Runtime executor: runs backbone.onnx of an artifact directory, one session for every phase, through
IOBinding on buffers of its own device.

The state's buffers (K/V, context mask, self-conditioning) and every other input are bound by address, and every
output is bound to a buffer of the executor's device, so a call copies nothing between host and device that
`StepBackend` did not send: with the CPU provider the buffers are numpy arrays (no PyTorch is imported); with the
CUDA provider and the TensorRT execution provider (`tensorrt-ep`) they are torch tensors on the GPU, bound by the same
code. Element types go to ONNX Runtime as ONNX type numbers, so bf16 artifacts run too (numpy holds bf16 through
ml_dtypes).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ...core.contract import MODEL_DTYPE, ONNX_TYPES, VISION_MAX_IMAGES, check_io
from ...core.errors import ArtifactError, CanvasrtError
from ...core.manifest import ArtifactManifest
from ..executor import Executor, output_shape
from ..state import Arrays, HostArrays, TorchArrays
from . import EXECUTORS

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt-ep": "TensorrtExecutionProvider",
}
# ONNX TensorProto element types by numpy dtype name (bfloat16: ml_dtypes)
ELEMENT_TYPES = {"float32": 1, "int64": 7, "bool": 9, "float16": 10, "bfloat16": 16}


def check_provider(provider: str) -> str:
    """The execution provider's ONNX Runtime name, or a one-line error saying how to get that provider."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise CanvasrtError(f"unknown ONNX Runtime provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        raise CanvasrtError(
            f"this ONNX Runtime ({ort.__version__}) has no {wanted}; install canvasrt[gpu] (onnxruntime-gpu) on a "
            "machine with that GPU stack, or use --provider cpu"
        )
    return str(wanted)


def create_session(path: Path, provider: str = "cpu", threads: int | None = None) -> Any:
    """An InferenceSession on the named provider, or a one-line error saying how to get that provider."""
    import onnxruntime as ort

    wanted = check_provider(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The exporter page-aligns external weights, so the CPU provider maps them from the file instead of copying
    # them; prepacking would still make a second, repacked copy of every GEMM weight in anonymous memory. It bought
    # no measurable step time on the bench preset (docs/PERFORMANCE.md, the one-copy section).
    options.add_session_config_entry("session.disable_prepacking", "1")
    # Nodes run in the graph's own order where their inputs allow: the default order runs every vocabulary chunk's
    # LM head and softmax before the self-conditioning products that consume them, so every chunk's [rows, canvas,
    # chunk] tensors are alive at once (docs/PERFORMANCE.md, what a step keeps alive).
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads:
        options.intra_op_num_threads = threads
    providers = [wanted] if wanted == PROVIDERS["cpu"] else [wanted, PROVIDERS["cpu"]]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ONNX Runtime raises its own Fail/InvalidProtobuf/... types, all for a bad graph file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"ONNX Runtime cannot load {path} ({first}); re-export it") from None


def checked_session(
    manifest: ArtifactManifest, provider: str = "cpu", threads: int | None = None, graph: str = "backbone"
) -> Any:
    """A graph's session (the backbone's by default), refused (one line) when the graph's inputs or outputs differ
    from the manifest's in name, dtype or static shape: what the backend and `canvasrt verify` check."""
    entry = manifest.graphs[graph]
    path = manifest.graph_path(graph)
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


class OnnxVisionEncoder:
    """The vision graph (vision.onnx) on an ONNX Runtime session of its own, checked against the manifest on load;
    at most VISION_MAX_IMAGES images per call, as its profile declares."""

    def __init__(self, manifest: ArtifactManifest, provider: str, threads: int | None):
        self.session = checked_session(manifest, provider, threads, "vision")

    def encode(self, pixel_values: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens, masks = [], []
        for begin in range(0, pixel_values.shape[0], VISION_MAX_IMAGES):
            end = begin + VISION_MAX_IMAGES
            feeds = {"pixel_values": pixel_values[begin:end], "image_position_ids": positions[begin:end]}
            soft, real = self.session.run(["soft_tokens", "soft_token_mask"], feeds)
            tokens.append(np.asarray(soft, np.float32))
            masks.append(np.asarray(real, bool))
        return np.concatenate(tokens), np.concatenate(masks)


class OutputBuffers:
    """One reusable buffer per output name on the executor's device, grown to the largest call seen: a call's output
    is the leading elements viewed in its shape (dense), so outputs never allocate after warm-up."""

    def __init__(self, arrays: Arrays):
        self.arrays = arrays
        self.flat: dict[str, Any] = {}
        self.views: dict[tuple[str, tuple[int, ...]], Any] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: str) -> Any:
        view = self.views.get((name, shape))
        if view is None:
            size = math.prod(shape)
            flat = self.flat.get(name)
            if flat is None or flat.shape[0] < max(size, 1):
                flat = self.flat[name] = self.arrays.zeros((max(size, 1),), dtype)
                self.views = {key: v for key, v in self.views.items() if key[0] != name}
            view = self.views[(name, shape)] = flat[:size].reshape(shape)
        return view


def device_of(arrays: Arrays) -> tuple[str, int]:
    """ONNX Runtime's device type and id for the arrays' device."""
    kind, _, index = arrays.device.partition(":")
    return kind, int(index or 0)


class OnnxRuntimeExecutor(Executor):
    name = "onnxruntime"

    def __init__(self, manifest: ArtifactManifest, provider: str = "cpu", threads: int | None = None):
        if provider not in PROVIDERS:
            raise CanvasrtError(f"unknown ONNX Runtime provider {provider!r}; use one of {', '.join(PROVIDERS)}")
        self.manifest, self.spec = manifest, manifest
        self.provider, self.threads = provider, threads
        on_gpu = provider != "cpu"
        self.capabilities = replace(EXECUTORS["onnxruntime"], devices=("cuda",) if on_gpu else ("cpu",))
        self.arrays: Arrays = TorchArrays("cuda:0") if on_gpu else HostArrays()
        self.context_width = int(manifest.backbone.input("context_mask").shape[1])
        self.outputs = {spec.name: spec for spec in manifest.backbone.outputs}
        self.session: Any = None
        self.vision = manifest.vision
        self._vision: OnnxVisionEncoder | None = None

    def preflight(self) -> None:
        """The GPU providers keep the state in PyTorch CUDA tensors (GPU machines have PyTorch; the CPU provider
        never imports it): refused with one line where the provider, PyTorch or its GPU is missing."""
        check_provider(self.provider)
        if self.provider == "cpu":
            return
        try:
            import torch
        except ImportError:
            raise CanvasrtError(
                f"--provider {self.provider} keeps the state on the GPU in PyTorch CUDA tensors, and PyTorch is not "
                "installed; install canvasrt[gpu]"
            ) from None
        if not torch.cuda.is_available():
            raise CanvasrtError(
                f"--provider {self.provider} needs a CUDA GPU, and PyTorch sees none; use --provider cpu"
            )

    def load(self) -> None:
        self.session = checked_session(self.manifest, self.provider, self.threads)
        self.buffers = OutputBuffers(self.arrays)
        self.bindings: dict[str, tuple[Any, dict[str, tuple[int, tuple[int, ...], int]]]] = {}
        self.element_types: dict[Any, int] = {}
        self.device_type, self.device_id = device_of(self.arrays)

    def vision_encoder(self) -> OnnxVisionEncoder:
        if self.vision is None:
            return super().vision_encoder()
        if self._vision is None:
            self._vision = OnnxVisionEncoder(self.manifest, self.provider, self.threads)
        return self._vision

    def unload(self) -> None:
        self._vision = None
        self.session, self.bindings = None, {}
        self.buffers = OutputBuffers(self.arrays)

    def run(self, phase: str, feeds: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        binding, bound = self._binding(phase)
        for name, array in feeds.items():
            self._bind(binding.bind_input, bound, name, array)
        dims = {
            "batch": feeds["context_length"].shape[0],
            "chunk": feeds["input_ids"].shape[1],
            "rows": feeds["canvas"].shape[1],
        }
        results = {}
        for name, spec in self.outputs.items():
            array = outputs.get(name)
            if array is None:
                dtype = self.manifest.dtype if spec.dtype == MODEL_DTYPE else spec.dtype
                array = self.buffers.get(name, output_shape(spec, dims), dtype)
            self._bind(binding.bind_output, bound, name, array)
            results[name] = array
        self.session.run_with_iobinding(binding)
        return results

    def _binding(self, phase: str) -> tuple[Any, dict[str, tuple[int, tuple[int, ...], int]]]:
        """The IOBinding of a phase, kept across its calls with what each name is bound to: a call rebinds only
        the names whose buffer changed (the K/V context, the state and the outputs stay bound within a canvas)."""
        if phase not in self.bindings:
            self.bindings[phase] = (self.session.io_binding(), {})
        return self.bindings[phase]

    def _bind(self, bind: Any, bound: dict[str, tuple[int, tuple[int, ...], int]], name: str, array: Any) -> None:
        key = (self.arrays.address(array), tuple(array.shape), self._element_type(array))
        if bound.get(name) != key:
            bind(name, self.device_type, self.device_id, key[2], key[1], key[0])
            bound[name] = key

    def _element_type(self, array: Any) -> int:
        element = self.element_types.get(array.dtype)
        if element is None:
            element = self.element_types[array.dtype] = ELEMENT_TYPES[np.dtype(self.arrays.numpy_type(array)).name]
        return element
