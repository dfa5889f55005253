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
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


class StepBackend(ABC):
    """One denoising-step executor: torch, onnxruntime, tensorrt, or Triton step models (triton-bls)."""

    name: str = "?"

    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec
        self.transfer_bytes: dict[str, int] = {"start": 0, "encode": 0, "denoise": 0}
        self._active = False

    # -- lifecycle --------------------------------------------------------------------------------------------------

    @property
    def is_active(self) -> bool:
        return self._active

    def preflight(self) -> None:
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

    def __enter__(self) -> "StepBackend":
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def __del__(self) -> None:
        if getattr(self, "_active", False):
            warnings.warn(f"the {self.name} backend was activated but never deactivated; use `with backend:`",
                          ResourceWarning, stacklevel=2)

    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError(f"the {self.name} backend is not active; call activate() or use `with backend:`")

    # -- one request ------------------------------------------------------------------------------------------------

    def start(self, padding: np.ndarray) -> None:
        """Begins a request: allocates (or clears) the K/V buffers for padding.shape[0] rows.

        padding [B, P] bool: True for real prompt tokens, False for left padding; later positions are all real.
        """
        self._require_active()
        self._start(padding)
        self._count("start", padding)

    def encode(self, input_ids: np.ndarray, positions: np.ndarray, context_length: np.ndarray) -> None:
        """Runs the encoder over a chunk and writes its K/V into the buffers at `positions` [S]."""
        self._require_active()
        self._encode(input_ids, positions, context_length)
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
        sent = [canvas, context_length, temperature, entropy_bound, draws.renoise_ids, frozen]
        received = [result.argmax, result.next_canvas, result.accepted, result.entropy, result.mean_entropy]
        self._count("denoise", *sent, *([draws.uniforms] if draws.uniforms is not None else []), *received,
                    *result.extras.values())
        return result

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
    def _denoise(self, canvas: np.ndarray, context_length: np.ndarray, temperature: np.ndarray,
                 entropy_bound: np.ndarray, draws: Draws, first_step: bool, frozen: np.ndarray) -> StepResult: ...

    def _count(self, call: str, *arrays: np.ndarray) -> None:
        self.transfer_bytes[call] += sum(int(a.nbytes) for a in arrays)
