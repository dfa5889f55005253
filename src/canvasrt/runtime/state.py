"""One step state, written once: the K/V buffers, the context mask, the self-conditioning state and the slots of a
StepBackend, held on the executor's own device.

The state is written against an array namespace (`Arrays`): `HostArrays` holds numpy arrays (ONNX Runtime's CPU
memory, Triton's host tensors), `TorchArrays` torch tensors on the CPU or a CUDA device (the torch executor, ONNX
Runtime's CUDA and TensorRT execution providers, TensorRT engines). Executors read and write these buffers where they
are, through their addresses (ONNX Runtime IOBinding, TensorRT tensor addresses) or as tensors (torch); the only
arrays that move between the loop's host memory and the device are the ones `StepBackend` converts, and counts.

Slots (in-flight batching): `open(rows)` allocates rows of state once; `clear_row` admits a request into a row,
`move_row` moves one, and `rows(start, stop)` is a view of the leading rows a call runs on: the same memory, so a
call through the view updates the pool in place and nothing is copied back.

The context feed (`context`): a call's K/V inputs are the buffers' leading slots that cover the longest row's context
(`core.contract.kv_spans`), a dense copy unless that is the whole buffer. Within a canvas every denoising step reads
the same context, so the copy is kept until the buffers change (start, a chunk written, a row admitted or moved): one
copy per canvas instead of one per step. `context_copy_bytes` counts what was copied (on the state's device).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from ..core.contract import kv_spans
from ..core.kv import buffer_shapes, context_mask, leading_slots, write_chunk
from ..core.manifest import StepSpec

# The contract's dtype names (model dtypes and tensor dtypes) as numpy dtypes; bf16 through ml_dtypes
NUMPY_TYPES: dict[str, Any] = {
    "fp32": np.float32,
    "float32": np.float32,
    "fp16": np.float16,
    "bf16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "bool": np.bool_,
}
TORCH_TO_NUMPY: dict[str, Any] = {
    "torch.float32": np.float32,
    "torch.float16": np.float16,
    "torch.bfloat16": ml_dtypes.bfloat16,
    "torch.int64": np.int64,
    "torch.bool": np.bool_,
}
CONTEXT_FEEDS = ("kept", "per-step", "full-span")


class Arrays(ABC):
    """The operations the step state and the executors need from an array library, on one device."""

    kind: str  # "numpy" or "torch"
    device: str  # "cpu" or "cuda:N"

    @abstractmethod
    def zeros(self, shape: Sequence[int], dtype: str) -> Any:
        """A zero-filled array of the contract dtype `dtype` on this device."""

    @abstractmethod
    def from_host(self, array: np.ndarray, dtype: str | None = None) -> Any:
        """A host array on this device (and in `dtype` when given): the array itself where nothing needs to move."""

    @abstractmethod
    def to_host(self, array: Any) -> np.ndarray:
        """A host copy the caller owns (bf16 widened to fp32); the device buffer may change after the next call."""

    @abstractmethod
    def keep_rows(self, target: Any, source: Any, keep: np.ndarray) -> None:
        """target[i] = source[i] for every row i where keep[i] is False (in place; keep [B] bool, on the host)."""

    @abstractmethod
    def numpy_type(self, array: Any) -> Any:
        """The array's element type as a numpy dtype (ml_dtypes.bfloat16 for bf16)."""

    @abstractmethod
    def address(self, array: Any) -> int:
        """The device address of a dense array's first element."""

    @staticmethod
    def nbytes(array: Any) -> int:
        return int(array.nbytes) if hasattr(array, "nbytes") else int(array.numel() * array.element_size())


class HostArrays(Arrays):
    """numpy arrays in host memory: ONNX Runtime's CPU provider reads and writes them in place."""

    kind, device = "numpy", "cpu"

    def zeros(self, shape: Sequence[int], dtype: str) -> np.ndarray:
        return np.zeros(tuple(shape), NUMPY_TYPES[dtype])

    def from_host(self, array: np.ndarray, dtype: str | None = None) -> np.ndarray:
        wanted = NUMPY_TYPES[dtype] if dtype else array.dtype
        return np.ascontiguousarray(array, dtype=wanted)

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else np.array(array)

    def keep_rows(self, target: np.ndarray, source: np.ndarray, keep: np.ndarray) -> None:
        if not keep.any():
            target[...] = source
        else:
            np.copyto(target, source, where=~keep.reshape((-1,) + (1,) * (target.ndim - 1)))

    def numpy_type(self, array: np.ndarray) -> Any:
        return array.dtype.type

    def address(self, array: np.ndarray) -> int:
        return int(array.ctypes.data)


class TorchArrays(Arrays):
    """torch tensors on the CPU or a CUDA device ("cpu", "cuda", "cuda:N"). PyTorch is imported on first use, so
    that an executor can be constructed (and refuse to run, with one line) where PyTorch or the GPU is missing."""

    kind = "torch"

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._torch: Any = None

    @property
    def torch(self) -> Any:
        if self._torch is None:
            import torch

            self._torch = torch
            self.types = {
                "fp32": torch.float32,
                "float32": torch.float32,
                "fp16": torch.float16,
                "bf16": torch.bfloat16,
                "int64": torch.int64,
                "bool": torch.bool,
            }
        return self._torch

    def zeros(self, shape: Sequence[int], dtype: str) -> Any:
        torch = self.torch
        return torch.zeros(tuple(shape), dtype=self.types[dtype], device=self.device)

    def from_host(self, array: np.ndarray, dtype: str | None = None) -> Any:
        array = np.ascontiguousarray(array)
        tensor = self.torch.from_numpy(array if array.flags.writeable else array.copy())  # sets self.types first
        return tensor.to(self.device, self.types[dtype] if dtype else None)

    def to_host(self, array: Any) -> np.ndarray:
        if array.dtype == self.torch.bfloat16:
            array = array.float()
        return np.array(array.detach().cpu().numpy())

    def keep_rows(self, target: Any, source: Any, keep: np.ndarray) -> None:
        if not keep.any():
            target.copy_(source)
        else:
            rows = self.torch.from_numpy(np.flatnonzero(~keep)).to(self.device)
            target.index_copy_(0, rows, source.index_select(0, rows))

    def numpy_type(self, array: Any) -> Any:
        return TORCH_TO_NUMPY[str(array.dtype)]

    def address(self, array: Any) -> int:
        return int(array.data_ptr())


class StepState:
    """The per-request state of one StepBackend, on the device of `arrays`; see the module docstring.

    `context_width`: the graphs' static context width (the mask's), which engines built with a smaller --max-context
    keep. A view made by `rows()` shares the pool's memory, its context-feed cache and its copy counter.
    """

    def __init__(self, spec: StepSpec, arrays: Arrays, context_width: int):
        self.spec, self.arrays, self.context_width = spec, arrays, context_width
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.mask: Any = None
        self.self_cond: Any = None
        self.next_self_cond: Any = None  # where a step's next state lands before it replaces self_cond
        self.batch = 0
        self.window: tuple[int, int] | None = None  # the rows of the pool a view covers; None: the pool itself
        self.pool = self
        self.context_feed = "kept"
        self.context_copy_bytes = 0
        self._fed: tuple[Any, list[Any], list[Any]] | None = None  # (window and spans, keys, values) last fed

    # -- allocation and slots ---------------------------------------------------------------------------------------

    def allocate(self, padding: np.ndarray) -> np.ndarray:
        """State for padding.shape[0] rows, zeroed (buffers of the same batch are reused); returns the host mask
        that the caller uploads (padding [B, P]: True for real prompt tokens)."""
        xp, spec, batch = self.arrays, self.spec, padding.shape[0]
        if batch != self.batch:
            self.keys = [xp.zeros(shape, spec.dtype) for shape in buffer_shapes(spec.kv_layout, batch)]
            self.values = [xp.zeros(shape, spec.dtype) for shape in buffer_shapes(spec.kv_layout, batch)]
            shape = (batch, spec.capacity.canvas, spec.model.hidden_size)
            self.self_cond, self.next_self_cond = xp.zeros(shape, spec.dtype), xp.zeros(shape, spec.dtype)
            self.batch = batch
        else:
            for array in (*self.keys, *self.values, self.self_cond):
                array[...] = 0
        self.invalidate()
        return context_mask(padding, self.context_width)

    def release(self) -> None:
        """Drops every buffer (the counters stay)."""
        self.keys, self.values, self.mask, self.self_cond, self.next_self_cond = [], [], None, None, None
        self.batch, self._fed = 0, None

    def clear_row(self, row: int) -> None:
        """Empties one row for a new request (K/V, self-conditioning); its mask row is all context."""
        for array in (*self.keys, *self.values, self.self_cond):
            array[row] = 0
        self.mask[row] = True
        self.invalidate()

    def move_row(self, source: int, destination: int) -> None:
        """Copies a row's state into another row (on the device)."""
        for array in (*self.keys, *self.values, self.self_cond, self.mask):
            array[destination] = array[source]
        self.invalidate()

    def rows(self, start: int, stop: int) -> StepState:
        """A view of rows [start, stop): the same memory, so what a call writes through it lands in the pool."""
        view = StepState.__new__(StepState)
        view.__dict__.update(self.__dict__)
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        view.mask, view.self_cond = self.mask[start:stop], self.self_cond[start:stop]
        view.next_self_cond = self.next_self_cond[start:stop]
        view.batch, view.window, view.pool = stop - start, (start, stop), self
        return view

    # -- what calls read and write ----------------------------------------------------------------------------------

    def invalidate(self) -> None:
        """The buffers changed: the next call copies its context again."""
        self.pool._fed = None

    def context(self, context_length: np.ndarray) -> tuple[list[Any], list[Any]]:
        """The K/V inputs of a call: the buffers' leading slots that cover the longest row's context, the same
        copies as the previous call's while the buffers, the rows and the spans are unchanged."""
        pool, spec = self.pool, self.spec
        longest = spec.capacity.max_context if pool.context_feed == "full-span" else int(context_length.max(initial=0))
        spans = kv_spans(spec.kv_layout, spec.capacity, longest)
        stamp = (self.window, tuple(spans))
        if pool.context_feed == "per-step" or pool._fed is None or pool._fed[0] != stamp:
            pool._fed = None  # the previous copies are dropped before the new ones are made
            keys, values = leading_slots(self.keys, spans), leading_slots(self.values, spans)
            pool.context_copy_bytes += sum(
                self.arrays.nbytes(f) for f, b in zip((*keys, *values), (*self.keys, *self.values)) if f is not b
            )
            pool._fed = (stamp, keys, values)
        return pool._fed[1], pool._fed[2]

    def write(self, positions: np.ndarray, new_keys: Sequence[Any], new_values: Sequence[Any]) -> None:
        """A chunk's K/V [B, heads, S, d] written at its positions [S]."""
        write_chunk(self.spec.kv_layout, self.keys, self.values, positions, new_keys, new_values)
        self.invalidate()

    def begin_canvas(self, first_step: np.ndarray) -> None:
        """Rows starting a canvas (first_step [B] bool) start from a zero self-conditioning state."""
        if first_step.all():
            self.self_cond[...] = 0
        elif first_step.any():
            for row in np.flatnonzero(first_step):
                self.self_cond[int(row)] = 0

    def advance(self, next_self_cond: Any, frozen: np.ndarray) -> None:
        """After a step: its next self-conditioning state becomes the state, except in frozen rows (stopped
        canvases), copied on the device."""
        self.arrays.keep_rows(self.self_cond, next_self_cond, frozen)

    # -- inspection -------------------------------------------------------------------------------------------------

    def kv_cache(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [self.arrays.to_host(k) for k in self.keys], [self.arrays.to_host(v) for v in self.values]

    def self_conditioning(self) -> np.ndarray:
        return self.arrays.to_host(self.self_cond)

    def set_self_conditioning(self, state: np.ndarray) -> None:
        self.self_cond[...] = self.arrays.from_host(np.asarray(state, dtype=np.float32), self.spec.dtype)
