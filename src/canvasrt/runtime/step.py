"""The step interface every backend implements, and the plain data that crosses it.

A backend owns everything that is large: the K/V buffers of the committed context, the context mask, and the
self-conditioning state carried between denoising steps. The loop hands it only small per-step tensors (canvas,
schedule values, random draws) and gets small ones back, so nothing of size [batch, canvas, vocabulary] and no K/V
cache moves between host and backend per step. Backends count the bytes that do cross, per kind of call
(`transfer_bytes["denoise"]` and so on), which is what the bytes-per-step test checks.

Lifecycle, as in Polygraphy's runners: `activate()` once (load graphs, engines or weights; check them against the
manifest), then per request `start()`, `encode()` for each prefill chunk and commit, `denoise()` per step;
`deactivate()` at the end. `with backend:` does both. Activating twice or running an inactive backend is refused;
a backend left active when it is collected warns. Subclasses implement the underscored methods only.

`kv_cache()`, `self_conditioning()` and `set_self_conditioning()` expose the state for inspection, so that parity
compares any backend through this interface alone.

Context feeds: a call's K/V inputs are the buffers' leading slots that cover the longest row's context
(`core.contract.kv_spans`), a dense copy unless that is the whole buffer. Within a canvas every denoising step reads
the same context, so `_context()` keeps the copy until the buffers change (start, encode, admit, move_slot): one copy
per canvas instead of one per step (at the released width and 8192 tokens of context, 335 MB of fp32 K/V per row
and step). The kept copy stays resident between calls: one span of the full layers' K/V per row, no more than a
step's own peak. `context_copy_bytes` counts what was copied.

Slots (in-flight batching, `canvasrt.runtime.scheduler`): `open_slots(n)` allocates n rows of state once; each row
is one request's slot. `admit()` clears one row, `encode_slot()` runs a chunk for one row alone (batch 1 on views
of that row's buffers), `denoise_rows(n, ...)` runs one step over rows [0, n), and `move_slot()` moves a row's state
to another slot. The scheduler keeps the rows that denoise packed in [0, n): a step then reads the buffers' leading
rows as they are (a view, no K/V gather), and a leaving row costs one row copy, once. All of it is implemented here,
over the state buffers a backend names in ROW_STATE, so every backend gets it with the same meaning.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.contract import kv_spans
from ..core.errors import CanvasrtError
from ..core.kv import leading_slots
from ..core.manifest import StepSpec


@dataclass
class Draws:
    """The random inputs of one denoising step.

    `uniforms` [B, C] drive inverse-CDF sampling (portable: every backend, every graph). `exponentials`
    [B*C, V] reproduce torch.multinomial exactly (argmax(p / q)); only the torch backend accepts them.
    """

    renoise_ids: np.ndarray
    uniforms: np.ndarray | None = None
    exponentials: Any = None  # torch.Tensor when present; kept out of numpy to avoid a [B*C, V] copy


@dataclass
class StepResult:
    argmax: np.ndarray  # [B, C] int64
    next_canvas: np.ndarray  # [B, C] int64
    accepted: np.ndarray  # [B, C] bool
    entropy: np.ndarray  # [B, C] float32
    mean_entropy: np.ndarray  # [B] float32
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # sampled, and logits when the graph has them


def _narrow(buffer: Any, start: int, stop: int) -> Any:
    if isinstance(buffer, list):
        return [b[start:stop] for b in buffer]
    if hasattr(buffer, "rows"):  # HostKVBuffers
        return buffer.rows(start, stop)
    return buffer[start:stop]


def _arrays(buffer: Any) -> list[Any]:
    if isinstance(buffer, list):
        return buffer
    if hasattr(buffer, "arrays"):
        return buffer.arrays()
    return [buffer]


CONTEXT_FEEDS = ("kept", "per-step", "full-span")


class StepBackend(ABC):
    """One denoising-step executor: torch, onnxruntime, tensorrt, or Triton step models (triton-bls)."""

    name: str = "?"
    # Attributes holding per-request state whose first axis is the row (numpy arrays or torch tensors, lists of
    # them, or a HostKVBuffers). ROW_SCRATCH: row-first buffers a call overwrites before reading (no state).
    ROW_STATE: tuple[str, ...] = ("keys", "values", "mask", "self_cond")
    ROW_SCRATCH: tuple[str, ...] = ()
    # How a call's K/V inputs are fed (CONTEXT_FEEDS): "kept", the live context's slots copied once per canvas;
    # "per-step", copied again at every call; "full-span", every slot of the buffers. The last two are the controls
    # that `scripts/context_cost.py` measures the first against.
    context_feed: str = "kept"

    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec
        self.transfer_bytes: dict[str, int] = {"start": 0, "encode": 0, "denoise": 0}
        self.context_copy_bytes = 0
        self._active = False
        self._window: tuple[int, int] | None = None  # the rows a slot call runs on (`_rows`); None: all of them
        self._fed: tuple[Any, list[Any], list[Any]] | None = None  # (rows and spans, keys, values) of the last feed

    # -- lifecycle --------------------------------------------------------------------------------------------------

    @property
    def is_active(self) -> bool:
        return self._active

    def preflight(self) -> None:  # noqa: B027 (a hook: most executors need no check before loading)
        """Checks what activate() will need (libraries, devices) without loading anything; raises CanvasrtError."""

    def activate(self) -> None:
        """Loads whatever the backend runs (graphs, engines, weights) and checks it against the manifest."""
        if self._active:
            raise RuntimeError(f"the {self.name} backend is already active; deactivate it first")
        self.preflight()
        self._activate()
        self._active = True

    def deactivate(self) -> None:
        """Releases what activate() loaded."""
        if not self._active:
            raise RuntimeError(f"the {self.name} backend is not active")
        try:
            self._deactivate()
        finally:
            self._active = False
            self._fed = None

    def __enter__(self) -> StepBackend:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def __del__(self) -> None:
        if getattr(self, "_active", False):
            warnings.warn(
                f"the {self.name} backend was activated but never deactivated; use `with backend:`",
                ResourceWarning,
                stacklevel=2,
            )

    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError(f"the {self.name} backend is not active; call activate() or use `with backend:`")

    # -- one request ------------------------------------------------------------------------------------------------

    def start(self, padding: np.ndarray) -> None:
        """Begins a request: allocates (or clears) the K/V buffers for padding.shape[0] rows.

        padding [B, P] bool: True for real prompt tokens, False for left padding; later positions are all real.
        """
        self._require_active()
        self._fed = None
        self._start(padding)
        self._count("start", padding)

    def encode(self, input_ids: np.ndarray, positions: np.ndarray, context_length: np.ndarray) -> None:
        """Runs the encoder over a chunk and writes its K/V into the buffers at `positions` [S]."""
        self._require_active()
        self._encode(input_ids, positions, context_length)
        self._fed = None
        self._count("encode", input_ids, positions, context_length)

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
        """One denoising step. first_step: start from a zero self-conditioning state. frozen [B] bool: rows that
        have stopped; their self-conditioning state is kept as it was."""
        self._require_active()
        result = self._denoise(canvas, context_length, temperature, entropy_bound, draws, first_step, frozen)
        self._count_denoise(canvas, context_length, temperature, entropy_bound, draws, frozen, result)
        return result

    # -- slots: many requests, each in its own row ----------------------------------------------------------------

    @property
    def slots(self) -> int:
        """Rows of the slot pool (0 before open_slots)."""
        return getattr(self, "_slots", 0)

    def open_slots(self, rows: int) -> None:
        """Allocates a pool of `rows` request slots, all empty; replaces whatever start() set up."""
        self._require_active()
        if not 1 <= rows <= self.spec.capacity.max_batch:
            raise CanvasrtError(
                f"{rows} slots do not fit the max batch {self.spec.capacity.max_batch}; "
                "re-export with a larger --max-batch"
            )
        self._fed = None
        self._start(np.ones((rows, 1), dtype=bool))  # no left padding: every slot's prompt starts at position 0
        self._slots = rows

    def admit(self, slot: int) -> None:
        """Clears one slot for a new request (its K/V, context mask and self-conditioning rows only)."""
        self._check_slot(slot)
        self._fed = None
        for name in self.ROW_STATE:
            for array in _arrays(getattr(self, name)):
                array[slot] = 0
        self.mask[slot] = True  # every backend's context mask; a slot's prompt has no left padding

    def move_slot(self, source: int, destination: int) -> None:
        """Moves a request's state from one slot to another (the source keeps a stale copy until admitted again)."""
        self._check_slot(source)
        self._check_slot(destination)
        self._fed = None
        for name in self.ROW_STATE:
            for array in _arrays(getattr(self, name)):
                array[destination] = array[source]

    def encode_slot(self, slot: int, input_ids: np.ndarray, positions: np.ndarray, context_length: np.ndarray) -> None:
        """encode() for one slot: input_ids [1, S], context_length [1]; the other rows are neither read nor written."""
        self._check_slot(slot)
        with self._rows(slot, slot + 1):
            self._encode(input_ids, positions, context_length)
        self._fed = None
        self._count("encode", input_ids, positions, context_length)

    def denoise_rows(
        self,
        rows: int,
        canvas: np.ndarray,
        context_length: np.ndarray,
        temperature: np.ndarray,
        entropy_bound: np.ndarray,
        draws: Draws,
        first_step: np.ndarray,
        frozen: np.ndarray,
    ) -> StepResult:
        """denoise() over slots [0, rows), with first_step [rows] bool per row; every array is [rows, ...]."""
        self._require_active()
        if not 1 <= rows <= self.slots:
            raise RuntimeError(f"denoise_rows({rows}) outside the {self.slots} open slots")
        with self._rows(0, rows):
            if first_step.any():
                for array in _arrays(self.self_cond):  # a new canvas starts from a zero self-conditioning state
                    array[np.flatnonzero(first_step)] = 0
            result = self._denoise(canvas, context_length, temperature, entropy_bound, draws, False, frozen)
        self._count_denoise(canvas, context_length, temperature, entropy_bound, draws, frozen, result)
        return result

    def _check_slot(self, slot: int) -> None:
        self._require_active()
        if not 0 <= slot < self.slots:
            raise RuntimeError(f"slot {slot} outside the {self.slots} open slots; call open_slots() first")

    @contextmanager
    def _rows(self, start: int, stop: int) -> Iterator[None]:
        """Runs a call on rows [start, stop) of the pool: the state attributes become views of those rows for its
        duration; state a call replaced instead of updating in place (self-conditioning) is copied back."""
        pool = {name: getattr(self, name) for name in (*self.ROW_STATE, *self.ROW_SCRATCH)}
        views = {name: _narrow(buffer, start, stop) for name, buffer in pool.items()}
        for name, view in views.items():
            setattr(self, name, view)
        self._window = (start, stop)
        try:
            yield
            for name in self.ROW_STATE:
                now = getattr(self, name)
                if now is not views[name]:
                    for target, source in zip(_arrays(pool[name]), _arrays(now)):
                        target[start:stop] = source
        finally:
            self._window = None
            for name, buffer in pool.items():
                setattr(self, name, buffer)

    def _context(self, keys: list[Any], values: list[Any], context_length: np.ndarray) -> tuple[list[Any], list[Any]]:
        """The K/V inputs of a call over these buffers: their leading slots that cover the longest row's context,
        the same copies as the previous call's while the buffers, the rows and the spans are unchanged."""
        longest = (
            self.spec.capacity.max_context if self.context_feed == "full-span" else int(context_length.max(initial=0))
        )
        spans = kv_spans(self.spec.kv_layout, self.spec.capacity, longest)
        stamp = (self._window, tuple(spans))
        if self.context_feed == "per-step" or self._fed is None or self._fed[0] != stamp:
            self._fed = None  # the previous copies are dropped before the new ones are made
            fed_keys, fed_values = leading_slots(keys, spans), leading_slots(values, spans)
            self.context_copy_bytes += sum(
                int(f.nbytes) for f, b in zip((*fed_keys, *fed_values), (*keys, *values)) if f is not b
            )
            self._fed = (stamp, fed_keys, fed_values)
        return self._fed[1], self._fed[2]

    # -- inspection -------------------------------------------------------------------------------------------------

    @abstractmethod
    def kv_cache(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Host copies of the per-layer K and V buffers [B, heads, slots, head_dim] (parity and debugging)."""

    @abstractmethod
    def self_conditioning(self) -> np.ndarray:
        """A host copy of the self-conditioning state [B, C, H] the next step starts from."""

    @abstractmethod
    def set_self_conditioning(self, state: np.ndarray) -> None:
        """Replaces the self-conditioning state (parity feeds the reference's soft embedding)."""

    # -- what a backend implements ----------------------------------------------------------------------------------

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _deactivate(self) -> None: ...

    @abstractmethod
    def _start(self, padding: np.ndarray) -> None: ...

    @abstractmethod
    def _encode(self, input_ids: np.ndarray, positions: np.ndarray, context_length: np.ndarray) -> None: ...

    @abstractmethod
    def _denoise(
        self,
        canvas: np.ndarray,
        context_length: np.ndarray,
        temperature: np.ndarray,
        entropy_bound: np.ndarray,
        draws: Draws,
        first_step: bool,
        frozen: np.ndarray,
    ) -> StepResult: ...

    def _count_denoise(
        self,
        canvas: np.ndarray,
        context_length: np.ndarray,
        temperature: np.ndarray,
        entropy_bound: np.ndarray,
        draws: Draws,
        frozen: np.ndarray,
        result: StepResult,
    ) -> None:
        sent = [canvas, context_length, temperature, entropy_bound, draws.renoise_ids, frozen]
        received = [result.argmax, result.next_canvas, result.accepted, result.entropy, result.mean_entropy]
        self._count(
            "denoise",
            *sent,
            *([draws.uniforms] if draws.uniforms is not None else []),
            *received,
            *result.extras.values(),
        )

    def _count(self, call: str, *arrays: np.ndarray) -> None:
        self.transfer_bytes[call] += sum(int(a.nbytes) for a in arrays)
