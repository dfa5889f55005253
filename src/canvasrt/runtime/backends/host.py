"""The step backend for executors that run the exported graphs on host-memory tensors: ONNX Runtime in process, and
Triton step models called over BLS.

The K/V buffers, the context mask and the self-conditioning state live in this object (host memory) and are fed to
the backbone graph without copies; the loop only exchanges the small per-step tensors with it. Every call runs the
one backbone graph: an encoder call feeds its chunk and empty canvas inputs, a denoising step feeds the canvas and an
empty chunk. A subclass says how the graph runs (`run_backbone`) and how it is loaded, nothing else.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from ...core.contract import encoder_phase, no_canvas, no_chunk
from ...core.errors import ArtifactError, CanvasrtError
from ...core.kv import NUMPY_DTYPES, HostKVBuffers, context_mask
from ...core.manifest import ArtifactManifest
from ..step import Draws, StepBackend, StepResult


class HostGraphBackend(StepBackend):
    ROW_STATE = ("buffers", "mask", "self_cond")

    def __init__(self, manifest: ArtifactManifest):
        super().__init__(manifest)
        self.manifest = manifest
        if manifest.dtype not in NUMPY_DTYPES:
            raise ArtifactError(
                f"{manifest.directory} holds {manifest.dtype} graphs, which cannot be fed from numpy; "
                "export with --dtype fp32 or fp16"
            )
        self.dtype = NUMPY_DTYPES[manifest.dtype]
        self.buffers = HostKVBuffers(manifest.kv_layout, self.dtype)
        self.num_layers = len(manifest.kv_layout)
        self.output_names = manifest.backbone.output_names
        # The graph's static context width, which engines built with a smaller --max-context keep
        self.context_slots = int(manifest.backbone.input("context_mask").shape[1])
        self.self_cond = np.zeros((0, manifest.capacity.canvas, manifest.model.hidden_size), self.dtype)

    @abstractmethod
    def run_backbone(self, phase: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Runs the backbone graph for a call of `phase` (one of core.contract.PHASES) and returns its outputs in
        manifest order."""

    def kv_cache(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [k.copy() for k in self.buffers.keys], [v.copy() for v in self.buffers.values]

    def self_conditioning(self) -> np.ndarray:
        return self.self_cond.copy()

    def set_self_conditioning(self, state: np.ndarray) -> None:
        self.self_cond = np.ascontiguousarray(state, dtype=self.dtype)

    def _start(self, padding: np.ndarray) -> None:
        batch = padding.shape[0]
        if batch > self.spec.capacity.max_batch:
            raise CanvasrtError(
                f"batch of {batch} exceeds the artifacts' max batch {self.spec.capacity.max_batch}; "
                "re-export with a larger --max-batch"
            )
        self.buffers.reset(batch)
        self.mask = context_mask(padding, self.context_slots)
        self.self_cond = np.zeros((batch, self.spec.capacity.canvas, self.spec.model.hidden_size), self.dtype)

    def _kv_feeds(self, context_length: np.ndarray) -> dict[str, np.ndarray]:
        """The K/V inputs: each buffer's leading slots that cover the longest row's context (`StepBackend._context`)."""
        feeds = {}
        for i, (k, v) in enumerate(zip(*self._context(self.buffers.keys, self.buffers.values, context_length))):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = k, v
        return feeds

    def _encode(self, input_ids: np.ndarray, positions: np.ndarray, context_length: np.ndarray) -> None:
        batch, chunk = input_ids.shape
        feeds = {
            "input_ids": input_ids.astype(np.int64, copy=False),
            "positions": np.broadcast_to(positions.astype(np.int64), (batch, chunk)).copy(),
            **no_canvas(batch),
            "self_cond": self.self_cond[:, :0],
            "context_length": context_length.astype(np.int64, copy=False),
            "context_mask": self.mask,
            **self._kv_feeds(context_length),
        }
        out = self.run_backbone(encoder_phase(chunk, self.spec.capacity.canvas), feeds)
        self.buffers.write(positions, out[: self.num_layers], out[self.num_layers : 2 * self.num_layers])

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
            raise CanvasrtError(
                f"the {self.name} backend samples from uniforms (--rng counter); --rng hf needs --backend torch"
            )
        if first_step:
            self.self_cond.fill(0)
        batch = canvas.shape[0]
        feeds = {
            **no_chunk(batch),
            "canvas": canvas,
            "self_cond": self.self_cond,
            "context_length": context_length,
            "context_mask": self.mask,
            "temperature": temperature,
            "entropy_bound": entropy_bound,
            "uniforms": draws.uniforms,
            "renoise_ids": draws.renoise_ids,
            **self._kv_feeds(context_length),
        }
        out = dict(zip(self.output_names, self.run_backbone("denoise", feeds)))
        for name in self.output_names[: 2 * self.num_layers]:
            del out[name]  # the canvas is not committed yet: no encoder tokens, empty K/V
        next_self_cond = out.pop("next_self_cond")
        self.self_cond = np.where(frozen[:, None, None], self.self_cond, next_self_cond)
        return StepResult(
            argmax=out.pop("argmax"),
            next_canvas=out.pop("next_canvas"),
            accepted=out.pop("accepted"),
            entropy=out.pop("entropy"),
            mean_entropy=out.pop("mean_entropy"),
            extras=out,
        )
