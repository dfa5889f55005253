"""PyTorch backend: the export-friendly model itself (the module the exporter traces), run eagerly from a checkpoint.

It is the only backend that accepts exponential draws, which reproduce torch.multinomial and with them
transformers' generate() bit for bit (`--rng hf`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...exporter.checkpoint import DTYPES, Checkpoint
from ...exporter.errors import CanvasrtError
from ...exporter.graphs import Capacity
from ..kv import LayerBuffer, slot_index
from ..step import Draws, StepBackend, StepResult


class TorchBackend(StepBackend):
    name = "torch"

    def __init__(
        self,
        checkpoint_dir: str | Path,
        dtype: str = "fp32",
        moe: str = "dense",
        max_batch: int = 16,
        max_context: int | None = None,
        threads: int | None = None,
        calibration: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.checkpoint = Checkpoint.open(checkpoint_dir)
        config = self.checkpoint.config
        if dtype not in DTYPES:
            raise CanvasrtError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        self.dtype, self.moe, self.threads = dtype, moe, threads
        self.calibration = calibration  # FP8 scales to simulate (calibration.json of FP8 artifacts)
        context = max_context or min(config.max_position_embeddings, 4096)
        self.capacity = Capacity.for_model(config, max_batch, context, None)
        self.layout = [
            LayerBuffer(layer.num_kv_heads, layer.head_dim, self.capacity.slots(layer.kind),
                        self.capacity.slots(layer.kind) < context)
            for layer in config.layers
        ]
        # The same shape of description an artifact directory carries, so the loop reads one kind of manifest.
        self._manifest = {
            "model": config.to_dict(),
            "capacity": self.capacity.__dict__,
            "dtype": dtype,
            "moe": moe,
            "generation": self.checkpoint.generation_config(),
            "source": str(Path(checkpoint_dir)),
        }
        self.model: Any = None

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def activate(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        self.model = self.checkpoint.load_text_model(moe=self.moe, dtype=self.dtype)
        if self.calibration is not None:
            from ...calibration.fake_quant import apply_fake_quantization

            apply_fake_quantization(self.model, self.calibration)

    def deactivate(self) -> None:
        self.model = None

    def start(self, padding: np.ndarray) -> None:
        batch = padding.shape[0]
        torch_dtype = DTYPES[self.dtype]
        self.keys = [torch.zeros(batch, b.num_kv_heads, b.slots, b.head_dim, dtype=torch_dtype) for b in self.layout]
        self.values = [torch.zeros_like(k) for k in self.keys]
        mask = torch.ones(batch, self.capacity.max_context, dtype=torch.bool)
        mask[:, : padding.shape[1]] = torch.from_numpy(padding)
        self.mask = mask
        self.self_cond = torch.zeros(batch, self.capacity.canvas, self.model.config.hidden_size, dtype=torch_dtype)
        self._count("start", padding)

    @torch.inference_mode()
    def encode(self, input_ids: np.ndarray, positions: np.ndarray, context_length: np.ndarray) -> None:
        batch = input_ids.shape[0]
        pos = torch.from_numpy(positions.astype(np.int64))
        new_k, new_v = self.model.encode(
            torch.from_numpy(input_ids),
            pos[None].expand(batch, -1),
            self.keys,
            self.values,
            torch.from_numpy(context_length),
            self.mask,
        )
        for layer, k_buf, v_buf, k, v in zip(self.layout, self.keys, self.values, new_k, new_v):
            keep, slots = slot_index(layer, positions)
            k_buf[:, :, torch.from_numpy(slots)] = k[:, :, torch.from_numpy(keep)]
            v_buf[:, :, torch.from_numpy(slots)] = v[:, :, torch.from_numpy(keep)]
        self._count("encode", input_ids, positions, context_length)

    @torch.inference_mode()
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
        if first_step:
            self.self_cond.zero_()
        out = self.model.denoise(
            torch.from_numpy(canvas),
            self.self_cond,
            self.keys,
            self.values,
            torch.from_numpy(context_length),
            self.mask,
            torch.from_numpy(temperature),
            torch.from_numpy(entropy_bound),
            None if draws.uniforms is None else torch.from_numpy(draws.uniforms),
            torch.from_numpy(draws.renoise_ids),
            exponentials=draws.exponentials,
        )
        keep = torch.from_numpy(frozen)[:, None, None]
        self.self_cond = torch.where(keep, self.self_cond, out.next_self_cond)
        self._count("denoise", canvas, context_length, temperature, entropy_bound, draws.renoise_ids, frozen)
        if draws.uniforms is not None:
            self._count("denoise", draws.uniforms)
        result = StepResult(
            argmax=out.argmax.numpy(),
            next_canvas=out.next_canvas.numpy(),
            accepted=out.accepted.numpy(),
            entropy=out.entropy.numpy(),
            mean_entropy=out.mean_entropy.numpy(),
        )
        self._count("denoise", result.argmax, result.next_canvas, result.accepted, result.entropy, result.mean_entropy)
        return result
