"""What an executor is: a small class that loads a model, runs one phase of the backbone on bound buffers, and
unloads it. It knows nothing of requests, slots or the loop; `StepBackend` (runtime/step.py) holds the state and
builds every call's inputs, the same for every executor.

An executor runs the backbone's contract (`core.contract.backbone_io`): `run(phase, feeds)` takes the inputs by name,
as arrays of its own namespace on its own device (`arrays`), and returns the outputs the phase produces by name, in
the same namespace: `key_i`/`value_i` for an encoder phase (prefill, commit); for a denoising step the sampler's
outputs and `next_self_cond`, which it writes into `outputs["next_self_cond"]` when the caller passes that buffer
(so the state's own memory receives it). Returned arrays stay valid until the next call.

Each executor declares what it can do (`Capabilities`) instead of being recognised by its name: where it runs, the
dtypes it runs, the draws it samples from, and whether the state it is fed stays on its device between calls (every
executor in process) or travels with every call (Triton step models over BLS).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..core.config import VisionConfig
from ..core.contract import PHASES, TensorSpec
from ..core.errors import CanvasrtError
from ..core.manifest import StepSpec
from .images import VisionEncoder
from .state import Arrays


@dataclass(frozen=True)
class Capabilities:
    devices: tuple[str, ...]  # "cpu", "cuda"
    dtypes: tuple[str, ...]  # model dtypes it runs: fp32, fp16, bf16
    phases: tuple[str, ...] = PHASES
    draws: tuple[str, ...] = ("uniforms",)  # "exponentials": reproduces torch.multinomial (--rng hf)
    keeps_state: bool = True  # False: the K/V and self-conditioning state cross to the executor with every call
    targets: tuple[str, ...] = ("artifacts",)  # what it opens: artifacts, engines, checkpoint


class Executor(ABC):
    """One backbone executor; see the module docstring. Subclasses set `name`, `capabilities`, `spec`, `arrays`
    and `context_width` in their constructor (cheap: nothing is loaded there)."""

    name: str = "?"
    capabilities: Capabilities
    spec: StepSpec
    arrays: Arrays
    context_width: int  # the graph's static context-mask width
    vision: VisionConfig | None = None  # set where the backbone places image soft tokens (image_tokens, image_slot)

    def preflight(self) -> None:  # noqa: B027 (a hook: most executors need no check before loading)
        """Checks what load() needs (libraries, devices) without loading anything; raises CanvasrtError."""

    @abstractmethod
    def load(self) -> None:
        """Loads what the executor runs (graph, engine, weights) and checks it against the manifest."""

    @abstractmethod
    def unload(self) -> None:
        """Releases what load() loaded."""

    @abstractmethod
    def run(self, phase: str, feeds: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        """Runs the backbone for `phase` (core.contract.PHASES) on `feeds`; `outputs` holds buffers the caller wants
        outputs written into (by name; any subset). Returns the phase's outputs by name."""

    @property
    def device(self) -> str:
        return self.arrays.device

    def vision_encoder(self) -> VisionEncoder:
        """The encoder of image soft tokens that goes with this backbone (the vision graph, or the vision model),
        loaded on first use; refused, in one line, where the backbone takes no images."""
        raise CanvasrtError(
            f"the {self.name} executor's model takes no images (artifacts exported without --vision, or a "
            "checkpoint without a vision tower); re-export with --vision or drop the images"
        )


def output_shape(spec: TensorSpec, dims: dict[str, int]) -> tuple[int, ...]:
    """An output's shape for a call: the contract's symbolic dims (batch, chunk, rows) resolved from `dims`."""
    return tuple(dims[d] if isinstance(d, str) else d for d in spec.shape)
