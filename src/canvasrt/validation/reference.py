"""The PyTorch reference: transformers' DiffusionGemmaForBlockDiffusion, driven step by step or through generate().

Eager experts (the plain per-expert loop) and, by default, eager attention, in fp32 on CPU: the numerics every canvasrt
level is measured against (`device` and `dtype` move it, e.g. to CUDA in bf16 for the released model). Inputs go to
its device and results come back to the host. With left padding in the batch, transformers 5.23's generate() fails
under eager attention (its decoder mask builder calls torch.finfo on the integer canvas), so padded batches use SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import CanvasrtError
from ..model.checkpoint import DTYPES, Checkpoint, read_config_json, torch_device
from ..runtime.images import ImageBatch


@dataclass
class ReferenceCache:
    cache: Any
    attention_mask: torch.Tensor  # [B, context] bool over everything encoded so far
    length: int


class Reference:
    def __init__(self, checkpoint_dir: str | Path, attention: str = "eager", device: str = "cpu", dtype: str = "fp32"):
        from transformers import DiffusionGemmaForBlockDiffusion
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
        read_config_json(Path(checkpoint_dir))
        if dtype not in DTYPES:
            raise CanvasrtError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        self.device = torch_device(device)
        Checkpoint.open(checkpoint_dir).check_memory(dtype, self.device, "the transformers reference")
        self.model = (
            DiffusionGemmaForBlockDiffusion.from_pretrained(
                str(checkpoint_dir), attn_implementation=attention, dtype=DTYPES[dtype]
            )
            .to(self.device)
            .eval()
        )  # not device_map=: that needs accelerate
        self.model.set_experts_implementation("eager")
        self.text_config = self.model.config.get_text_config(decoder=True)

    @property
    def embedding(self) -> torch.Tensor:
        """The embedding matrix, in fp32 on the host (what the sampler math of parity multiplies)."""
        return self.model.model.decoder.embed_tokens.weight.float().cpu()

    @torch.inference_mode()
    def encode(
        self, state: ReferenceCache | None, ids: np.ndarray, padding: np.ndarray, images: ImageBatch | None = None
    ) -> ReferenceCache:
        """Appends a chunk to the cache (a new DynamicCache when state is None). images: the pixel values and patch
        positions of the images whose tokens the chunk holds, encoded under the masks generate() builds from the
        processor's mm_token_type_ids (the encoder's forward alone would drop them and attend causally)."""
        from transformers.cache_utils import DynamicCache

        if state is None:
            empty = torch.zeros(ids.shape[0], 0, dtype=torch.bool, device=self.device)
            state = ReferenceCache(DynamicCache(config=self.text_config), empty, 0)
        mask = torch.cat([state.attention_mask, self._tensor(padding)], dim=1)
        positions = torch.arange(state.length, state.length + ids.shape[1], device=self.device)[None]
        attention: Any = mask
        extra: dict[str, Any] = {}
        if images is not None:
            encoder = self.model.model.encoder
            attention = encoder.create_masks_for_generate(
                config=self.model.config,
                inputs_embeds=torch.empty(ids.shape[0], ids.shape[1], 0, device=self.device),
                attention_mask=mask,
                past_key_values=state.cache,
                position_ids=positions,
                mm_token_type_ids=self._tensor(ids == self.model.config.image_token_id).long(),
            )
            extra = self._image_inputs(images)
        self.model.model.encoder(
            input_ids=self._tensor(ids),
            attention_mask=attention,
            position_ids=positions,
            past_key_values=state.cache,
            **extra,
        )
        return ReferenceCache(state.cache, mask, state.length + ids.shape[1])

    @torch.inference_mode()
    def image_features(self, images: ImageBatch) -> np.ndarray:
        """transformers' vision tower and projector (`get_image_features`): the soft tokens of every image, padding
        stripped, [sum of soft tokens, text hidden] fp32."""
        inputs = self._image_inputs(images)
        features = self.model.model.encoder.get_image_features(inputs["pixel_values"], inputs["image_position_ids"])
        return features.pooler_output.float().cpu().numpy()

    def _image_inputs(self, images: ImageBatch) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self._tensor(images.pixel_values).to(self.model.dtype),
            "image_position_ids": self._tensor(images.positions),
        }

    @torch.inference_mode()
    def logits(self, state: ReferenceCache, canvas: np.ndarray, self_cond_logits: torch.Tensor | None) -> torch.Tensor:
        """Softcapped fp32 logits [B, C, V] of one decoder pass over the canvas. Records, per token, the smallest
        relative gap between the k-th and (k+1)-th router probability over all layers in `self.routing_margin`."""
        c = canvas.shape[1]
        decoder_mask = torch.cat(
            [state.attention_mask, torch.ones(canvas.shape[0], c, dtype=torch.bool, device=self.device)], dim=1
        )
        margins: list[torch.Tensor] = []
        k = self.text_config.top_k_experts

        def record(module: Any, args: Any, output: Any) -> None:
            top = torch.topk(output[0], k + 1, dim=-1).values
            margins.append((top[:, k - 1] - top[:, k]) / top[:, k - 1])

        hooks = [layer.router.register_forward_hook(record) for layer in self.model.model.decoder.layers]
        try:
            logits = self._decode(state, canvas, self_cond_logits, decoder_mask)
        finally:
            for hook in hooks:
                hook.remove()
        self.routing_margin = torch.stack(margins).amin(dim=0).reshape(canvas.shape).float().cpu().numpy()
        return logits.float().cpu()

    def _decode(
        self,
        state: ReferenceCache,
        canvas: np.ndarray,
        self_cond_logits: torch.Tensor | None,
        decoder_mask: torch.Tensor,
    ) -> torch.Tensor:
        c = canvas.shape[1]
        return self.model(
            decoder_input_ids=self._tensor(canvas),
            past_key_values=state.cache,
            decoder_position_ids=torch.arange(state.length, state.length + c, device=self.device)[None],
            decoder_attention_mask=decoder_mask,
            self_conditioning_logits=None if self_cond_logits is None else self_cond_logits.to(self.device),
        ).logits

    def cached_kv(self, state: ReferenceCache, layer: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The layer's cached K/V [B, nkv, n, d] and the absolute positions of those n entries."""
        entry = state.cache.layers[layer]
        n = entry.keys.shape[2]
        return entry.keys.float().cpu(), entry.values.float().cpu(), np.arange(state.length - n, state.length)

    @torch.inference_mode()
    def generate(
        self, ids: np.ndarray, padding: np.ndarray, seed: int, images: ImageBatch | None = None, **settings: Any
    ) -> Any:
        """transformers' generate(); with images as its processor's outputs are passed (pixel values, patch
        positions, mm_token_type_ids)."""
        torch.manual_seed(seed)
        if images is not None:
            settings = {
                **settings,
                **self._image_inputs(images),
                "mm_token_type_ids": self._tensor(ids == self.model.config.image_token_id).long(),
            }
        out = self.model.generate(self._tensor(ids), attention_mask=self._tensor(padding).long(), **settings)
        out.sequences, out.tokens_per_forward = out.sequences.cpu(), out.tokens_per_forward.cpu()
        return out

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
