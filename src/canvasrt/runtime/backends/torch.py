"""The torch executor: the export-friendly model itself (the module the exporter traces), run eagerly from a
checkpoint, on tensors kept on its own device.

It is the only executor that accepts exponential draws, which reproduce torch.multinomial and with them
transformers' generate() bit for bit (`--rng hf`). Given a calibration record it simulates FP8 artifacts with their
own scales (`canvasrt.model.fp8`). By default it runs the sparse MoE formulation, each expert on its routed tokens
only, so a step costs what the active parameters cost (the dense formulation runs every expert on every token:
num_experts / top_k times the work, 16x for the released model). It runs on CPU or CUDA (`device`), in any dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...core.contract import DEFAULT_VOCAB_CHUNK, Capacity, kv_layout
from ...core.errors import CanvasrtError
from ...core.manifest import Quantization, StepSpec
from ...model.checkpoint import DTYPES, PREPROCESSOR_CONFIG, Checkpoint, torch_device
from ..executor import Executor
from ..state import TorchArrays
from . import EXECUTORS


class TorchExecutor(Executor):
    name = "torch"
    capabilities = EXECUTORS["torch"]

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
        self.arrays = TorchArrays(torch_device(device))
        self.checkpoint = Checkpoint.open(checkpoint_dir)
        config = self.checkpoint.config
        capacity = Capacity.for_model(config, max_batch, max_context or min(config.max_position_embeddings, 4096), None)
        quantization = Quantization.from_calibration(calibration) if calibration is not None else None
        self.spec = StepSpec(
            config, capacity, kv_layout(config, capacity), dtype, self.checkpoint.generation_config(), quantization
        )
        self.context_width = capacity.max_context
        self.dtype, self.moe, self.threads, self.vocab_chunk = dtype, moe, threads, vocab_chunk
        self.calibration = calibration  # FP8 scales to simulate (calibration.json of FP8 artifacts)
        self.model: Any = None
        # Images where the checkpoint has a vision tower and the image processor's settings to feed it
        has_processor = (self.checkpoint.path / PREPROCESSOR_CONFIG).is_file()
        self.vision = self.checkpoint.vision if has_processor else None
        self._vision: TorchVisionEncoder | None = None

    def load(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        self.model = self.checkpoint.load_text_model(
            moe=self.moe, dtype=self.dtype, device=self.device, vocab_chunk=self.vocab_chunk
        )
        if self.calibration is not None:
            from ...model.fp8 import apply_fake_quantization

            apply_fake_quantization(self.model, self.calibration)

    def vision_encoder(self) -> TorchVisionEncoder:
        if self.vision is None:
            return super().vision_encoder()
        if self._vision is None:
            model = self.checkpoint.load_vision_model(dtype=self.dtype, device=self.device)
            if self.calibration is not None:  # a vision graph calibrated with --quantize-vision, simulated likewise
                from ...model.fp8 import VISION_QUANTIZED, apply_fake_quantization

                apply_fake_quantization(model, self.calibration, VISION_QUANTIZED)
            self._vision = TorchVisionEncoder(model, self.device)
        return self._vision

    def unload(self) -> None:
        self.model = None
        self._vision = None

    @torch.inference_mode()
    def run(self, phase: str, feeds: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        layers = len(self.spec.kv_layout)
        keys = [feeds[f"past_key_{i}"] for i in range(layers)]
        values = [feeds[f"past_value_{i}"] for i in range(layers)]
        if phase != "denoise":
            new_k, new_v = self.model.encode(
                feeds["input_ids"],
                feeds["positions"],
                keys,
                values,
                feeds["context_length"],
                feeds["context_mask"],
                feeds.get("image_tokens"),
                feeds.get("image_slot"),
            )
            return {**{f"key_{i}": k for i, k in enumerate(new_k)}, **{f"value_{i}": v for i, v in enumerate(new_v)}}
        exponentials = feeds.get("exponentials")
        out = self.model.denoise(
            feeds["canvas"],
            feeds["self_cond"],
            keys,
            values,
            feeds["context_length"],
            feeds["context_mask"],
            feeds["temperature"],
            feeds["entropy_bound"],
            feeds.get("uniforms"),
            feeds["renoise_ids"],
            exponentials=None if exponentials is None else exponentials.to(self.device),
        )
        return {
            "sampled": out.sampled,
            "argmax": out.argmax,
            "entropy": out.entropy,
            "accepted": out.accepted,
            "next_canvas": out.next_canvas,
            "next_self_cond": out.next_self_cond,
            "mean_entropy": out.mean_entropy,
        }


class TorchVisionEncoder:
    """The vision model (`canvasrt.model.vision`) run eagerly on the executor's device."""

    def __init__(self, model: Any, device: str):
        self.model, self.device = model, device

    @torch.inference_mode()
    def encode(self, pixel_values: Any, positions: Any) -> tuple[Any, Any]:
        soft, real = self.model(
            torch.from_numpy(pixel_values).to(self.device), torch.from_numpy(positions).to(self.device)
        )
        return soft.float().cpu().numpy(), real.cpu().numpy()
