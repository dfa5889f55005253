"""The flat-argument module traced into backbone.onnx, and example inputs for tracing.

Its argument and result order is the graph contract of `canvasrt.core.contract`, which the exporter copies into
the manifest.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.contract import MODEL_DTYPE, TensorSpec
from ..model.modeling import DiffusionGemmaText
from ..model.vision import VisionModel


class BackboneGraph(nn.Module):
    """Flat-argument wrapper of `DiffusionGemmaText.step`, traced into backbone.onnx."""

    def __init__(self, model: DiffusionGemmaText, debug_logits: bool):
        super().__init__()
        self.model = model
        self.debug_logits = debug_logits

    def forward(
        self,
        input_ids,
        positions,
        canvas,
        self_cond,
        context_length,
        context_mask,
        temperature,
        entropy_bound,
        uniforms,
        renoise_ids,
        *past,
    ):
        inputs = (input_ids, positions, canvas, self_cond, context_length, context_mask)
        return self._step(inputs, (temperature, entropy_bound, uniforms, renoise_ids), past)

    def _step(self, inputs, sampler, past, image_tokens=None, image_slot=None):
        input_ids, positions, canvas, self_cond, context_length, context_mask = inputs
        n = self.model.config.num_layers
        keys, values, out = self.model.step(
            input_ids,
            positions,
            canvas,
            self_cond,
            list(past[:n]),
            list(past[n:]),
            context_length,
            context_mask,
            *sampler,
            with_logits=self.debug_logits,
            image_tokens=image_tokens,
            image_slot=image_slot,
        )
        result = (
            *keys,
            *values,
            out.sampled,
            out.argmax,
            out.entropy,
            out.accepted,
            out.next_canvas,
            out.next_self_cond,
            out.mean_entropy,
        )
        return (*result, out.logits) if self.debug_logits else result


class VisionBackboneGraph(BackboneGraph):
    """`BackboneGraph` with the image inputs (soft tokens and their slots) before the K/V buffers."""

    def forward(
        self,
        input_ids,
        positions,
        canvas,
        self_cond,
        context_length,
        context_mask,
        temperature,
        entropy_bound,
        uniforms,
        renoise_ids,
        image_tokens,
        image_slot,
        *past,
    ):
        inputs = (input_ids, positions, canvas, self_cond, context_length, context_mask)
        sampler = (temperature, entropy_bound, uniforms, renoise_ids)
        return self._step(inputs, sampler, past, image_tokens, image_slot)


class VisionGraph(nn.Module):
    """The vision tower and projector, traced into vision.onnx."""

    def __init__(self, model: VisionModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, image_position_ids):
        return self.model(pixel_values, image_position_ids)


TORCH_DTYPES = {"int64": torch.int64, "bool": torch.bool, "float32": torch.float32}


def example_inputs(specs: list[TensorSpec], dims: dict[str, int], model_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Concrete tensors matching a contract, for tracing: all zeros except masks (True) and ids (valid ids)."""
    tensors = []
    for spec in specs:
        shape = [dims[d] if isinstance(d, str) else d for d in spec.shape]
        dtype = model_dtype if spec.dtype == MODEL_DTYPE else TORCH_DTYPES[spec.dtype]
        fill = True if dtype == torch.bool else 0
        tensors.append(torch.full(shape, fill, dtype=dtype))
    return tuple(tensors)
