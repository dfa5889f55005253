"""PyTorch backend: the export-friendly model itself (the module the exporter traces), run eagerly from a checkpoint.

It is the only backend that accepts exponential draws, which reproduce torch.multinomial and with them
transformers' generate() bit for bit (`--rng hf`). Given a calibration record it simulates FP8 artifacts with their
own scales (`canvasrt.model.fp8`). By default it runs the sparse MoE formulation, each expert on its routed tokens
only, so a step costs what the active parameters cost (the dense formulation runs every expert on every token:
num_experts / top_k times the work, 16x for the released model). It runs on CPU or CUDA (`device`), in any dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core.contract import DEFAULT_VOCAB_CHUNK, Capacity, kv_layout
from ...core.errors import CanvasrtError
from ...core.kv import context_mask, write_chunk
from ...core.manifest import Quantization, StepSpec
from ...model.checkpoint import DTYPES, Checkpoint, torch_device
from ..step import Draws, StepBackend, StepResult


class TorchBackend(StepBackend):
    name = "torch"

    def __init__(
        self,
        checkpoint_dir: str | Path,
        dtype: str = "fp32",
        moe: str = "sparse",
        max_batch: int = 16,
        max_context: int | None = None,
        threads: int | None = None,
        calibration: dict[str, Any] | None = None,
        device: str = "cpu",
        vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    ):
        if dtype not in DTYPES:
            raise CanvasrtError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        self.device = torch_device(device)
        self.checkpoint = Checkpoint.open(checkpoint_dir)
        config = self.checkpoint.config
        capacity = Capacity.for_model(config, max_batch, max_context or min(config.max_position_embeddings, 4096), None)
        quantization = Quantization.from_calibration(calibration) if calibration is not None else None
        super().__init__(
            StepSpec(
                config, capacity, kv_layout(config, capacity), dtype, self.checkpoint.generation_config(), quantization
            )
        )
        self.dtype, self.moe, self.threads, self.vocab_chunk = dtype, moe, threads, vocab_chunk
        self.calibration = calibration  # FP8 scales to simulate (calibration.json of FP8 artifacts)
        self.model: Any = None

    def _activate(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        self.model = self.checkpoint.load_text_model(
            moe=self.moe, dtype=self.dtype, device=self.device, vocab_chunk=self.vocab_chunk
        )
        if self.calibration is not None:
            from ...model.fp8 import apply_fake_quantization

            apply_fake_quantization(self.model, self.calibration)

    def _deactivate(self) -> None:
        self.model = None

    def kv_cache(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [_host(k.float()) for k in self.keys], [_host(v.float()) for v in self.values]

    def self_conditioning(self) -> np.ndarray:
        return _host(self.self_cond.float())

    def set_self_conditioning(self, state: np.ndarray) -> None:
        self.self_cond = self._tensor(np.asarray(state, dtype=np.float32)).to(DTYPES[self.dtype])

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _start(self, padding: np.ndarray) -> None:
        batch = padding.shape[0]
        torch_dtype = DTYPES[self.dtype]
        self.keys = [
            torch.zeros(batch, b.num_kv_heads, b.slots, b.head_dim, dtype=torch_dtype, device=self.device)
            for b in self.spec.kv_layout
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.mask = self._tensor(context_mask(padding, self.spec.capacity.max_context))
        self.self_cond = torch.zeros(
            batch, self.spec.capacity.canvas, self.spec.model.hidden_size, dtype=torch_dtype, device=self.device
        )

    @torch.inference_mode()
    def _encode(self, input_ids: np.ndarray, positions: np.ndarray, context_length: np.ndarray) -> None:
        batch = input_ids.shape[0]
        pos = self._tensor(positions.astype(np.int64))
        keys, values = self._context(self.keys, self.values, context_length)
        new_k, new_v = self.model.encode(
            self._tensor(input_ids),
            pos[None].expand(batch, -1),
            keys,
            values,
            self._tensor(context_length),
            self.mask,
        )
        write_chunk(self.spec.kv_layout, self.keys, self.values, positions, new_k, new_v)

    @torch.inference_mode()
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
        if first_step:
            self.self_cond.zero_()
        keys, values = self._context(self.keys, self.values, context_length)
        out = self.model.denoise(
            self._tensor(canvas),
            self.self_cond,
            keys,
            values,
            self._tensor(context_length),
            self.mask,
            self._tensor(temperature),
            self._tensor(entropy_bound),
            None if draws.uniforms is None else self._tensor(draws.uniforms),
            self._tensor(draws.renoise_ids),
            exponentials=None if draws.exponentials is None else draws.exponentials.to(self.device),
        )
        keep = self._tensor(frozen)[:, None, None]
        self.self_cond = torch.where(keep, self.self_cond, out.next_self_cond)
        return StepResult(
            argmax=_host(out.argmax),
            next_canvas=_host(out.next_canvas),
            accepted=_host(out.accepted),
            entropy=_host(out.entropy),
            mean_entropy=_host(out.mean_entropy),
        )


def _host(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy the caller owns (a view of a CPU tensor would change under the next in-place update)."""
    return np.array(tensor.cpu().numpy())
