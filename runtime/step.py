"""The step interface every backend implements, and the plain data that crosses it.

A backend owns everything that is large: the K/V buffers of the committed context, the context mask, and the
self-conditioning state carried between denoising steps. The loop hands it only small per-step tensors (canvas,
schedule values, random draws) and gets small ones back, so nothing of size [batch, canvas, vocabulary] and no K/V
cache moves between host and backend per step. Backends count the bytes that do cross, per kind of call
(`transfer_bytes["denoise"]` and so on), which is what the bytes-per-step test checks.

Lifecycle, as in Polygraphy's runners: `activate()` once (load graphs or weights), then per request `start()`,
`encode()` for each prefill chunk and commit, `denoise()` per step; `deactivate()` at the end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # debug outputs (logits) when the graph has them


class StepBackend(ABC):
    """One denoising-step executor. Implementations: torch, onnxruntime (and tensorrt, later)."""

    name: str = "?"

    def __init__(self) -> None:
        self.transfer_bytes: dict[str, int] = {"start": 0, "encode": 0, "denoise": 0}

    @abstractmethod
    def activate(self) -> None:
        """Loads whatever the backend runs (graphs, engines, weights)."""

    def deactivate(self) -> None:
        """Releases what activate() loaded."""

    @property
    @abstractmethod
    def manifest(self) -> dict[str, Any]:
        """The artifact manifest (or the equivalent for a checkpoint) describing model and capacities."""

    @abstractmethod
    def start(self, padding: np.ndarray) -> None:
        """Begins a request: allocates (or clears) the K/V buffers for padding.shape[0] rows.

        padding [B, P] bool: True for real prompt tokens, False for left padding; later positions are all real.
        """

    @abstractmethod
    def encode(self, input_ids: np.ndarray, positions: np.ndarray, context_length: np.ndarray) -> None:
        """Runs the encoder over a chunk and writes its K/V into the buffers at `positions`."""

    @abstractmethod
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

    # -- helpers for the byte accounting ---------------------------------------------------------------------------

    def _count(self, call: str, *arrays: np.ndarray) -> None:
        self.transfer_bytes[call] += sum(int(a.nbytes) for a in arrays)

    def __enter__(self) -> "StepBackend":
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()
