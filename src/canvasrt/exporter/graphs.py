"""The flat-argument module traced into backbone.onnx, and example inputs for tracing.

Its argument and result order is the graph contract of `canvasrt.core.contract`, which the exporter copies into
the manifest.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.contract import MODEL_DTYPE, TensorSpec
from ..model.modeling import DiffusionGemmaText


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
            temperature,
            entropy_bound,
            uniforms,
            renoise_ids,
            with_logits=self.debug_logits,
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
