"""The step interface the loop and the scheduler run on: one `StepBackend` over any executor.

A StepBackend pairs an executor (runtime/executor.py: loads, runs one phase, unloads) with one step state
(runtime/state.py: K/V buffers, context mask, self-conditioning state, slots, the context feed) held on the
executor's own device. It builds every call's inputs from the state and the loop's small per-call arrays (the same
code for every executor), and builds the step result from the graph's outputs in one place.

What crosses between host and device, defined here and counted here only (`crossing`): the arrays the loop hands in
and gets back per call, converted by `_send` and `_receive`: a chunk's ids, positions and context lengths; a step's
canvas, schedule values, random draws, first-step and frozen flags, and its per-row results. For an executor whose
state lives on the host (ONNX Runtime on the CPU) these are the bytes the loop exchanges with it; for one on a GPU,
the bytes over PCIe. An executor that keeps no state between calls (`Capabilities.keeps_state` False: Triton step
models over BLS) is also sent the K/V context and the self-conditioning state and sends back the new K/V and state
with every call, and those bytes are counted too. Where the executor keeps the state, a denoising step moves only
canvas-sized arrays: no K/V, nothing of size [batch, canvas, hidden] or [batch, canvas, vocabulary] (unless a debug
export returns logits).

Lifecycle, as in Polygraphy's runners: `activate()` once (the executor loads), then per request `start()`, `encode()`
for each prefill chunk and commit, `denoise()` per step; `deactivate()` at the end. `with backend:` does both.
Activating twice or running an inactive backend is refused; a backend left active when it is collected warns.

Slots (in-flight batching, `canvasrt.runtime.scheduler`): `open_slots(n)` allocates n rows of state once; each row is
one request's slot. `admit()` clears one row, `encode_slot()` runs a chunk for one row alone, `denoise_rows(n, ...)`
runs one step over rows [0, n), and `move_slot()` moves a row's state to another slot, on the device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.contract import encoder_phase, no_canvas, no_chunk
from ..core.errors import CanvasrtError
from .executor import Executor
from .state import CONTEXT_FEEDS, StepState

CALLS = ("prefill", "commit", "denoise")  # the kinds of call whose crossing bytes are counted


@dataclass
class Draws:
    """The random inputs of one denoising step.

    `uniforms` [B, C] drive inverse-CDF sampling (portable: every executor, every graph). `exponentials`
    [B*C, V] reproduce torch.multinomial exactly (argmax(p / q)); only executors that declare the "exponentials"
    draw accept them.
    """

    renoise_ids: np.ndarray
    uniforms: np.ndarray | None = None
    exponentials: Any = None  # torch.Tensor when present; kept out of numpy to avoid a [B*C, V] copy


@dataclass
class StepInputs:
    """One denoising step's inputs, all [B] or [B, C] host arrays.

    first_step: rows whose canvas starts at this step (zero self-conditioning state); frozen: rows that have stopped,
    whose self-conditioning state is kept as it was."""

    canvas: np.ndarray
    context_length: np.ndarray
    temperature: np.ndarray
    entropy_bound: np.ndarray
    draws: Draws
    first_step: np.ndarray
    frozen: np.ndarray

    @classmethod
    def uniform(
        cls,
        canvas: np.ndarray,
        context_length: np.ndarray,
        temperature: float,
        entropy_bound: float,
        draws: Draws,
        first_step: bool,
        frozen: np.ndarray | None = None,
    ) -> StepInputs:
        """Inputs whose schedule values and first-step flag are the same for every row (one batch, one canvas)."""
        batch = canvas.shape[0]
        return cls(
            canvas,
            np.asarray(context_length, np.int64),
            np.full(batch, temperature, np.float32),
            np.full(batch, entropy_bound, np.float32),
            draws,
            np.full(batch, first_step),
            np.zeros(batch, bool) if frozen is None else frozen,
        )


@dataclass
class StepResult:
    argmax: np.ndarray  # [B, C] int64
    next_canvas: np.ndarray  # [B, C] int64
    accepted: np.ndarray  # [B, C] bool
    entropy: np.ndarray  # [B, C] float32
    mean_entropy: np.ndarray  # [B] float32
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # sampled, and logits when the graph has them

    @classmethod
    def from_outputs(cls, outputs: dict[str, np.ndarray]) -> StepResult:
        """The result of a denoising step from the host copies of the graph's sampler outputs."""
        rest = dict(outputs)
        return cls(
            argmax=rest.pop("argmax"),
            next_canvas=rest.pop("next_canvas"),
            accepted=rest.pop("accepted"),
            entropy=rest.pop("entropy"),
            mean_entropy=rest.pop("mean_entropy"),
            extras=rest,
        )


def _is_state_output(name: str) -> bool:
    return name.startswith(("key_", "value_")) or name == "next_self_cond"


class StepBackend:
    """The loop's view of one executor and its state; see the module docstring."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.spec = executor.spec
        self.state = StepState(executor.spec, executor.arrays, executor.context_width)
        self.crossing: dict[str, int] = dict.fromkeys(("start", *CALLS), 0)  # bytes, per kind of call
        self.calls: dict[str, int] = dict.fromkeys(("start", *CALLS), 0)
        self._active = False
        self._slots = 0

    @property
    def name(self) -> str:
        return self.executor.name

    @property
    def context_feed(self) -> str:
        """How a call's K/V inputs are fed (CONTEXT_FEEDS): "kept", the live context's slots copied once per canvas;
        "per-step", copied at every call; "full-span", every slot of the buffers (the controls that
        `scripts/context_cost.py` measures the first against)."""
        return self.state.context_feed

    @context_feed.setter
    def context_feed(self, feed: str) -> None:
        if feed not in CONTEXT_FEEDS:
            raise CanvasrtError(f"unknown context feed {feed!r}; use one of {', '.join(CONTEXT_FEEDS)}")
        self.state.context_feed = feed

    @property
    def context_copy_bytes(self) -> int:
        return self.state.context_copy_bytes

    def reset_counters(self) -> None:
        """Zeroes the crossing and context-copy counters (a benchmark's warm-up run is not counted)."""
        self.crossing = dict.fromkeys(self.crossing, 0)
        self.calls = dict.fromkeys(self.calls, 0)
        self.state.context_copy_bytes = 0

    def bytes_per_call(self) -> dict[str, float]:
        """Bytes crossed per call of each kind (prefill, commit, denoise), 0 for a kind not called."""
        return {kind: self.crossing[kind] / self.calls[kind] if self.calls[kind] else 0.0 for kind in CALLS}

    # -- lifecycle --------------------------------------------------------------------------------------------------

    @property
    def is_active(self) -> bool:
        return self._active

    def preflight(self) -> None:
        self.executor.preflight()

    def activate(self) -> None:
        """Loads whatever the executor runs (graph, engine, weights) and checks it against the manifest."""
        if self._active:
            raise RuntimeError(f"the {self.name} backend is already active; deactivate it first")
        self.executor.preflight()
        self.executor.load()
        self._active = True

    def deactivate(self) -> None:
        """Releases what activate() loaded, and the state."""
        if not self._active:
            raise RuntimeError(f"the {self.name} backend is not active")
        try:
            self.executor.unload()
        finally:
            self._active = False
            self.state.release()
            self._slots = 0

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
        """Begins a request: allocates (or clears) the state for padding.shape[0] rows.

        padding [B, P] bool: True for real prompt tokens, False for left padding; later positions are all real.
        """
        self._require_active()
        self._allocate(padding)
        self._slots = 0

    @property
    def takes_images(self) -> bool:
        """Whether the executor's backbone places image soft tokens (artifacts exported with the vision graph, or
        a checkpoint with a vision tower on torch)."""
        return self.executor.vision is not None

    def encode(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        context_length: np.ndarray,
        images: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Runs the encoder over a chunk and writes its K/V into the buffers at `positions` [S]. images: the
        chunk's soft tokens [n, H] (host float32) and the row of them each token takes [B, S] (-1: text)."""
        self._require_active()
        self._encode(self.state, input_ids, positions, context_length, images)

    def denoise(self, step: StepInputs) -> StepResult:
        """One denoising step over every row of the state."""
        self._require_active()
        return self._denoise(self.state, step)

    # -- slots: many requests, each in its own row ----------------------------------------------------------------

    @property
    def slots(self) -> int:
        """Rows of the slot pool (0 before open_slots)."""
        return self._slots

    def open_slots(self, rows: int) -> None:
        """Allocates a pool of `rows` request slots, all empty; replaces whatever start() set up."""
        self._require_active()
        if not 1 <= rows <= self.spec.capacity.max_batch:
            raise CanvasrtError(
                f"{rows} slots do not fit the max batch {self.spec.capacity.max_batch}; "
                "re-export with a larger --max-batch"
            )
        self._allocate(np.ones((rows, 1), dtype=bool))  # no left padding: every slot's prompt starts at position 0
        self._slots = rows

    def admit(self, slot: int) -> None:
        """Clears one slot for a new request (its K/V, context mask and self-conditioning rows only)."""
        self._check_slot(slot)
        self.state.clear_row(slot)

    def move_slot(self, source: int, destination: int) -> None:
        """Moves a request's state from one slot to another (the source keeps a stale copy until admitted again)."""
        self._check_slot(source)
        self._check_slot(destination)
        self.state.move_row(source, destination)

    def encode_slot(
        self,
        slot: int,
        input_ids: np.ndarray,
        positions: np.ndarray,
        context_length: np.ndarray,
        images: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """encode() for one slot: input_ids [1, S], context_length [1]; the other rows are neither read nor written."""
        self._check_slot(slot)
        self._encode(self.state.rows(slot, slot + 1), input_ids, positions, context_length, images)

    def denoise_rows(self, rows: int, step: StepInputs) -> StepResult:
        """denoise() over slots [0, rows); every array of `step` is [rows, ...]."""
        self._require_active()
        if not 1 <= rows <= self.slots:
            raise RuntimeError(f"denoise_rows({rows}) outside the {self.slots} open slots")
        return self._denoise(self.state.rows(0, rows), step)

    def _check_slot(self, slot: int) -> None:
        self._require_active()
        if not 0 <= slot < self.slots:
            raise RuntimeError(f"slot {slot} outside the {self.slots} open slots; call open_slots() first")

    # -- inspection -------------------------------------------------------------------------------------------------

    def kv_cache(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Host copies of the per-layer K and V buffers [B, heads, slots, head_dim] (parity and debugging)."""
        return self.state.kv_cache()

    def self_conditioning(self) -> np.ndarray:
        """A host copy of the self-conditioning state [B, C, H] the next step starts from."""
        return self.state.self_conditioning()

    def set_self_conditioning(self, state: np.ndarray) -> None:
        """Replaces the self-conditioning state (parity feeds the reference's soft embedding)."""
        self.state.set_self_conditioning(state)

    # -- every call, for every executor -----------------------------------------------------------------------------

    def _allocate(self, padding: np.ndarray) -> None:
        batch = padding.shape[0]
        if batch > self.spec.capacity.max_batch:
            raise CanvasrtError(
                f"batch of {batch} exceeds the max batch {self.spec.capacity.max_batch}; "
                "re-export with a larger --max-batch"
            )
        mask = self.state.allocate(padding)
        self.state.mask = self._send("start", {"context_mask": mask})["context_mask"]
        self.calls["start"] += 1

    def _encode(
        self,
        state: StepState,
        input_ids: np.ndarray,
        positions: np.ndarray,
        context_length: np.ndarray,
        images: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        batch, chunk = input_ids.shape
        phase = encoder_phase(chunk, self.spec.capacity.canvas)
        host = {
            "input_ids": input_ids.astype(np.int64, copy=False),
            "positions": np.broadcast_to(positions.astype(np.int64), (batch, chunk)),
            **no_canvas(batch),
            "context_length": np.asarray(context_length, np.int64),
        }
        out = self._call(phase, state, host, state.self_cond[:, :0], {}, self._image_feeds(phase, batch, chunk, images))
        layers = len(self.spec.kv_layout)
        state.write(positions, [out[f"key_{i}"] for i in range(layers)], [out[f"value_{i}"] for i in range(layers)])

    def _denoise(self, state: StepState, step: StepInputs) -> StepResult:
        draws = step.draws
        if draws.exponentials is not None and "exponentials" not in self.executor.capabilities.draws:
            raise CanvasrtError(
                f"the {self.name} executor samples from uniforms (--rng counter); --rng hf needs --backend torch"
            )
        if draws.uniforms is None and draws.exponentials is None:
            raise CanvasrtError("a denoising step needs uniforms or exponentials to sample from")
        state.begin_canvas(step.first_step)
        batch = step.canvas.shape[0]
        host = {
            **no_chunk(batch),
            "canvas": step.canvas,
            "context_length": step.context_length,
            "temperature": step.temperature,
            "entropy_bound": step.entropy_bound,
            "renoise_ids": draws.renoise_ids,
        }
        if draws.uniforms is not None:
            host["uniforms"] = draws.uniforms
        extra = self._image_feeds("denoise", batch, 0, None)
        if draws.exponentials is not None:
            extra["exponentials"] = draws.exponentials
        out = self._call("denoise", state, host, state.self_cond, {"next_self_cond": state.next_self_cond}, extra)
        state.advance(out["next_self_cond"], step.frozen)
        self.crossing["denoise"] += step.first_step.nbytes + step.frozen.nbytes
        if draws.exponentials is not None:  # [B*C, V]: the --rng hf path moves a vocabulary row per position
            self.crossing["denoise"] += self.executor.arrays.nbytes(draws.exponentials)
        results = self._receive("denoise", {n: a for n, a in out.items() if not _is_state_output(n)})
        return StepResult.from_outputs(results)

    def _image_feeds(
        self, kind: str, batch: int, chunk: int, images: tuple[np.ndarray, np.ndarray] | None
    ) -> dict[str, Any]:
        """The image inputs of a backbone that takes them (none, for one that does not): the call's soft tokens in
        the model dtype on the executor's device, and their slots; empty for text and for every other call."""
        if not self.takes_images:
            if images is not None:
                raise CanvasrtError(
                    f"the {self.name} backend's model takes no images (artifacts exported without --vision, or a "
                    "checkpoint without a vision tower); re-export with --vision or drop the images"
                )
            return {}
        if images is None:
            tokens = np.zeros((0, self.spec.model.hidden_size), np.float32)
            slot = np.full((batch, chunk), -1, np.int64)
        else:
            tokens, slot = images
        feeds = {"image_tokens": self.executor.arrays.from_host(tokens, self.spec.dtype)}
        feeds.update(self._send(kind, {"image_slot": slot}))
        self.crossing[kind] += self.executor.arrays.nbytes(feeds["image_tokens"])
        return feeds

    def _call(
        self,
        phase: str,
        state: StepState,
        host: dict[str, np.ndarray],
        self_cond: Any,
        outputs: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One executor call: the host arrays sent to the executor's device, the state's buffers as they are."""
        kind = phase
        feeds = self._send(kind, host)
        keys, values = state.context(host["context_length"])
        stateful: dict[str, Any] = {"self_cond": self_cond, "context_mask": state.mask}
        for i, (k, v) in enumerate(zip(keys, values)):
            stateful[f"past_key_{i}"], stateful[f"past_value_{i}"] = k, v
        out = self.executor.run(phase, {**feeds, **stateful, **(extra or {})}, outputs)
        self.calls[kind] += 1
        if not self.executor.capabilities.keeps_state:  # the state travels with the call, both ways
            xp = self.executor.arrays
            self.crossing[kind] += sum(xp.nbytes(a) for a in stateful.values())
            self.crossing[kind] += sum(xp.nbytes(a) for n, a in out.items() if _is_state_output(n))
        return out

    def _send(self, kind: str, host: dict[str, np.ndarray]) -> dict[str, Any]:
        """Host arrays onto the executor's device: every byte that crosses on the way in is counted here."""
        self.crossing[kind] += sum(int(a.nbytes) for a in host.values())
        xp = self.executor.arrays
        return {name: xp.from_host(array) for name, array in host.items()}

    def _receive(self, kind: str, outputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Executor outputs back to the host: every byte that crosses on the way out is counted here."""
        xp = self.executor.arrays
        host = {name: xp.to_host(array) for name, array in outputs.items()}
        self.crossing[kind] += sum(int(a.nbytes) for a in host.values())
        return host
